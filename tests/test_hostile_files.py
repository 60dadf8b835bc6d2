"""Hostile model files: every load succeeds or fails with one short, clean TorchlessError line.

A seeded generator mutates two tiny valid bases, a GGUF file (Q8_0 weights, a byte-level BPE
vocabulary, a ChatML template) and a Hugging Face folder (config.json, safetensors with its index,
tokenizer.json, tokenizer_config.json): truncations, byte and bit damage in the header, extreme
integers written over header fields, hostile metadata and config values (NaN, inf, 2.5, true,
strings, arrays, huge and negative numbers), corrupt vocabularies and merges, hostile templates,
non-finite weights and scales, index entries that leave the folder.

    python tests/test_hostile_files.py 5000     # a larger campaign: counts by outcome
"""

from __future__ import annotations

import json
import random
import struct
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # model_factory, when run as a script

from model_factory import tiny_bpe_vocab, tiny_tokenizer_metadata, write_random_gguf, write_tiny_hf_folder  # noqa: E402

from torchless import Mistral, Parameters  # noqa: E402
from torchless.errors import TorchlessError  # noqa: E402
from torchless.formats.gguf import GGUFFile  # noqa: E402

CASES_PER_RUN = 1000
MAX_MESSAGE = 400

HOSTILE_NUMBERS = [float("nan"), float("inf"), -float("inf"), 0, -1, 2.5, True, 2**31, 2**32 - 1,
                   2**63, -2**63, 10**30, "64", [64, 64], {"a": 1}, None, 1e-300, -0.0]
HOSTILE_TEMPLATES = [
    "{{ 'x' * 10**9 }}", "{{ [0] * 10**9 }}", "{{ 'x' | center(10**9) }}", "{{ '%999999999s' % 'x' }}",
    "{{ '{:>999999999}'.format('x') }}", "{{ 1/0 }}", "{{ 'a' - 1 }}", "{% for %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{{ ''.__class__.__mro__ }}",
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{{ raise_exception('no') }}", "\x00\x1b[31m{{ messages[5] }}",
]
EXTREME_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 255]
NOT_UTF8 = "@@not-utf-8@@"  # the gguf writer takes only valid strings: these bytes are patched in


# -- the two bases ----------------------------------------------------------------------------

def write_base_gguf(path: Path) -> Path:
    return write_random_gguf(path, "Q8_0", seed=3, hidden=64, inter=128, vocab=len(tiny_bpe_vocab()[0]),
                             context=64, metadata=tiny_tokenizer_metadata())


def load_everything(path: Path) -> None:
    """What a user's first command does with a model, short of allocating its KV cache."""
    params = Parameters.load(path)
    tokenizer = params.tokenizer
    Mistral.load(params, fast=False)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello the world"}])
    tokenizer.decode(tokenizer.encode(text))


def outcome(path: Path) -> str:
    """'ok', or the TorchlessError class; anything else raises AssertionError naming it."""
    try:
        load_everything(path)
    except TorchlessError as e:
        message = str(e)
        assert message.isprintable() and len(message) < MAX_MESSAGE, f"bad message: {message[:500]!r}"
        return type(e).__name__
    return "ok"


# -- GGUF mutations -----------------------------------------------------------------------------

def _gguf_type(value):
    """The GGUF value type a hostile Python value is written as (an int too large for u64 as f64)."""
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, float) or (isinstance(value, int) and value >= 2**64):
        return gguf.GGUFValueType.FLOAT64
    if isinstance(value, int):
        return gguf.GGUFValueType.INT64 if value < 0 else gguf.GGUFValueType.UINT64
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    return gguf.GGUFValueType.ARRAY


