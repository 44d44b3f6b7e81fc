"""`llava-serve serve tiny --port N` in a subprocess: it answers, says where, keeps Ray's own
endpoints closed, and stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.cluster import free_port
from tests.support.raycheck import assert_ray_is_closed


def test_llava_serve_serve_tiny_answers_and_stops_cleanly(tiny_dir, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "RAY_ADDRESS": "",  # a cluster of its own, apart from the test session's
        "LLAVA_SERVE_CACHE": str(Path(tiny_dir).parent),  # 'tiny' is already built there
    }
    cli = Path(sys.executable).parent / "llava-serve"
    log = tmp_path / "cli.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(cli), "serve", "tiny", "--port", str(port), "--timeout-s", "240"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        start = time.monotonic()
        while "OpenAI base URL" not in log.read_text():
            assert proc.poll() is None and time.monotonic() - start < 240, log.read_text()[-3000:]
            time.sleep(0.5)
        printed = log.read_text()
        base = f"http://127.0.0.1:{port}"
        assert f"OpenAI base URL: {base}/v1" in printed and f"curl {base}/v1/chat/completions" in printed
        assert f"Playground:      {base}/" in printed and httpx.get(f"{base}/").status_code == 200
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert_ray_is_closed(proc.pid)
        drains_on_sigterm(proc, base)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0, log.read_text()[-3000:]


def drains_on_sigterm(proc: subprocess.Popen, base: str) -> None:
    """SIGTERM (what a process manager sends) while a stream runs: new requests get a 503, the
    stream finishes whole with [DONE], then the server exits."""
    chat = f"{base}/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Talk."}], "temperature": 0}
    with httpx.stream("POST", chat, json=body | {"max_tokens": 600, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while httpx.post(chat, json=body | {"max_tokens": 1}, timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "new requests were still admitted while draining"
            time.sleep(0.05)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest), rest[-3:]
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    assert proc.wait(60) == 0
