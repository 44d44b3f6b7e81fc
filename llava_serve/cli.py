"""The `llava-serve` command."""

from __future__ import annotations

import argparse

from llava_serve import tiny


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llava-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-tiny-model", help="write the embedded random-weight checkpoint to DIR")
    make.add_argument("dir")
    make.add_argument("--preset", choices=sorted(tiny.PRESETS), default="tiny")
    make.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "make-tiny-model":
        print(tiny.build(args.dir, args.preset, args.seed))


if __name__ == "__main__":
    main()
