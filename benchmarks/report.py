"""What every benchmark does at the end: keep the run's arguments with its results, write JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def save(results: dict, args: argparse.Namespace) -> None:
    results["args"] = vars(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
