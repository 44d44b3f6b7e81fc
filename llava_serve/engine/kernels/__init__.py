"""The engine's own CPU ops (`step_ops.cpp`, `products.cpp`, `tiles.cpp`, `attention.cpp`), built on
this machine at first use.

They are compiled with torch's extension builder (gcc and ninja, ~35 s on two cores) for this
CPU's instruction set, once per machine and source: the library lands in the llava-serve cache
directory (`LLAVA_SERVE_CACHE`, default `~/.cache/llava-serve`) under a name made of the source's,
torch's and the CPU's fingerprints, and every later process loads it in milliseconds. Each build
runs in a directory of its own and the library is renamed into place, so processes that start
together (a Serve app's replicas) never wait on each other, and one killed mid-build leaves no
lock behind for the next. Without a compiler the engine runs transformers' ops instead (`load`
returns None and says why in the log).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch

from llava_serve.models.tiny import default_cache_dir

logger = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(name) for name in ("step_ops.cpp", "products.cpp", "tiles.cpp", "attention.cpp")
]
HEADERS = [Path(__file__).with_name("vec.h")]
# -ffp-contract=off: no fused multiply-add merges two of transformers' roundings into one (the
# products' multiply-adds are explicit).
# -fopenmp: `at::parallel_for` runs on torch's OpenMP threads (torch has loaded its libgomp under
# the soname this library asks for, so there is one runtime), and the greedy pick's `omp simd`
# reductions vectorize.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


def _cpu_flags() -> str:
    """The instruction sets `-march=native` builds for (a cache copied to another CPU rebuilds)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for source in [*SOURCES, *HEADERS]:
        digest.update(source.read_bytes())
    for part in (torch.__version__, " ".join(FLAGS), _cpu_flags()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


@functools.cache
def load():
    """`torch.ops.llava_serve` with the step ops, built or loaded from the cache; None if they
    cannot be built here."""
    from torch.utils import cpp_extension

    library = default_cache_dir() / "kernels" / f"step_ops-{_fingerprint()}.so"
    try:
        if library.exists():
            torch.ops.load_library(str(library))
            return torch.ops.llava_serve
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as build:
            cpp_extension.load(  # loads the library into this process too
                name="llava_serve_step_ops",
                sources=[str(source) for source in SOURCES],
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=build,
                is_python_module=False,
            )
            os.replace(Path(build) / "llava_serve_step_ops.so", library)
    except Exception as e:  # no compiler, no ninja, a read-only cache: transformers' ops serve
        logger.warning("the engine's CPU step ops could not be built (%s); using torch's ops", e)
        return None
    return torch.ops.llava_serve
