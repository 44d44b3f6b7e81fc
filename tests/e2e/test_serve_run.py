"""`serve run serve_config.yaml` from the repository root, as `make serve` runs it, starts, answers
and keeps Ray's own endpoints closed (a subprocess smoke test)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from tests.support.client import stream_gaps
from tests.support.raycheck import assert_ray_is_closed

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
        cluster = assert_ray_is_closed(proc.pid)
        redeploy_runtime_knob_mid_stream(tmp_path, env, cluster)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def replicas(cluster: dict) -> dict[str, list[str]]:
    """Actor ids of each deployment's running replicas, from the dashboard's Serve API."""
    r = httpx.get(
        f"http://{cluster['dashboard']}/api/serve/applications/", headers=cluster["token"], timeout=10
    )
    deployments = r.json()["applications"]["llava"]["deployments"]
    return {name: sorted(rep["actor_id"] for rep in d["replicas"]) for name, d in deployments.items()}


def user_config(cluster: dict, deployment: str) -> dict:
    r = httpx.get(
        f"http://{cluster['dashboard']}/api/serve/applications/", headers=cluster["token"], timeout=10
    )
    return r.json()["applications"]["llava"]["deployments"][deployment]["deployment_config"]["user_config"]


def catch(fn) -> list[BaseException]:
    try:
        fn()
    except BaseException as e:  # raised again on the test's own thread
        return [e]
    return []


def redeploy_runtime_knob_mid_stream(tmp_path: Path, env: dict, cluster: dict) -> None:
    """`serve deploy` of serve_config.yaml with only http.sse_keepalive_s changed, while a stream
    runs: the stream completes, and no replica is replaced (the model keeps its weights)."""
    before = replicas(cluster)
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    (ingress,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress"]
    ingress["user_config"]["http"]["sse_keepalive_s"] = 7.0
    changed = tmp_path / "serve_config.yaml"
    changed.write_text(yaml.safe_dump(config))
    serve_bin = Path(sys.executable).parent / "serve"

    applied_at = []

    def deploy():
        done = subprocess.run(
            [str(serve_bin), "deploy", str(changed), "--address", f"http://{cluster['dashboard']}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        for _ in range(120):
            if user_config(cluster, "Ingress")["http"]["sse_keepalive_s"] == 7.0:
                applied_at.append(time.monotonic())
                return
            time.sleep(0.25)
        raise AssertionError("the new user_config never reached the Ingress")

    # Streams run back to back until the change has landed, so that one is in flight when it
    # does however fast this machine streams; each must end with [DONE].
    failed: list[BaseException] = []
    worker = threading.Thread(target=lambda: failed.extend(catch(deploy)))
    spans = []
    worker.start()
    while worker.is_alive() or not spans:
        began = time.monotonic()
        stream_gaps(URL, max_tokens=400)
        spans.append((began, time.monotonic()))
    worker.join()
    if failed:
        raise failed[0]
    assert applied_at, "the new user_config never reached the Ingress"
    after = replicas(cluster)
    assert after["LlavaModel"] == before["LlavaModel"] and after["Ingress"] == before["Ingress"], (
        before,
        after,
    )
    into = applied_at[0] - spans[0][0]
    print(f"serve deploy of a runtime knob: applied {into:.1f}s in, over {len(spans)} streams")
