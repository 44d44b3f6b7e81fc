"""`serve run serve_config.yaml` from the repository root, as `make serve` runs it, starts, answers
and keeps Ray's own endpoints closed (a subprocess smoke test)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.raycheck import assert_ray_is_closed

ROOT = Path(__file__).resolve().parents[2]
URL = "http://127.0.0.1:8000"  # what serve_config.yaml binds


def test_serve_run_answers(tmp_path):
    serve_bin = Path(sys.executable).parent / "serve"
    env = {
        **os.environ,
        "RAY_ADDRESS": "local",  # a cluster of its own, apart from the test session's
        "LLAVA_SERVE_CACHE": str(tmp_path / "cache"),  # so 'tiny' is built on first use, as on a fresh box
        "HF_HUB_OFFLINE": "1",
        # What `make serve` and the README's Security section set for a one-machine cluster.
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.proxy:middlewares",
    }
    log = (tmp_path / "serve.log").open("w")
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(serve_bin), "run", "serve_config.yaml"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        answer = None
        while time.monotonic() - start < 240 and proc.poll() is None:
            try:
                r = httpx.post(
                    f"{URL}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5},
                    timeout=10,
                )
                if r.status_code == 200:
                    answer = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        elapsed = time.monotonic() - start
        assert answer is not None, (tmp_path / "serve.log").read_text()[-3000:]
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        assert answer["model"] == "tiny"
        print(f"\nserve run -> first answer: {elapsed:.1f}s")
        assert_ray_is_closed(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
