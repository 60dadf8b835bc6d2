"""Where torchless keeps files of its own on the user's machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$TORCHLESS_CACHE, else $XDG_CACHE_HOME/torchless, else ~/.cache/torchless."""
    if os.environ.get("TORCHLESS_CACHE"):
        return Path(os.environ["TORCHLESS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "torchless"
