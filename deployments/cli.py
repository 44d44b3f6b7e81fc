"""The `llava-serve` command: `serve MODEL` (one command for any checkpoint) and `make-tiny-model`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from llava_serve.config import AppConfig, from_serve_app
from llava_serve.models import tiny

# `serve` flags and where each lands in `AppConfig`; None means "leave the config's value".
SERVE_FLAGS: dict[str, tuple[str, type, str]] = {
    "served_name": ("model.served_name", str, "name reported by /v1/models and accepted as `model`"),
    "dtype": ("model.dtype", str, "auto | float32 | float16 | bfloat16 (auto: fp16 on CUDA, fp32 on CPU)"),
    "device": ("model.device", str, "auto | cpu | cuda"),
    "num_gpus": ("llava_model.num_gpus", float, "GPUs reserved by the model replica"),
    "max_batch_size": ("engine.max_batch_size", int, "requests decoded together per step"),
    "max_tokens_limit": ("generation.max_tokens_limit", int, "largest max_tokens a request may ask for"),
    "max_inflight_requests": ("admission.max_inflight_requests", int, "past this, an immediate 503"),
}


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """`tree[a][b][c] = value` for `dotted` "a.b.c", making the levels it lacks."""
    *path, leaf = dotted.split(".")
    for key in path:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _get(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def _file_args(path: str) -> dict:
    """A config file's app args: a Serve config (`applications[0]`: its args and its deployments'
    runtime knobs) or `AppConfig`'s shape."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if "applications" in data:
        return from_serve_app(data["applications"][0])
    return data


def app_config(args: argparse.Namespace) -> AppConfig:
    """The config file (or every default, as in serve_config.yaml) with the flags laid over it."""
    tree = _file_args(args.config) if args.config else {}
    set_path(tree, "model.name", args.model)
    for flag, (dotted, _, _) in SERVE_FLAGS.items():
        if getattr(args, flag) is not None:
            set_path(tree, dotted, getattr(args, flag))
    for item in args.set:
        dotted, _, raw = item.partition("=")
        set_path(tree, dotted, yaml.safe_load(raw))
    if args.api_key:
        auth = tree.setdefault("auth", {})
        auth["api_keys"] = [*auth.get("api_keys", []), *args.api_key]
    return AppConfig.model_validate(tree)


def _add_serve(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve MODEL ('tiny', a checkpoint directory or a hub id) until interrupted",
        description="Starts the same Ray Serve app as serve_config.yaml, with these settings laid "
        "over it, waits until it answers, and prints where to reach it.",
    )
    defaults = AppConfig().model_dump()
    serve.add_argument("model", help="'tiny', a local checkpoint directory, or a hub id")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    for flag, (dotted, kind, text) in SERVE_FLAGS.items():
        default = _get(defaults, dotted)
        serve.add_argument(
            f"--{flag.replace('_', '-')}",
            type=kind,
            default=None,  # unset flags leave --config's value
            help=f"{text} ({dotted}; default: {default}, or --config's)",
        )
    serve.add_argument(
        "--config", default=None, help="a serve_config.yaml-shaped file to start from (default: none)"
    )
    serve.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting, e.g. --set images.max_bytes=1048576 (repeatable; values are YAML)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this bearer key (repeatable); with none here, in auth.* or in "
        "$LLAVA_SERVE_API_KEYS, the API is open to anyone who can reach it",
    )
    serve.add_argument(
        "--address",
        default="local",
        help="the Ray cluster to join (default: local, a cluster of its own)",
    )
    serve.add_argument(
        "--timeout-s", type=float, default=600.0, help="give up if it does not answer by then (default: 600)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-tiny-model", help="write the embedded random-weight checkpoint to DIR")
    make.add_argument("dir")
    make.add_argument("--preset", choices=sorted(tiny.PRESETS), default="tiny")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument(
        "--arch", choices=tiny.ARCHS, default="llava", help="architecture (default: llava, 1.5)"
    )
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "make-tiny-model":
        print(tiny.build(args.dir, args.preset, args.seed, args.arch))
    elif args.command == "serve":
        from deployments.cluster import prepare_local_cluster

        config = app_config(args)
        # Before Ray is imported: it reads these settings once, at import.
        if args.address == "local":
            single = args.host in ("127.0.0.1", "localhost", "::1")
            prepare_local_cluster(single_machine=single, edge_max_inflight=config.edge_max_inflight())
        from deployments.launch import serve_until_interrupted  # Ray is imported only here

        serve_until_interrupted(config, args.host, args.port, args.address, args.timeout_s, announce)


def announce(base_url: str, config: AppConfig) -> None:
    """What a person needs once the server answers."""
    request = {"model": config.model.public_name, "messages": [{"role": "user", "content": "Hello"}]}
    playground = f"  Playground:      {base_url}/\n" if config.ingress.playground else ""
    auth = " -H 'authorization: Bearer $KEY'" if _has_keys(config) else ""
    print(
        f"\nllava-serve is serving {config.model.name!r} as {config.model.public_name!r}\n"
        f"{playground}"
        f"  OpenAI base URL: {base_url}/v1\n"
        f"  Try it:\n"
        f"    curl {base_url}/v1/chat/completions -H 'content-type: application/json'{auth} \\\n"
        f"      -d '{json.dumps({**request, 'max_tokens': 32})}'\n"
        "  Ctrl-C stops it.",
        flush=True,
    )


def _has_keys(config: AppConfig) -> bool:
    from llava_serve.api.auth import load_keys

    return bool(load_keys(config.auth))


if __name__ == "__main__":
    main()
