import io

import numpy as np
import pytest
from PIL import Image

from llava_serve.config import ImageConfig
from llava_serve.errors import ImageError
from llava_serve.inputs import images
from tests.support.media import encode, random_image

LIMITS = ImageConfig()


@pytest.mark.parametrize(
    ("mode", "size", "fmt"),
    [
        ("RGB", (64, 64), "PNG"),
        ("RGBA", (50, 70), "PNG"),
        ("L", (80, 40), "PNG"),
        ("P", (33, 90), "GIF"),
        ("RGB", (300, 20), "JPEG"),  # wide
        ("RGB", (17, 200), "BMP"),  # tall
        ("RGBA", (64, 48), "WEBP"),
    ],
)
def test_prepare_matches_the_checkpoint_processor(processor, adapter, mode, size, fmt):
    original = random_image(1, size, mode)
    data = encode(original, fmt)
    prepared = images.prepare(data, adapter, LIMITS)
    expected = processor(images=Image.open(io.BytesIO(data)), text="<image>", return_tensors="np")
    assert prepared.pixel_values.shape == expected["pixel_values"].shape  # one tile
    assert np.allclose(prepared.pixel_values, expected["pixel_values"], atol=1e-6)
    assert prepared.num_tokens == int((expected["input_ids"] == processor.image_token_id).sum())
    assert prepared.size == (size[1], size[0])


def test_equal_pixels_share_a_hash_across_encodings(adapter):
    image = random_image(2)
    a = images.prepare(encode(image, "PNG"), adapter, LIMITS)
    b = images.prepare(encode(image, "BMP"), adapter, LIMITS)
    c = images.prepare(encode(random_image(3), "PNG"), adapter, LIMITS)
    assert a.content_hash == b.content_hash != c.content_hash


def test_animated_gif_uses_first_frame(processor):
    frames = [Image.new("RGB", (32, 32), color) for color in [(255, 0, 0), (0, 0, 255)]]
    import io

    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    image = images.decode(buf.getvalue(), LIMITS)
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_not_an_image_is_a_precise_error():
    with pytest.raises(ImageError, match="not an image"):
        images.decode(b"<html>hello</html>", LIMITS, "messages[0].content[0]")


def test_truncated_image_is_an_image_error():
    data = encode(random_image(4, (64, 64)))
    with pytest.raises(ImageError, match="could not decode"):
        images.decode(data[: len(data) // 2], LIMITS)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("L", (12000, 12000)), "PNG")  # ~140 KB on disk, 144 Mpx decoded
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError, match="over the limit") as info:
        images.decode(bomb, LIMITS)
    assert info.value.code == "image_too_large"


def test_format_outside_the_allowlist_is_refused():
    with pytest.raises(ImageError, match="format BMP is not accepted"):
        images.decode(encode(random_image(5), "BMP"), ImageConfig(allowed_formats=["png"]))


def test_pillows_process_wide_bomb_limit_is_left_alone():
    """The pixel limit is ours, enforced where we decode (`images` is imported above); other code
    in the process keeps Pillow's own."""
    assert Image.MAX_IMAGE_PIXELS == (1024 * 1024 * 1024 // 4 // 3)


def test_detail_changes_the_tiles_the_count_and_the_cache_key(tmp_path):
    from llava_serve.models import load_adapter, tiny

    adapter = load_adapter(str(tiny.ensure("tiny", tmp_path, arch="llava_next")))
    data = encode(random_image(4, (90, 70)))
    high = images.prepare(data, adapter, LIMITS, base_only=False)
    low = images.prepare(data, adapter, LIMITS, base_only=True)
    assert high.pixel_values.shape[0] == 5 and low.pixel_values.shape[0] == 1  # base + 2x2 / base
    assert np.array_equal(low.pixel_values[0], high.pixel_values[0])  # the same base tile...
    assert low.content_hash != high.content_hash  # ...encoded differently, so cached apart
    assert low.num_tokens < high.num_tokens


@pytest.mark.parametrize("arch", ["llava", "llava_next", "llava_onevision"])
def test_the_size_after_the_processor_s_resize_is_held_to_max_pixels_before_it_runs(tmp_path, arch):
    from llava_serve.models import load_adapter, tiny

    adapter = load_adapter(str(tiny.ensure("tiny", tmp_path, arch=arch)))
    image = random_image(5, (300, 20))  # 15:1, 6,000 pixels as decoded
    data = encode(image)
    for base_only in (False, True):
        grown = adapter.processed_pixels(20, 300, base_only)
        # The estimate bounds what the processor really builds: its output tiles at least.
        tiles = adapter.preprocess(image, base_only)
        assert grown >= tiles.shape[-1] * tiles.shape[-2]
        limits = ImageConfig(max_pixels=grown - 1)
        if grown - 1 >= 300 * 20:  # the decoded image itself passes; its resize does not
            with pytest.raises(ImageError, match="processor would make"):
                images.prepare(data, adapter, limits, base_only=base_only)
        images.prepare(data, adapter, ImageConfig(max_pixels=max(grown, 6000)), base_only=base_only)
    # CLIP's shortest-edge resize grows a thin image by its aspect ratio; OneVision pads one tile square.
    if arch == "llava":
        assert adapter.processed_pixels(20, 300, False) == 64 * 64 * 15
    if arch == "llava_onevision":
        assert adapter.processed_pixels(20, 300, True) == 300 * 300


def test_a_thin_image_is_refused_by_its_aspect_ratio(adapter):
    data = encode(random_image(6, (2100, 100)))
    with pytest.raises(ImageError, match="aspect ratio of 21:1"):
        images.prepare(data, adapter, ImageConfig())
    images.prepare(data, adapter, ImageConfig(max_aspect_ratio=25))
