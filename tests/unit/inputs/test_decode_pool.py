"""Decoding in worker processes: a deadline per item that stops the work, and a worker lost
under a payload costing only that request."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest
from PIL import Image

from llava_serve.config import ImageConfig, ModelConfig
from llava_serve.errors import ImageError
from llava_serve.inputs import images
from llava_serve.inputs.decode_pool import DecodePool
from tests.support.hostile_media import many_scan_jpeg
from tests.support.media import encode, random_image
from tests.support.videos import make_mp4


@pytest.fixture(scope="module")
def slow_png() -> bytes:
    """A legal image of 170 kB that takes the tiny checkpoint's processor about two seconds:
    6000x6000 stripes."""
    pixels = np.zeros((6000, 6000, 3), np.uint8)
    pixels[::7], pixels[:, ::5] = 200, 90
    return encode(Image.fromarray(pixels))


@pytest.fixture(scope="module")
def pool(tiny_dir):
    pool = DecodePool(ModelConfig(name=tiny_dir), ImageConfig(decode_timeout_s=0.3), 1)
    pool.wait_ready()
    yield pool
    pool.close()


async def test_an_item_prepares_in_a_worker_as_it_does_here(pool, adapter):
    data = encode(random_image(3))
    there = await pool.prepare(data, "x", False)
    here = images.prepare(data, adapter, ImageConfig())
    assert there.content_hash == here.content_hash and there.num_tokens == here.num_tokens
    with pytest.raises(ImageError, match="does not take video"):  # refused there as it is here
        await pool.prepare_video(make_mp4(frames=4), "v")


async def test_an_item_past_its_deadline_is_stopped_and_refused(pool, slow_png):
    before = pool.worker_pids()
    with pytest.raises(ImageError) as info:
        await pool.prepare(slow_png, "messages[0].content[0].image_url.url", False)
    assert info.value.code == "decode_timeout" and "images.decode_timeout_s" in info.value.message
    assert info.value.param == "messages[0].content[0].image_url.url"
    for _ in range(100):  # the stuck worker was killed and a fresh one took its place
        if pool.worker_pids() and pool.worker_pids() != before:
            break
        await asyncio.sleep(0.05)
    assert not set(before) & set(pool.worker_pids())
    assert (await pool.prepare(encode(random_image(4)), "x", False)).num_tokens > 0


async def test_a_worker_lost_mid_item_costs_that_request_alone(tiny_dir, slow_png):
    pool = DecodePool(ModelConfig(name=tiny_dir), ImageConfig(decode_timeout_s=60), 1)
    try:
        pool.wait_ready()
        task = asyncio.ensure_future(pool.prepare(slow_png, "x", False))
        await asyncio.sleep(0.2)
        (worker,) = pool.worker_pids()
        os.kill(worker, signal.SIGKILL)  # what a codec crash or the kernel's OOM killer does
        with pytest.raises(ImageError) as info:
            await task
        assert info.value.code == "decode_failed" and str(-signal.SIGKILL) in info.value.message
        assert (await pool.prepare(encode(random_image(4)), "x", False)).num_tokens > 0
        # A request that goes away takes its worker's work with it.
        task = asyncio.ensure_future(pool.prepare(slow_png, "x", False))
        await asyncio.sleep(0.2)
        (worker,) = pool.worker_pids()
        task.cancel()
        for _ in range(100):
            if worker not in pool.worker_pids():
                break
            await asyncio.sleep(0.05)
        assert worker not in pool.worker_pids()
        # A worker lost while idle makes Pebble give the whole pool up; the next item gets a new one.
        await asyncio.sleep(0.5)
        for worker in pool.worker_pids():
            os.kill(worker, signal.SIGKILL)
        await asyncio.sleep(0.5)
        assert (await pool.prepare(encode(random_image(4)), "x", False)).num_tokens > 0
    finally:
        pool.close()


async def test_a_jpeg_of_hundreds_of_scans_is_stopped_in_its_decoder(pool):
    """The deadline stops libjpeg itself (2.6 s of scans here), not only the processor after it."""
    with pytest.raises(ImageError) as info:
        await pool.prepare(many_scan_jpeg(repeats=300), "x", False)
    assert info.value.code == "decode_timeout"
    assert (await pool.prepare(encode(random_image(4)), "x", False)).num_tokens > 0
