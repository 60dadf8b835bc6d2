"""The numeric kernels (numba).

Their compiled code is cached on disk in a folder named by a hash of every kernel source file.
numba keys a cached function on its own file's text only, so a kernel that calls (and inlines) one
from another file kept its old copy after that other file changed: an upgrade that changed
qmatmul.py's Q5 tile but not gemm.py ran gemm's cached expansion with the old tile, silently
wrong weights. Hashing them all together makes any change recompile everything, once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

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


def _use_cache_keyed_by_all_sources() -> None:
    # Before any kernel module is imported: numba reads CACHE_DIR when a cached function is
    # decorated. $NUMBA_CACHE_DIR, when set, still decides where; the hash goes under it.
    base = Path(numba.config.CACHE_DIR) if numba.config.CACHE_DIR else cache_dir() / "numba"
    here = base / f"kernels-{source_hash()}"
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


_use_cache_keyed_by_all_sources()
