"""The runner: the installed transformers takes what it passes, rows join and leave correctly,
and image features must fit their slots."""

import collections
import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaModel, MistralModel, Qwen2Model

from llava_serve.config import ImageConfig
from llava_serve.engine.head import OutputHead
from llava_serve.engine.kv import gpu_kv_budget, slot_length
from llava_serve.engine.packed import PackedLinear
from llava_serve.engine.runner import Chunk
from llava_serve.engine.sampler import Sampler
from llava_serve.engine.sampling import SamplingParams
from llava_serve.engine.sequence import Sequence
from llava_serve.errors import EngineError, InvalidRequest
from llava_serve.inputs import images
from tests.support.engines import fresh_model
from tests.support.media import encode, random_image
from tests.support.probes import WholeRunner

# Every keyword the runner passes to the text decoder's forward.
FORWARD_ARGS = {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache"}


@pytest.mark.parametrize("decoder", [LlamaModel, MistralModel, Qwen2Model])
def test_installed_transformers_forward_takes_what_the_runner_passes(decoder):
    params = set(inspect.signature(decoder.forward).parameters)
    missing = FORWARD_ARGS - params
    assert not missing, f"transformers' {decoder.__name__}.forward lacks {missing}: check the pin"


def test_the_output_head_gives_the_model_s_own_logits(hf_model):
    """The packed product on CPU equals `nn.Linear`'s, for one row and for several."""
    head = OutputHead(hf_model.get_output_embeddings())
    assert head.packed is not None
    for rows in (1, 2, 5):
        hidden = torch.randn(rows, hf_model.config.get_text_config().hidden_size)
        expected = hf_model.get_output_embeddings()(hidden)
        got = head(hidden)
        assert got.shape == expected.shape and got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_decoder_s_projections_are_fused_and_packed_and_compute_the_model_s_own(model, hf_model):
    """On CPU each decoder layer runs four products on prepacked weights (q/k/v as one, o,
    gate/up as one, down), the engine's panel kernel where this CPU has AVX-512 and oneDNN
    elsewhere, and its output is the unpacked model's, to float rounding; a second runner on the
    same model packs nothing again. Its steps run through the step decoder, so the engine's parity
    tests hold that path to `generate`."""
    runner = WholeRunner(model, 0)
    assert runner.packed
    assert runner.step_decoder is not None
    on_panels = runner.ops.panel_width() > 0
    assert (runner.head.packed.ops is not None) == on_panels
    for layer in runner.decoder.layers:
        products = [m for m in layer.modules() if isinstance(m, PackedLinear)]
        assert len(products) == 4
        assert all((m.ops is not None) == on_panels for m in products)
        assert not any(type(m) is torch.nn.Linear for m in layer.modules())
    assert WholeRunner(model, 0).packed
    x = torch.randn(1, 7, hf_model.config.get_text_config().hidden_size)
    with torch.inference_mode():
        got = runner.decoder(inputs_embeds=x).last_hidden_state
        expected = hf_model.get_decoder()(inputs_embeds=x).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_vision_tower_and_projector_run_on_the_engine_s_products_and_compute_the_model_s_own_features(
    tiny_dir, hf_model, dtype
):
    """On CPU the image path's linears are packed for the engine's kernels too (float32 panels on
    AVX-512, bfloat16 tiles on AMX, oneDNN elsewhere), and an image's features are the unpacked
    model's own `get_image_features`, to float rounding."""
    model = fresh_model(tiny_dir).to(dtype)
    reference = hf_model if dtype == torch.float32 else copy.deepcopy(hf_model).to(dtype)
    ops = WholeRunner(model, 0).ops
    if dtype == torch.float32:
        kernel = "panels" if ops is not None and ops.panel_width() > 0 else None
    else:
        kernel = "tiles" if ops is not None and ops.tile_ready() else None
    for part in (model.model.vision_tower, model.model.multi_modal_projector):
        linears = [m for m in part.modules() if isinstance(m, PackedLinear)]
        assert linears and not any(type(m) is torch.nn.Linear for m in part.modules())
        assert all(m.kernel == kernel for m in linears)
    size = reference.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.inference_mode():
        got = model.model.get_image_features(pixel_values=pixels).pooler_output
        expected = reference.model.get_image_features(pixel_values=pixels).pooler_output
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 2e-2}
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **tolerance)


GiB = 1 << 30


def test_the_kv_budget_is_shared_by_the_slots_up_to_the_context():
    assert slot_length(None, 16, 1024, 4096) == 4096
    assert slot_length(16 * 1024 * 300, 16, 1024, 4096) == 300
    assert slot_length(16 * 1024 * 300 + 1023, 16, 1024, 4096) == 300  # whole positions only
    assert slot_length(GiB, 16, 1024, 4096) == 4096
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        slot_length(1024 * 15, 16, 1024, 4096)


