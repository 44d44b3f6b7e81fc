"""Each architecture's adapter against transformers' own processor: for one, two and three images of
different sizes and aspect ratios in one sample, every image's tiles equal the processor's
`pixel_values` and its placeholder count equals the processor's expansion."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llava_serve.config import ImageConfig
from llava_serve.inputs import images
from llava_serve.models import load_adapter, tiny
from tests.support.media import encode, random_image
from tests.support.oracle import processor_for, reference_inputs

ARCHS = ["llava", "llava_next", "llava_onevision"]
# (width, height): wide, tall, square and under one tile, over one tile.
SIZES = [(120, 30), (24, 100), (40, 40), (90, 70)]


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory) -> str:
    return str(tiny.ensure("tiny", tmp_path_factory.mktemp("adapters"), arch=request.param))


def one_turn(n: int) -> list[dict]:
    """n images, each followed by a word, so each image's placeholders are a run of their own."""
    image = {"type": "image_url", "image_url": {"url": "x"}}
    return [
        {"role": "user", "content": [p for i in range(n) for p in (image, {"type": "text", "text": f"w{i}"})]}
    ]


def runs(ids: list[int], token: int) -> list[int]:
    return [len(list(group)) for key, group in itertools.groupby(ids) if key == token]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiles_and_counts_equal_the_processor_s(checkpoint, n):
    adapter, processor = load_adapter(checkpoint), processor_for(checkpoint)
    pictures = [random_image(70 + i, SIZES[(i + n) % len(SIZES)]) for i in range(n)]
    inputs = reference_inputs(processor, one_turn(n), pictures)
    expected = inputs["pixel_values"].numpy()
    counts = runs(inputs["input_ids"][0].tolist(), adapter.image_token_id)
    assert len(counts) == n
    for i, picture in enumerate(pictures):
        base_only = adapter.base_only(None, n)
        tiles = adapter.preprocess(picture, base_only)
        # LLaVA's processor stacks one tile per image; the tiled ones pad every image's tiles to
        # the sample's most with zeros.
        reference = expected[i] if expected.ndim == 5 else expected[i : i + 1]
        assert tiles.shape[1:] == reference.shape[1:]
        np.testing.assert_array_equal(tiles, reference[: len(tiles)], err_msg=f"image {i} of {n}")
        assert not reference[len(tiles) :].any(), f"image {i} of {n} has fewer tiles than the processor's"
        assert adapter.num_tokens(picture.height, picture.width, base_only) == counts[i]


def test_an_image_alone_and_beside_another_are_cached_apart_where_their_tiles_differ(checkpoint):
    adapter = load_adapter(checkpoint)
    data = encode(random_image(80, (50, 30)))
    alone = images.prepare(data, adapter, ImageConfig(), base_only=adapter.base_only(None, 1))
    beside = images.prepare(data, adapter, ImageConfig(), base_only=adapter.base_only(None, 2))
    same_tiles = np.array_equal(alone.pixel_values, beside.pixel_values)
    assert (alone.content_hash == beside.content_hash) == same_tiles
    # Only OneVision reduces an image that has company (to one padded tile).
    assert same_tiles == (adapter.model_type != "llava_onevision")
