"""Short videos made on the spot with PyAV, and the frames a reader gets back from them."""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image


def make_mp4(frames: int = 20, size: tuple[int, int] = (64, 48), fps: int = 10, seed: int = 0) -> bytes:
    """An MPEG-4 clip of `frames` noise frames (width, height)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        rng = np.random.RandomState(seed)
        for _ in range(frames):
            # Blocks of colour rather than per-pixel noise: a lossy codec keeps them recognizable.
            small = rng.randint(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            pixels = np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_ts(frames: int, size: tuple[int, int], fps: int = 10) -> bytes:
    """An MPEG-TS clip of flat frames; two of them, concatenated, are one stream that changes size."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            pixels = np.full((size[1], size[0], 3), i * 10 % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decoded_frames(data: bytes) -> list[Image.Image]:
    """Every frame of a clip as RGB, decoded independently of the server's reader."""
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