def test_on_a_gpu_the_kv_slots_take_what_the_utilization_leaves():
    """llava-v1.6-mistral-7b's shape on an 80 GiB card with 32 slots: a whole 32k context per slot
    would need 128 GiB; the slots get what 0.9 of the card leaves beside the ~15 GiB of weights."""
    per_token, context, slots = 2 * 32 * 8 * 128 * 2, 32768, 32
    assert slots * context * per_token == 128 * GiB
    budget = gpu_kv_budget(free=65 * GiB, total=80 * GiB, utilization=0.9)
    assert budget == 57 * GiB
    length = slot_length(budget, slots, per_token, context)
    assert length == 57 * GiB // (slots * per_token) == 14592
    assert slots * length * per_token <= budget
    # the prefix and vision caches fill device memory later: their bytes are kept from the slots
    assert gpu_kv_budget(free=65 * GiB, total=80 * GiB, utilization=0.9, caches=6 * GiB) == 51 * GiB
    assert gpu_kv_budget(free=6 * GiB, total=80 * GiB, utilization=0.9) == 0  # nothing past the headroom
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        slot_length(0, slots, per_token, context)


@pytest.fixture
def model(tiny_dir):
    """A copy of the tiny model for a runner to pack: the oracle's `hf_model` stays as loaded."""
    return fresh_model(tiny_dir)


@pytest.fixture
def runner(model):
    return WholeRunner(model, 1 << 20)


def prefill(runner, seq_ids: list[int], lengths: list[int]) -> torch.Tensor:
    prompts = [(list(range(10, 10 + n)), []) for n in lengths]
    logits = runner.prefill_whole(seq_ids, prompts)
    runner.commit(logits.argmax(-1).tolist())
    return logits


def solo_logits(runner, length: int, steps: int) -> list[torch.Tensor]:
    """Logits of `steps` greedy decode steps of one prompt, run alone."""
    alone = WholeRunner(runner.model, 0)
    out = [prefill(alone, [0], [length])[0]]
    for _ in range(steps):
        logits = alone.decode()
        alone.set_last_tokens(logits.argmax(-1).tolist())
        out.append(logits[0])
    return out


def slot_state(runner, slot: int) -> list[torch.Tensor]:
    return [t[slot].clone() for t in runner.kv.keys + runner.kv.values]


def test_rows_joining_a_running_batch_compute_what_they_would_alone(runner):
    prefill(runner, [1, 2], [5, 9])
    runner.set_last_tokens(runner.decode().argmax(-1).tolist())  # the first rows are a step ahead
    prefill(runner, [3], [3])
    assert runner.rows == [0, 1, 2] and runner.kv.lengths[:3] == [6, 10, 3]  # each row's own tokens
    logits = runner.decode()
    assert torch.allclose(logits[2], solo_logits(runner, 3, 1)[1], atol=1e-4)


def test_the_kv_cache_is_allocated_once_and_written_in_place(runner):
    storage = [t.data_ptr() for t in runner.kv.keys + runner.kv.values]
    prefill(runner, [1, 2, 3], [4, 12, 6])
    for _ in range(3):
        runner.set_last_tokens(runner.decode().argmax(-1).tolist())
    runner.keep([0, 2])
    prefill(runner, [4], [7])
    assert [t.data_ptr() for t in runner.kv.keys + runner.kv.values] == storage


def test_a_leaving_row_moves_nothing_and_its_slot_is_a_padding_row_until_reused(runner):
    """The middle row leaves: nothing is copied, the rows above and below it compute what they
    would alone with its slot decoding as padding (which writes nothing), and the next prompt takes
    the lowest free slot, its."""
    lengths = [4, 12, 6]
    prefill(runner, [1, 2, 3], lengths)
    runner.keep([0, 2])
    before = [slot_state(runner, s) for s in range(3)]
    logits = runner.decode()
    after = [slot_state(runner, s) for s in range(3)]
    for survivor, row in ((0, 0), (2, 1)):
        assert torch.allclose(logits[row], solo_logits(runner, lengths[survivor], 1)[1], atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True)), "padding wrote"
    assert runner.kv.lengths[:3] == [5, 0, 7]
    prefill(runner, [4], [5])
    assert runner.rows == [0, 2, 1]
    assert torch.allclose(runner.decode()[2], solo_logits(runner, 5, 1)[1], atol=1e-4)


def test_a_failed_prefill_leaves_the_other_rows_as_they_were(runner, adapter):
    prefill(runner, [1], [4])
    broken = images.prepare(encode(random_image(1)), adapter, ImageConfig())
    broken = dataclasses.replace(broken, pixel_values=broken.pixel_values[:, :, :7])  # not a tile
    slot = runner.image_token_id
    with pytest.raises(ValueError, match="doesn't match model"):
        runner.prefill_whole([2], [([3, *[slot] * broken.num_tokens, 4], [broken])])
    assert runner.rows == [0] and runner.kv.lengths[0] == 4
    assert runner.kv.free_slots == runner.kv.slots - 1
    assert torch.allclose(runner.decode()[0], solo_logits(runner, 4, 1)[1], atol=1e-4)