def rewrite_gguf(base: Path, out: Path, metadata: dict, tensor_bytes: dict | None = None) -> Path:
    """`base` with its metadata replaced by `metadata` (Python values) and some tensors' stored
    bytes replaced."""
    source = GGUFFile(base)
    w = gguf.GGUFWriter(str(out), source.metadata["general.architecture"])
    for key, value in metadata.items():
        if key in ("general.architecture", "GGUF.version"):
            continue
        if value is None or isinstance(value, dict):
            continue  # not writable as GGUF: the key is simply absent
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, list):
            if not value:
                continue
            w.add_array(key, value)
        else:
            vtype = _gguf_type(value)
            w.add_key_value(key, float(value) if vtype == gguf.GGUFValueType.FLOAT64 else value, vtype)
    for name, info in source.tensor_infos.items():
        data = np.array(source._map[info.start:info.stop])
        if tensor_bytes and name in tensor_bytes:
            data = tensor_bytes[name]
        w.add_tensor(name, data.reshape(info.shape[:-1] + (-1,)), raw_dtype=gguf.GGMLQuantizationType(info.ggml_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out.write_bytes(out.read_bytes().replace(NOT_UTF8.encode(), b"\xff\xfe" + b"x" * (len(NOT_UTF8) - 2)))
    return out


def mutate_gguf(base: Path, out: Path, rng: random.Random) -> str:
    """Write one mutation of `base` to `out`; return what was done."""
    blob = bytearray(base.read_bytes())
    header_end = GGUFFile(base).data_offset
    kind = rng.choice(["truncate", "bytes", "u64", "u32", "metadata", "metadata", "tokens", "merges",
                       "template", "tensor"])
    if kind == "truncate":
        cut = rng.randrange(len(blob))
        out.write_bytes(blob[:cut])
        return f"truncate at {cut}"
    if kind == "bytes":
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(header_end)
            blob[at] = rng.randrange(256) if rng.random() < 0.5 else blob[at] ^ (1 << rng.randrange(8))
        out.write_bytes(blob)
        return "bytes"
    if kind in ("u64", "u32"):
        fmt = "<Q" if kind == "u64" else "<I"
        at = rng.randrange(header_end - 8)
        struct.pack_into(fmt, blob, at, rng.choice(EXTREME_U64) % (2**64 if kind == "u64" else 2**32))
        out.write_bytes(blob)
        return f"{kind} at {at}"
    metadata = dict(GGUFFile(base).metadata)
    if kind == "metadata":
        key = rng.choice([k for k in metadata if not k.startswith("tokenizer.ggml.t")] + ["llama.attention.key_length",
                          "llama.attention.sliding_window", "llama.rope.dimension_count"])
        metadata[key] = rng.choice(HOSTILE_NUMBERS)
        return f"metadata {key}={metadata[key]!r}" if rewrite_gguf(base, out, metadata) else ""
    if kind in ("tokens", "merges"):
        key = f"tokenizer.ggml.{kind}"
        items = list(metadata[key])
        i = rng.randrange(len(items))
        items[i] = rng.choice(["", " ", "a b c", "\x00", NOT_UTF8, items[0], "x" * 10000, "\x1b[31m"])
        metadata[key] = items
        return f"{key}[{i}]" if rewrite_gguf(base, out, metadata) else ""
    if kind == "template":
        metadata["tokenizer.chat_template"] = rng.choice(HOSTILE_TEMPLATES)
        return "template" if rewrite_gguf(base, out, metadata) else ""
    source = GGUFFile(base)  # tensor data: non-finite norm values or quantization scales
    name = rng.choice(list(source.tensor_infos))
    data = np.array(source._map[source.tensor_infos[name].start:source.tensor_infos[name].stop])
    bad = np.array([rng.choice([np.nan, np.inf, -np.inf])], np.float32)
    if source.tensor_infos[name].ggml_type == gguf.GGMLQuantizationType.F32:
        data.view(np.float32)[rng.randrange(data.size // 4)] = bad[0]
    else:  # a Q8_0 block: its f16 scale comes first
        block = rng.randrange(data.size // 34)
        data[block * 34:block * 34 + 2] = bad.astype(np.float16).view(np.uint8)
    return f"tensor {name}" if rewrite_gguf(base, out, metadata, {name: data}) else ""


# -- safetensors-folder mutations ---------------------------------------------------------------

def mutate_folder(base: Path, out: Path, rng: random.Random) -> str:
    """Copy `base` to `out` (a fresh folder), damaged in one way; return what was done."""
    out.mkdir()
    for f in base.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    kind = rng.choice(["config", "config", "config_file", "header", "header_bytes", "truncate",
                       "index", "tokenizer_config", "tokenizer_json", "norm"])
    if kind == "config":
        config = json.loads((out / "config.json").read_text())
        key = rng.choice(list(config) + ["head_dim", "sliding_window", "rope_scaling", "rope_parameters"])
        config[key] = rng.choice(HOSTILE_NUMBERS)
        (out / "config.json").write_text(json.dumps(config))
        return f"config {key}={config[key]!r}"
    if kind == "config_file":
        (out / "config.json").write_bytes(rng.choice([b"\xff\xfe{}", b"[1, 2]", b"{", b"[" * 100000, b"null"]))
        return "config file"
    st = out / "model.safetensors"
    blob = bytearray(st.read_bytes())
    header_len = struct.unpack_from("<Q", blob)[0]
    if kind == "header":
        header = json.loads(blob[8:8 + header_len])
        name = rng.choice([n for n in header if n != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = rng.choice(HOSTILE_NUMBERS + [[64.5, 64], [-1, 64], ["64", 64], "F64", [0, 2**70]])
        text = json.dumps(header).encode()
        st.write_bytes(struct.pack("<Q", len(text)) + text + bytes(blob[8 + header_len:]))
        return f"header {name}.{field}"
    if kind == "header_bytes":
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(8 + header_len)] = rng.randrange(256)
        st.write_bytes(blob)
        return "header bytes"
    if kind == "truncate":
        st.write_bytes(blob[:rng.randrange(len(blob))])
        return "truncate"
    if kind == "index":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        name = rng.choice(list(index["weight_map"]))
        index["weight_map"][name] = rng.choice(["/etc/hostname", "../x.safetensors", "", "a\x00b", 5, [1],
                                                "sub/../../x", "missing.safetensors", "\\etc\\hostname"])
        if rng.random() < 0.2:
            index = rng.choice([[], {"weight_map": [1]}, {"weight_map": "x"}])
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
        return "index"
    if kind == "tokenizer_config":
        config = json.loads((out / "tokenizer_config.json").read_text())
        key = rng.choice(["chat_template", "chat_template", "add_bos_token", "bos_token", "eos_token"])
        config[key] = rng.choice(HOSTILE_TEMPLATES + HOSTILE_NUMBERS + [[{"name": 1}], [5]])
        if rng.random() < 0.2:
            config = [1, 2]
        (out / "tokenizer_config.json").write_text(json.dumps(config))
        return "tokenizer_config"
    if kind == "tokenizer_json":
        data = bytearray((out / "tokenizer.json").read_bytes())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        (out / "tokenizer.json").write_bytes(data)
        return "tokenizer.json bytes"
    header = json.loads(blob[8:8 + header_len])  # a NaN or inf in a norm weight
    begin = 8 + header_len + header["model.norm.weight"]["data_offsets"][0]
    blob[begin:begin + 4] = np.array([rng.choice([np.nan, np.inf])], np.float32).tobytes()
    st.write_bytes(blob)
    return "norm"


# -- the campaign -------------------------------------------------------------------------------

def campaign(n: int, root: Path, seed: int = 0) -> Counter:
    """Run n seeded mutations (alternating GGUF and folder) and count outcomes; a load that ends
    in anything but success or a clean TorchlessError raises, naming the case."""
    base_gguf = write_base_gguf(root / "base.gguf")
    base_folder = write_tiny_hf_folder(root / "base_hf")
    counts = Counter()
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        case = root / f"case{i}"
        if i % 2:
            what = mutate_folder(base_folder, case, rng)
            path = case
        else:
            path = case.with_suffix(".gguf")
            what = mutate_gguf(base_gguf, path, rng)
        try:
            result = outcome(path)
        except Exception as e:  # noqa: BLE001 - reported with the case that caused it
            raise AssertionError(f"case {i} ({what}): {type(e).__name__}: {str(e)[:300]}") from e
        counts[(("gguf", "folder")[i % 2], what.split()[0], result)] += 1
    return counts


def test_mutated_files_fail_cleanly(tmp_path):
    counts = campaign(CASES_PER_RUN, tmp_path)
    assert sum(counts.values()) == CASES_PER_RUN
    assert any(result == "ok" for *_, result in counts), "no mutation loaded: the bases are broken"


if __name__ == "__main__":
    import tempfile
    import time

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        counts = campaign(n, Path(tmp), seed=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    by_outcome = Counter()
    for (fmt, _, result), k in counts.items():
        by_outcome[fmt, result] += k
    for (fmt, result), k in sorted(by_outcome.items()):
        print(f"{fmt:7} {result:22} {k}")
    print(f"{n} cases in {time.perf_counter() - start:.0f} s")


# -- the isolated harness: each case in a worker process under time and memory limits ----------

ISOLATED_CASES = 2000


def _fuzz_models():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / "fuzz_models.py"
    spec = importlib.util.spec_from_file_location("fuzz_models", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_models"] = module  # the spawned workers import it by this name
    sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(module)
    return module


def test_fuzz_sample_in_isolated_workers():
    """tools/fuzz_models.py on a seeded sample: every case a clean error or a model that runs
    (not another exception, a hang, a crash or running out of memory)."""
    fuzz = _fuzz_models()
    # 60 s, not 10: a case whose mutation gives a tensor a type no earlier case used compiles
    # that type's kernels first (seed 10000820, MXFP4: 10-20 s on 2 busy cores with a cold
    # cache). The real hangs this catches ran for minutes.
    results = fuzz.run_isolated(fuzz.seeds_of(1, ISOLATED_CASES), workers=2, time_limit=60.0)
    assert len(results) == ISOLATED_CASES
    bad = [r for r in results if r["cls"] not in ("clean-error", "ok")]
    assert not bad, "\n" + fuzz.table(results)
    assert any(r["cls"] == "ok" for r in results), "no mutation loaded: the bases are broken"
