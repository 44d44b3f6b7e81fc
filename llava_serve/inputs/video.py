"""Decode a caller's video and sample its frames, within limits; CPU-bound, run off the loop.

Containers FFmpeg reads (MP4, WebM, MKV, MOV, ...) go through PyAV; animated GIF and WebP through
Pillow. Frames are sampled uniformly over the clip (first and last included), as LLaVA-OneVision's
own pipeline samples them. A video is checked before its frames are decoded: its container's
duration, its frame size against `images.max_pixels`, and its frame count (demuxed, not decoded);
each sampled frame is reached by seeking, and every decoded frame's size is checked again. The
wall-clock deadline on the whole is the decode pool's (`llava_serve.inputs.decode_pool`).
"""

from __future__ import annotations

import bisect
import io

import numpy as np
from PIL import Image

from llava_serve.config import ImageConfig
from llava_serve.errors import ImageError
from llava_serve.inputs.images import content_hash, to_rgb
from llava_serve.types import PreparedImage

_MAX_FRAMES_SCANNED = 100_000  # packets demuxed to count frames: a bound on the work a file can ask for


def sample_indices(total: int, wanted: int) -> list[int]:
    """`wanted` frame indices spread evenly over `total`, first and last included."""
    if total <= wanted:
        return list(range(total))
    return np.linspace(0, total - 1, wanted).round().astype(int).tolist()


def decode(data: bytes, limits: ImageConfig, param: str | None = None) -> list[Image.Image]:
    """Up to `limits.max_video_frames` RGB frames of `data`, sampled uniformly."""
    if data[:6] in (b"GIF87a", b"GIF89a") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return _decode_animation(data, limits, param)
    return _decode_container(data, limits, param)


def _decode_container(data: bytes, limits: ImageConfig, param: str | None) -> list[Image.Image]:
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ImageError("the file has no video stream", param, "not_a_video")
            stream = container.streams.video[0]
            seconds = container.duration / av.time_base if container.duration else None
            if seconds is None and stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            if seconds is None:
                raise ImageError("the video does not say how long it is", param, "not_a_video")
            if seconds > limits.max_video_seconds:
                raise ImageError(
                    f"video is {seconds:.1f}s long, over the limit of {limits.max_video_seconds:g}s",
                    param,
                    "video_too_long",
                )
            width, height = stream.codec_context.width, stream.codec_context.height
            _check_pixels(width, height, limits, param)
            # Packets are demuxed, not decoded, to learn each frame's timestamp; in presentation
            # order, the i-th smallest is the i-th frame.
            stamps, keyframes = [], []
            for packet in container.demux(stream):
                if packet.size:
                    stamps.append(packet.pts if packet.pts is not None else packet.dts)
                    if packet.is_keyframe:
                        keyframes.append(stamps[-1])
                if len(stamps) > _MAX_FRAMES_SCANNED:
                    raise ImageError("the video has too many frames", param, "video_too_long")
            if None in stamps:
                raise ImageError("the video's frames have no timestamps", param, "not_a_video")
            stamps.sort()
            wanted = [stamps[i] for i in sample_indices(len(stamps), limits.max_video_frames)]
            frames = _frames_at(container, stream, wanted, sorted(keyframes), limits, param)
    except ImageError:
        raise
    except Exception as e:  # PyAV raises many types for corrupt or unknown input; all mean the same
        raise ImageError(f"could not decode video: {e}", param, "not_a_video") from e
    if not frames:
        raise ImageError("the video has no frames", param, "not_a_video")
    return [to_rgb(f) for f in frames]


def _frames_at(
    container, stream, wanted: list[int], keyframes: list[int], limits: ImageConfig, param: str | None
) -> list:
    """The frames shown at the ascending timestamps `wanted`. Decoding seeks to the keyframe
    before a wanted frame only when that keyframe lies past what was decoded last, and otherwise
    carries on: a long clip costs a group of pictures per sampled frame, never everything up to
    the last one, and frames sampled within one group cost that group once. Every decoded
    frame's size is checked: a stream may change size after its header."""
    frames, decoded, last = [], None, None
    for pts in wanted:
        at = bisect.bisect_right(keyframes, pts)
        key = keyframes[at - 1] if at else None  # the keyframe a seek to `pts` lands on
        if last is None or (key is not None and key > last):  # nothing decoded yet, or past it
            container.seek(pts, stream=stream, backward=True, any_frame=False)
            decoded = container.decode(stream)
        for frame in decoded:
            _check_pixels(frame.width, frame.height, limits, param)
            last = frame.pts if frame.pts is not None else last
            if frame.pts is not None and frame.pts >= pts:
                frames.append(frame.to_image())
                break
        else:
            raise ImageError("the video ends before a frame its index lists", param, "not_a_video")
    return frames


def _decode_animation(data: bytes, limits: ImageConfig, param: str | None) -> list[Image.Image]:
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(*image.size, limits, param)
        total = getattr(image, "n_frames", 1)
        if total > _MAX_FRAMES_SCANNED:
            raise ImageError("the animation has too many frames", param, "video_too_long")
        frames = []
        for index in sample_indices(total, limits.max_video_frames):
            image.seek(index)
            frames.append(to_rgb(image.copy()))
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"could not decode animation: {e}", param, "not_a_video") from e
    return frames


def _check_pixels(width: int, height: int, limits: ImageConfig, param: str | None) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(
            f"video frames are {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_pixels}",
            param,
            "image_too_large",
        )


def prepare(data: bytes, adapter, limits: ImageConfig, param: str | None = None) -> PreparedImage:
    """Bytes of a video in, its sampled frames preprocessed and their token count out."""
    if not adapter.takes_video:
        raise ImageError("this model does not take video (video_url parts)", param, "video_not_supported")
    frames = decode(data, limits, param)
    pixels = adapter.preprocess_video(frames)
    height, width = frames[0].height, frames[0].width
    return PreparedImage(
        pixels,
        content_hash(pixels, False, "video"),
        (height, width),
        adapter.video_tokens(len(frames)),
        False,
        "video",
    )
