"""The runner: the installed transformers takes what it passes, rows join and leave correctly,
and image features must fit their slots."""

import dataclasses
import inspect

import pytest
import torch
from transformers import LlamaModel, MistralModel, Qwen2Model

from llava_serve.config import ImageConfig
from llava_serve.engine.head import OutputHead
from llava_serve.engine.kvcache import gpu_kv_budget, slot_length
from llava_serve.engine.linear import MAX_TURNED_ROWS, RowsFirstLinear, turned_linears, wrap_linears
from llava_serve.engine.runner import ModelRunner
from llava_serve.errors import InvalidRequest
from llava_serve.inputs import images
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
    """The turned-round product on CPU equals `nn.Linear`'s, for one row and for several."""
    head = OutputHead(hf_model.get_output_embeddings())
    assert head.turned
    for rows in (1, 2, 5):
        hidden = torch.randn(rows, hf_model.config.get_text_config().hidden_size)
        expected = hf_model.get_output_embeddings()(hidden)
        got = head(hidden)
        assert got.shape == expected.shape and got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_decoder_s_linears_turn_round_only_inside_the_runner_s_passes(hf_model):
    """On CPU the runner wraps the text decoder's linear layers: inside its passes, few rows run
    turned round (the same products, to float rounding); many rows, and every other caller of
    the model (`generate` in the parity tests), get the layer's own arithmetic bit for bit."""
    runner = WholeRunner(hf_model, 0)
    assert runner.turn_linears
    layers = [m for m in runner.decoder.modules() if isinstance(m, RowsFirstLinear)]
    inner = {id(w.linear) for w in layers}
    plain = [m for m in runner.decoder.modules() if type(m) is torch.nn.Linear]
    assert layers and all(id(m) in inner for m in plain)  # every linear is wrapped, once
    assert wrap_linears(runner.decoder) == len(layers)  # a second runner on the model wraps nothing again
    layer = layers[0]
    for rows in (1, 3, MAX_TURNED_ROWS, MAX_TURNED_ROWS + 1):
        x = torch.randn(1, rows, layer.weight.shape[1])
        own = layer.linear(x)
        assert torch.equal(layer(x), own)  # outside a pass: untouched
        with turned_linears():
            got = layer(x)
        assert got.shape == own.shape
        if rows > MAX_TURNED_ROWS:
            assert torch.equal(got, own)
        else:
            torch.testing.assert_close(got, own, rtol=1e-5, atol=1e-5)


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
def runner(hf_model):
    return WholeRunner(hf_model, 1 << 20)


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


def test_rows_joining_a_running_batch_compute_what_they_would_alone(runner):
    prefill(runner, [1, 2], [5, 9])
    runner.decode()  # the first rows are a step ahead of the newcomer
    runner.set_last_tokens(runner.batch.last_tokens.tolist())
    prefill(runner, [3], [3])
    assert runner.batch.seq_ids == [1, 2, 3]
    assert runner.batch.lengths.tolist() == [6, 10, 3]  # tokens each row holds, no padding anywhere
    logits = runner.decode()
    expected = solo_logits(runner, 3, 1)[1]
    assert torch.allclose(logits[2], expected, atol=1e-4)


def test_the_kv_cache_is_allocated_once_and_written_in_place(runner):
    storage = [t.data_ptr() for t in runner.kv.keys + runner.kv.values]
    prefill(runner, [1, 2, 3], [4, 12, 6])
    for _ in range(3):
        runner.set_last_tokens(runner.decode().argmax(-1).tolist())
    runner.keep({1, 3})
    prefill(runner, [4], [7])
    assert [t.data_ptr() for t in runner.kv.keys + runner.kv.values] == storage


def test_a_leaving_row_gives_its_slot_back_and_the_others_are_unchanged(runner):
    """Row 1 leaves: the last row moves into its slot (its own tokens only); every survivor's
    next logits equal what it computes alone."""
    lengths = {1: 4, 2: 12, 3: 6}
    prefill(runner, list(lengths), list(lengths.values()))
    runner.keep({2, 3})
    assert runner.batch.seq_ids == [3, 2] and runner.batch.lengths.tolist() == [6, 12]
    logits = runner.decode()
    for row, sid in enumerate(runner.batch.seq_ids):
        assert torch.allclose(logits[row], solo_logits(runner, lengths[sid], 1)[1], atol=1e-4)
    runner.keep(set())
    assert runner.batch is None and runner.num_rows == 0


def test_a_failed_prefill_leaves_the_batch_as_it_was(runner, adapter):
    prefill(runner, [1], [4])
    broken = images.prepare(encode(random_image(1)), adapter, ImageConfig())
    broken = dataclasses.replace(broken, pixel_values=broken.pixel_values[:, :, :7])  # not a tile
    slot = runner.image_token_id
    with pytest.raises(ValueError, match="doesn't match model"):
        runner.prefill_whole([2], [([3, *[slot] * broken.num_tokens, 4], [broken])])
    assert runner.batch.seq_ids == [1] and runner.batch.lengths.tolist() == [4]
    assert torch.allclose(runner.decode()[0], solo_logits(runner, 4, 1)[1], atol=1e-4)


