"""The test cluster's settings: the app config every e2e test serves, and free loopback ports."""

from __future__ import annotations

import socket

from llava_serve.config import AppConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(tiny_dir: str) -> AppConfig:
    small = {"num_cpus": 0.1}
    return AppConfig.model_validate(
        {
            "model": {"name": tiny_dir, "served_name": "llava-tiny"},
            "generation": {"max_tokens": 16},
            # The default SSRF policy, plus one host the fetch tests serve from (see image_server).
            "images": {"allow_hosts": ["127.0.0.2/32"], "max_bytes": 1024 * 1024, "total_timeout_s": 2.0},
            "ingress": small,
            "image_preprocessor": small,
            "prompt_tokenizer": small,
            "llava_model": {"num_cpus": 0.5, "max_ongoing_requests": 128},
        }
    )