def test_image_features_must_fill_the_image_slots_exactly(runner, adapter):
    image = images.prepare(encode(random_image(1)), adapter, ImageConfig())
    slot = runner.image_token_id
    with pytest.raises(InvalidRequest, match="image positions"):
        runner.prefill_whole([1], [([3, slot, slot, 4], [image])])
    with pytest.raises(InvalidRequest, match="0 feature rows"):
        runner.prefill_whole([1], [([3, slot, 4], [])])


def test_a_prompt_written_in_chunks_beside_decode_rows_computes_what_it_would_in_one_piece(runner):
    """Two rows decode while a third prompt is written 5 positions at a time, in the same passes;
    its last chunk's logits equal the one-piece prefill's, and so do its decode steps after."""
    prefill(runner, [1, 2], [6, 9])
    ids = list(range(20, 37))  # 17 positions: chunks of 5, 5, 5, 2
    embeds = runner.embed(ids, [])
    slot = runner.kv.allocate()
    for start in range(0, len(ids), 5):
        last = start + 5 >= len(ids)
        logits = runner.execute(runner.rows, [Chunk(slot, start, embeds[start : start + 5], last)])
        assert logits.shape[0] == 2 + last
        runner.set_last_tokens(logits[:2].argmax(-1).tolist())  # the others keep decoding
    alone = WholeRunner(runner.model, 0)
    whole = alone.prefill_whole([0], [(ids, [])])
    assert torch.allclose(logits[2], whole[0], atol=1e-4)
    runner.set_next([slot], logits[2:].argmax(-1))
    runner.rows.append(slot)
    alone.commit([int(whole[0].argmax())])
    assert torch.allclose(runner.decode()[2], alone.decode()[0], atol=1e-4)


def test_one_pass_of_decode_rows_and_chunks_equals_the_two_apart(model):
    """Three rows decoding and two prompts being written (one mid-way, one from the start): one
    pass gives the logits and writes the KV that a decode pass and a chunk pass give apart."""

    def staged() -> tuple[WholeRunner, list[Chunk]]:
        runner = WholeRunner(model, 0, slots=8, max_len=256)
        prefill(runner, [0, 1, 2], [7, 20, 13])
        for _ in range(3):
            runner.set_last_tokens(runner.decode().argmax(-1).tolist())
        a, b = runner.kv.allocate(), runner.kv.allocate()
        first = runner.embed(list(range(100, 130)), [])
        runner.execute([], [Chunk(a, 0, first[:12], False)])
        return runner, [Chunk(a, 12, first[12:25]), Chunk(b, 0, runner.embed(list(range(200, 209)), []))]

    apart, chunks = staged()
    decoded, prefilled = apart.decode(), apart.execute([], chunks)
    one, chunks = staged()
    logits = one.execute(one.rows, chunks)
    torch.testing.assert_close(logits[:3], decoded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[3:], prefilled, rtol=1e-5, atol=1e-5)
    assert one.kv.lengths == apart.kv.lengths
    for mine, theirs in zip(one.kv.keys + one.kv.values, apart.kv.keys + apart.kv.values, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_a_row_at_the_end_of_its_slot_is_refused_and_nothing_is_written(model):
    runner = WholeRunner(model, 0, slots=2, max_len=8)
    prefill(runner, [0], [8])
    before = slot_state(runner, 0)
    with pytest.raises(EngineError, match="outgrew"):
        runner.decode()
    assert all(torch.equal(a, b) for a, b in zip(before, slot_state(runner, 0), strict=True))


@contextlib.contextmanager
def host_reads() -> Iterator[collections.Counter]:
    """Counts every read of a tensor's values into Python while it is open."""
    counts: collections.Counter = collections.Counter()
    names = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)

        return read

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_a_decode_step_reads_the_device_once(model):
    """Sizing, running and sampling a decode step (a padding row among the rows, greedy and
    sampled rows together) read nothing of the device but the sampled tokens, in one copy."""
    runner = WholeRunner(model, 0, slots=8)
    prefill(runner, [0, 1, 2, 3], [5, 9, 3, 7])
    runner.keep([0, 2, 3])  # slot 1 is a padding row now
    sampler = Sampler(runner.vocab_size)
    greedy, sampled = (
        SamplingParams(20, temperature=0.0),
        SamplingParams(20, temperature=0.8, top_p=0.9, seed=1),
    )
    seqs = [Sequence.create([1, 2], [], p, [2], "cpu") for p in (greedy, sampled, greedy)]
    with host_reads() as reads:
        for _ in range(3):
            out = sampler.sample(seqs, runner.decode())
            runner.set_next(runner.rows, out.tokens)
    assert dict(reads) == {"tolist": 3}
