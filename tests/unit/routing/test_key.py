"""The routing key: positions keyed by token id or full image hash, digested block by block."""

import numpy as np

from llava_serve.routing.key import MediaSlot, block_digests, position_key
from llava_serve.types import PreparedImage

IMG = 99


def picture(content_hash: str, tokens: int) -> PreparedImage:
    return PreparedImage(np.zeros((1, 3, 2, 2), np.float32), content_hash, num_tokens=tokens)


def test_image_positions_are_keyed_by_the_full_content_hash():
    ids = [1, IMG, IMG, 5, IMG, 6]
    a = position_key(ids, [picture("a" * 64, 2), picture("b" * 64, 1)], IMG, None)
    assert a == (1, "a" * 64, "a" * 64, 5, "b" * 64, 6)
    other = position_key(ids, [picture("a" * 64, 2), picture("c" * 64, 1)], IMG, None)
    assert [x == y for x, y in zip(a, other, strict=True)] == [True] * 4 + [False, True]


def test_a_slot_no_image_accounts_for_matches_nothing():
    ids = [1, IMG, IMG]
    short = position_key(ids, [picture("a", 1)], IMG, None)
    assert short[:2] == (1, "a") and short[2] != position_key(ids, [picture("a", 1)], IMG, None)[2]
    assert block_digests(short, 3) != block_digests(position_key(ids, [picture("a", 1)], IMG, None), 3)


def test_the_tokenizers_slots_key_as_the_engines_images_do():
    ids = [1, IMG, IMG, 5]
    assert position_key(ids, [MediaSlot("image", "h", 2)], IMG, None) == position_key(
        ids, [picture("h", 2)], IMG, None
    )


def test_digests_are_chained_so_a_shared_prefix_shares_its_leading_digests():
    base = tuple(range(40))
    a, b = block_digests(base, 8), block_digests((*base[:20], 999, *base[21:]), 8)
    assert len(a) == 5  # whole blocks only
    assert a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:], strict=True))
    assert block_digests(base[:7], 8) == ()


def test_an_image_hash_never_digests_as_a_token_id():
    assert block_digests(("5",), 1) != block_digests((5,), 1)


async def test_the_same_image_through_two_urls_keys_the_same_and_another_image_does_not(tiny_dir):
    """The path the ingress takes: the preprocessor's content hashes, then the tokenizer's key."""
    from llava_serve.config import AppConfig
    from llava_serve.inputs.media import MediaPreparer
    from llava_serve.inputs.prompts import PromptBuilder
    from tests.support.imageserver import ImageServer
    from tests.support.media import data_uri, encode, random_image

    config = AppConfig.model_validate({"model": tiny_dir, "images": {"allow_hosts": ["127.0.0.2"]}})
    preparer = MediaPreparer(config.model, config.images, workers=1)
    builder = PromptBuilder(preparer.adapter, 2048)
    try:
        with ImageServer("127.0.0.2") as server:
            picture = encode(random_image(5))
            urls = [
                server.add("/a.png", picture),
                server.add("/b.png?x=1", picture),
                data_uri(random_image(5)),
                server.add("/other.png", encode(random_image(6))),
            ]
            keys = []
            for url in urls:
                image = await preparer.prepare(url)
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
                prompt = builder.build(messages, 8, [image.num_tokens], media_hashes=[image.content_hash])
                keys.append(prompt.route_blocks)
    finally:
        preparer.close()
    assert keys[0] and keys[0] == keys[1] == keys[2]
    assert keys[3] != keys[0] and keys[3][0] != keys[0][0]  # apart from the first block on
