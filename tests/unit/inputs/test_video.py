"""Reading videos: frames sampled uniformly, and every limit refused with a clear error."""

import io

import numpy as np
import pytest

from llava_serve.config import ImageConfig
from llava_serve.errors import ImageError
from llava_serve.inputs import video
from tests.support.media import encode, random_image
from tests.support.videos import decoded_frames, make_mp4, make_ts


def test_samples_spread_evenly_with_both_ends():
    assert video.sample_indices(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19]
    assert video.sample_indices(3, 8) == [0, 1, 2]


@pytest.mark.parametrize(("total", "wanted"), [(20, 4), (75, 8), (75, 75)])
def test_a_clip_gives_its_uniformly_sampled_frames(total, wanted):
    # MPEG-4's encoder puts a keyframe every 12 frames: most samples are reached by seeking to
    # one and decoding past it, and each must be the very frame a full decode has at its index.
    data = make_mp4(frames=total)
    frames = video.decode(data, ImageConfig(max_video_frames=wanted))
    every = decoded_frames(data)
    assert len(every) == total and len(frames) == wanted
    for got, index in zip(frames, video.sample_indices(total, wanted), strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(every[index]))


def test_a_stream_that_grows_past_its_header_is_refused_at_the_frame_that_does():
    data = make_ts(10, (64, 48)) + make_ts(10, (256, 192))  # the header says 64x48
    assert {f.size for f in decoded_frames(data)} == {(64, 48), (256, 192)}
    with pytest.raises(ImageError) as info:
        video.decode(data, ImageConfig(max_pixels=64 * 48 * 2, max_video_frames=4))
    assert info.value.code == "image_too_large" and "256x192" in info.value.message


def test_an_animated_gif_is_a_video():
    pictures = [random_image(i, (32, 24)).convert("P") for i in range(6)]
    buf = io.BytesIO()
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:], duration=100)
    frames = video.decode(buf.getvalue(), ImageConfig(max_video_frames=3))
    assert [f.size for f in frames] == [(32, 24)] * 3


@pytest.mark.parametrize(
    ("data", "limits", "code"),
    [
        (make_mp4(frames=30, fps=10), ImageConfig(max_video_seconds=2), "video_too_long"),
        (make_mp4(frames=4, size=(128, 96)), ImageConfig(max_pixels=128 * 95), "image_too_large"),
        (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, ImageConfig(), "not_a_video"),
        (encode(random_image(1)), ImageConfig(), "not_a_video"),
    ],
)
def test_what_cannot_be_read_within_the_limits_is_refused(data, limits, code):
    with pytest.raises(ImageError) as info:
        video.decode(data, limits, "messages[0].content[0].video_url.url")
    assert info.value.code == code and info.value.param == "messages[0].content[0].video_url.url"


def test_a_model_without_video_refuses_it(adapter):
    with pytest.raises(ImageError, match="does not take video"):
        video.prepare(make_mp4(frames=4), adapter, ImageConfig())