def test_image_features_must_fill_the_image_slots_exactly(runner, adapter):
    image = images.prepare(encode(random_image(1)), adapter, ImageConfig())
    slot = runner.image_token_id
    with pytest.raises(InvalidRequest, match="image positions"):
        runner.prefill_whole([1], [([3, slot, slot, 4], [image])])
    with pytest.raises(InvalidRequest, match="0 feature rows"):
        runner.prefill_whole([1], [([3, slot, 4], [])])


def test_a_prompt_written_in_chunks_computes_what_it_would_in_one_piece(runner):
    """Two rows decode while a third prompt is written 5 positions at a time into a staged
    slot; it then joins, and its logits equal the one-piece prefill's, step after step."""
    from llava_serve.engine.runner import Chunk

    prefill(runner, [1, 2], [6, 9])
    ids = list(range(20, 37))  # 17 positions: chunks of 5, 5, 5, 2
    embeds = runner.embed(ids, [])
    slot = runner.take_slot()
    assert slot == runner.kv.slots - 1  # staged prompts take slots from the top
    for start in range(0, len(ids), 5):
        logits = runner.prefill([Chunk(slot, start, embeds[start : start + 5])])
        runner.set_last_tokens(runner.decode().argmax(-1).tolist())  # the others keep decoding
    alone = WholeRunner(runner.model, 0)
    whole = alone.prefill_whole([0], [(ids, [])])
    assert torch.allclose(logits[0], whole[0], atol=1e-4)
    runner.join(slot, 3, int(logits[0].argmax()))
    assert runner.batch.seq_ids == [1, 2, 3] and runner.batch.lengths.tolist()[2] == len(ids)
    alone.commit([int(whole[0].argmax())])
    assert torch.allclose(runner.decode()[2], alone.decode()[0], atol=1e-4)


def test_a_joining_prompt_trades_places_with_a_staged_one_in_its_way(runner):
    """All but one slot hold rows or staged prompts, and the joining prompt is not the one next
    to the decoding rows: the two swap, and both still compute what they would alone."""
    from llava_serve.engine.runner import Chunk

    prefill(runner, list(range(1, runner.kv.slots - 1)), [3] * (runner.kv.slots - 2))
    a, b = runner.take_slot(), runner.take_slot()  # a: the top slot, b: the one below it
    ids_a, ids_b = list(range(40, 47)), list(range(60, 64))
    runner.prefill([Chunk(b, 0, runner.embed(ids_b, [])), Chunk(a, 0, runner.embed(ids_a, []))])
    runner.join(a, 100, 5)  # a moves down into b's slot; b's prompt moves up
    assert runner.staged == {a: len(ids_b)}
    logits = runner.prefill([Chunk(a, len(ids_b), runner.embed([64, 65], []))])
    alone = WholeRunner(runner.model, 0)
    assert torch.allclose(logits[0], alone.prefill_whole([0], [([*ids_b, 64, 65], [])])[0], atol=1e-4)
    runner.set_last_tokens([*runner.batch.last_tokens.tolist()[:-1], 5])
    expected = WholeRunner(runner.model, 0)
    expected.prefill_whole([0], [(ids_a, [])])
    expected.commit([5])
    assert torch.allclose(runner.decode()[-1], expected.decode()[0], atol=1e-4)


def test_a_step_that_decodes_and_prefills_in_one_pass_equals_the_two_apart(hf_model):
    """Three rows decoding and two prompts joining (one mid-way, one from the start): the fused
    step's logits and the KV it writes are what a decode and a prefill give apart."""
    from llava_serve.engine.runner import Chunk

    def staged() -> tuple[ModelRunner, list[Chunk]]:
        runner = WholeRunner(hf_model, 0, slots=8, max_len=256)
        prefill(runner, [0, 1, 2], [7, 20, 13])
        for _ in range(3):
            runner.set_last_tokens(runner.decode().argmax(-1).tolist())
        a, b = runner.take_slot(), runner.take_slot()
        first = runner.embed(list(range(100, 130)), [])
        runner.prefill([Chunk(a, 0, first[:12])])
        return runner, [Chunk(a, 12, first[12:25]), Chunk(b, 0, runner.embed(list(range(200, 209)), []))]

    apart, chunks = staged()
    decoded, prefilled = apart.decode(), apart.prefill(chunks)
    fused, chunks = staged()
    assert fused.fused
    rows, last = fused.step(chunks)
    torch.testing.assert_close(rows, decoded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, prefilled, rtol=1e-5, atol=1e-5)
    assert fused.staged == apart.staged
    assert fused.batch.lengths.tolist() == apart.batch.lengths.tolist()
    for mine, theirs in zip(fused.kv.keys + fused.kv.values, apart.kv.keys + apart.kv.values, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
