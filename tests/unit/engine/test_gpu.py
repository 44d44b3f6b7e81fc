"""On a CUDA device: the engine's runner on fp16 weights shaped like llava-1.5 (small shapes, so
the check is quick) computes what `transformers` computes, and the GPU benchmark runs."""

import pytest
import torch

from tests.support.probes import WholeRunner

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (CI and the development machines are CPU-only)"
)


def test_slot_kv_decode_on_cuda_matches_a_plain_forward():
    from tests.support.shapes import build

    device = torch.device("cuda")
    model = build("small", device, torch.float16)
    runner = WholeRunner(model, 0, slots=4, max_len=256)
    ids = [list(range(10, 10 + n)) for n in (5, 17, 9)]
    logits = runner.prefill_whole([0, 1, 2], [(p, []) for p in ids])
    runner.commit(logits.argmax(-1).tolist())
    step = runner.decode()
    with torch.inference_mode():
        for row, prompt in enumerate(ids):
            full = torch.tensor([[*prompt, int(logits[row].argmax())]], device=device)
            expected = model(input_ids=full).logits[0, -1]
            assert torch.allclose(step[row].float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_the_gpu_benchmark_runs(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "benchmarks/gpu.py", "--shape", "small", "--steps", "4", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=600)
    assert out.exists()
