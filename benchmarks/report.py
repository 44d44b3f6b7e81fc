"""What every benchmark does at the end: keep the run's arguments with its results, write JSON."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path


def commit() -> str:
    """The commit the benchmark ran on (with `+dirty` when the tree had changes)."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def save(results: dict, args: argparse.Namespace) -> None:
    results["args"] = vars(args)
    results["commit"] = commit()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
