"""`llava-serve serve`'s options: every one listed with its default, laid over a config file."""

import subprocess
import sys
from pathlib import Path

import yaml

from deployments.cli import SERVE_FLAGS, app_config, build_parser, main

ROOT = Path(__file__).resolve().parents[3]


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_help_lists_every_option_with_its_default():
    out = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag, (dotted, _, _) in SERVE_FLAGS.items():
        assert f"--{flag.replace('_', '-')}" in out and dotted in out
    for flag in ("--host", "--port", "--config", "--set", "--address"):
        assert flag in out
    assert "default: 16" in out and "default: 8000" in out and "default: auto" in out


def test_flags_are_laid_over_the_config_file(tmp_path):
    config = tmp_path / "serve.yaml"
    serve_config = yaml.safe_load((ROOT / "configs/llava-1.5-7b.yaml").read_text())
    config.write_text(yaml.safe_dump(serve_config))
    args = parse(
        "/models/llava",
        "--config",
        str(config),
        "--max-batch-size",
        "4",
        "--dtype",
        "bfloat16",
        "--set",
        "images.max_bytes=1024",
        "--set",
        "ingress.num_replicas=1",
    )
    got = app_config(args)
    assert got.model.name == "/models/llava" and got.model.dtype == "bfloat16"
    assert got.engine.max_batch_size == 4 and got.images.max_bytes == 1024
    assert got.llava_model.num_gpus == 1  # from the file, as no flag set it
    assert got.engine.max_queue == 512 and got.model.served_name == "llava-1.5-7b"


def test_without_a_config_it_is_serve_config_yamls_app():
    from llava_serve.config import AppConfig

    assert app_config(parse("tiny")) == AppConfig()


def test_make_tiny_model_still_works(tmp_path, capsys):
    main(["make-tiny-model", str(tmp_path / "m")])
    assert (tmp_path / "m" / "config.json").exists()
