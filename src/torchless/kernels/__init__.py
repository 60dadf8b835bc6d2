"""The numeric kernels (numba).

Their compiled code is cached on disk in a folder named by a hash of every kernel source file.
numba keys a cached function on its own file's text only, so a kernel that calls (and inlines) one
from another file kept its old copy after that other file changed: an upgrade that changed
qmatmul.py's Q5 tile but not gemm.py ran gemm's cached expansion with the old tile, silently
wrong weights. Hashing them all together makes any change recompile everything, once.

On Intel cores with AVX-512 the kernels are compiled with Haswell's scheduling model and this
host's instruction set (see `tuning_cpu`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import llvmlite.binding
import numba

from ..userdirs import cache_dir


def source_hash(folder: Path = Path(__file__).parent) -> str:
    """A hash of the text of every .py file in folder (the kernels), in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# A folder of another version's kernels (~40 MB) not used for this long is deleted.
STALE_AFTER_DAYS = 30


INT16_ENV = "TORCHLESS_INT16_ACTIVATIONS"


def int16_activations_requested() -> bool:
    """$TORCHLESS_INT16_ACTIVATIONS: 1/true/yes/on asks for the int16-activation kernels of
    batched products (see int16_tiles); unset, empty, 0/false/no/off for float32. Another value
    is reported in one line and taken as off."""
    value = os.environ.get(INT16_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        print(f"torchless: {INT16_ENV}={value} is not 1 or 0; using float32 activations", file=sys.stderr)
    return False


INT16_REQUESTED = int16_activations_requested()  # read once, when the kernels are first imported


def _use_cache_keyed_by_all_sources() -> None:
    # Before any kernel module is imported: numba reads CACHE_DIR when a cached function is
    # decorated. $NUMBA_CACHE_DIR, when set, still decides where; the hash goes under it. The
    # int16 choice is compiled into the kernels (a global numba freezes), so it has its own folder.
    base = Path(numba.config.CACHE_DIR) if numba.config.CACHE_DIR else cache_dir() / "numba"
    here = base / f"kernels-{source_hash()}{'-int16' if INT16_REQUESTED else ''}"
    numba.config.CACHE_DIR = os.fspath(here)
    try:
        here.mkdir(parents=True, exist_ok=True)
        os.utime(here)  # in use: its mtime says so to other versions' pruning
        cutoff = time.time() - STALE_AFTER_DAYS * 86400
        for old in base.glob("kernels-*"):
            if old != here and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:  # a read-only home: numba falls back to caching beside the sources
        pass


# LLVM's names for Intel cores with AVX-512 (Knights Landing/Mill aside).
INTEL_AVX512 = frozenset({
    "skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake-client",
    "icelake-server", "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids",
    "graniterapids", "graniterapids-d", "diamondrapids"})


def tuning_cpu(choice: str, host: str) -> str | None:
    """The CPU model LLVM schedules the kernels for, or None for the host's own.

    choice: $TORCHLESS_CPU_TUNING: "auto" (default), "host", or an LLVM CPU name. The instruction
    set stays the host's whatever the model (numba passes the host's features either way), so
    no choice can emit an instruction this CPU lacks.

    Why "auto" picks Haswell on Intel AVX-512 cores: on an Emerald Rapids VM the decode matvecs
    ran faster by a median 1.82x for Q4_1 (1.14-1.97), 1.53x for Q8_0 (1.08-1.85) and 1.51x for
    Q4_K (1.16-1.79): 18 ratios each, three matrix sizes in 3 rounds of
    `NUMBA_NUM_THREADS=1 python benchmarks/bench_decode_kernels.py`, the host's model alternating
    with two builds under NUMBA_CPU_NAME=haswell (same features); SmolLM2 decode at 1 thread
    1.39x (median of 3 alternating pairs of benchmarks/profile_decode.py). The other names in
    INTEL_AVX512 are assumed to behave alike (not measured); other hosts keep their own model."""
    if choice == "auto":
        return "haswell" if host in INTEL_AVX512 else None
    return None if choice == "host" else choice


def llvm_knows_cpu(name: str) -> bool:
    """Whether LLVM recognizes a CPU name. It tells only on stderr ("is not a recognized
    processor"), and would print that at every compile, so stderr is read around making one
    target machine for the name."""
    llvmlite.binding.initialize_native_target()
    read, write = os.pipe()
    saved = os.dup(2)
    os.dup2(write, 2)
    try:
        llvmlite.binding.Target.from_default_triple().create_target_machine(cpu=name)
    finally:
        os.dup2(saved, 2)
        os.close(write)
        os.close(saved)
    os.set_blocking(read, False)
    try:
        said = os.read(read, 65536)
    except BlockingIOError:  # nothing was written
        said = b""
    finally:
        os.close(read)
    return b"not a recognized processor" not in said


def _tune_for_this_cpu() -> None:
    # numba reads CPU_NAME when it first compiles; an explicit NUMBA_CPU_NAME/FEATURES wins.
    if numba.config.CPU_NAME is None and numba.config.CPU_FEATURES is None:
        choice = os.environ.get("TORCHLESS_CPU_TUNING", "auto").strip() or "auto"
        if choice not in ("auto", "host") and not llvm_knows_cpu(choice):
            print(f"torchless: TORCHLESS_CPU_TUNING={choice} is not a CPU name LLVM knows; "
                  "using auto", file=sys.stderr)
            choice = "auto"
        numba.config.CPU_NAME = tuning_cpu(choice, llvmlite.binding.get_host_cpu_name())


_use_cache_keyed_by_all_sources()
_tune_for_this_cpu()
