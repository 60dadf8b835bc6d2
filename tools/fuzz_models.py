#!/usr/bin/env python3
"""Fuzz the model loaders: seeded mutations of a tiny GGUF file and a tiny safetensors folder, each
loaded in an isolated worker process under a time and a memory limit, and classified.

    python tools/fuzz_models.py --cases 10000            # the full corpus: a table of classes
    python tools/fuzz_models.py --cases 2000 --seed 7    # another sample
    python tools/fuzz_models.py --replay 123             # one case in this process, with its traceback
    python tools/fuzz_models.py --replay 123 --write /tmp/case   # ... and keep its file or folder

A case is one integer (its seed): even seeds mutate the GGUF base, odd ones the folder, and the
seed alone decides the mutation, so every case can be replayed. `--seed S --cases N` runs the
seeds S*10**7 .. S*10**7 + N - 1. The generator reads and writes GGUF with its own parser and the
`gguf` package, never with torchless, so the same seed is the same file on every tree.

Classes:
    clean-error      a TorchlessError whose message is one printable line under 400 characters
    ok               loads, renders the chat template, and decodes two greedy tokens
    other-exception  any other exception, or a TorchlessError with a bad message
    hang             past the time limit (SIGALRM in the worker, or killed by the parent)
    crash            the worker died of a signal (segfault, abort, ...)
    memory           MemoryError / ENOMEM under the worker's RLIMIT_AS, or died allocating

Workers are long-lived (`multiprocessing`, spawn context): each imports torchless once and takes
many cases, each under `signal.setitimer`; a worker that dies or hangs is replaced.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from multiprocessing.connection import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # model_factory: the tiny bases

CLASSES = ("clean-error", "ok", "other-exception", "hang", "crash", "memory")
BASES = ("gguf", "folder")
MAX_MESSAGE = 400
SEED_STRIDE = 10**7

NOT_UTF8 = "@@not-utf-8@@"  # the gguf writer takes only valid strings: these bytes are patched in
HOSTILE_NUMBERS = [float("nan"), float("inf"), -float("inf"), 0, -1, 2.5, True, 2**31, 2**32 - 1,
                   2**63, -2**63, 10**30, "64", [64, 64], {"a": 1}, None, 1e-300, -0.0, 1, 3]
HOSTILE_TEMPLATES = [
    "{{ 'x' * 10**9 }}", "{{ [0] * 10**9 }}", "{{ 'x' | center(10**9) }}", "{{ '%999999999s' % 'x' }}",
    "{{ '{:>999999999}'.format('x') }}", "{{ 1/0 }}", "{{ 'a' - 1 }}", "{% for %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{{ ''.__class__.__mro__ }}",
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{{ raise_exception('no') }}", "\x00\x1b[31m{{ messages[5] }}", "{% for i in range(10**9) %}x{% endfor %}",
    "{{ cycler.__init__.__globals__ }}", "{{ self.__dict__ }}", "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% for m in messages %}{% for m2 in messages %}{% for c in m2['content'] * 100000 %}{% endfor %}{% endfor %}{% endfor %}",
    "{{ 9**9**9 }}", "{{ messages|tojson(indent=10**9) }}", "{{ lipsum(10**6) }}", "", "{{", NOT_UTF8,
]
EXTREME = [0, 1, 2, 3, 31, 33, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1]
GGUF_KEYS = ["llama.attention.key_length", "llama.attention.value_length", "llama.attention.sliding_window",
             "llama.rope.dimension_count", "llama.rope.scaling.type", "llama.rope.scaling.factor",
             "llama.expert_count", "llama.expert_used_count", "general.alignment", "general.file_type",
             "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
             "tokenizer.ggml.add_eos_token", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.scores"]


# -- GGUF: a layout parser independent of torchless ---------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_TYPE_SIZE = {0: (1, 4), 1: (1, 2), 8: (32, 34)}  # ggml type -> (block elements, block bytes): F32, F16, Q8_0


class GGUFLayout:
    """Where every field of a well-formed GGUF file lies: `fields` is [(region, role, offset,
    size)]; `metadata` {key: (value type, value)}, an array's value being (element type, list);
    `tensors` [{name, dims, type, offset, offset_at}]; `data_offset` where tensor data starts."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.fields: list[tuple[str, str, int, int]] = []
        self.pos = 0
        self._take("<I", "header", "magic")
        self.version = self._take("<I", "header", "version")
        n_tensors = self._take("<Q", "header", "tensor_count")
        n_kv = self._take("<Q", "header", "kv_count")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string("kv", "key")
            vtype = self._take("<I", "kv", "value_type")
            self.metadata[key] = (vtype, self._value(vtype))
        self.kv_end = self.pos
        self.tensors = []
        for _ in range(n_tensors):
            name = self._string("tensor_info", "name")
            dims = [self._take("<Q", "tensor_info", "dim") for _ in range(self._take("<I", "tensor_info", "n_dims"))]
            ggml_type = self._take("<I", "tensor_info", "ggml_type")
            offset_at = self.pos
            self.tensors.append(dict(name=name, dims=dims, type=ggml_type, offset_at=offset_at,
                                     offset=self._take("<Q", "tensor_info", "offset")))
        self.info_end = self.pos
        align = self.metadata.get("general.alignment", (4, 32))[1]
        self.data_offset = -(-self.pos // align) * align
        for t in self.tensors:
            block, size = _TYPE_SIZE[t["type"]]
            t["start"] = self.data_offset + t["offset"]
            t["nbytes"] = math.prod(t["dims"]) // block * size

    def _take(self, fmt, region, role):
        size = struct.calcsize(fmt)
        value = struct.unpack_from(fmt, self.blob, self.pos)[0]
        self.fields.append((region, role, self.pos, size))
        self.pos += size
        return value

    def _string(self, region, role):
        n = self._take("<Q", region, role + "_len")
        self.fields.append((region, role, self.pos, n))
        self.pos += n
        return self.blob[self.pos - n:self.pos].decode("utf-8", "replace")

    def _value(self, vtype):
        if vtype == 8:
            return self._string("kv", "string")
        if vtype == 9:
            sub = self._take("<I", "kv", "array_type")
            return sub, [self._value(sub) for _ in range(self._take("<Q", "kv", "array_len"))]
        return self._take(_SCALAR[vtype], "kv", "value")

    def region(self, name) -> tuple[int, int]:
        return {"header": (0, 24), "kv": (24, self.kv_end), "tensor_info": (self.kv_end, self.info_end)}[name]


def _gguf_type(value):
    import gguf

    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, float) or (isinstance(value, int) and value >= 2**64):
        return gguf.GGUFValueType.FLOAT64
    if isinstance(value, int):
        return gguf.GGUFValueType.INT64 if value < 0 else gguf.GGUFValueType.UINT64
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    return gguf.GGUFValueType.ARRAY


def rewrite_gguf(base: GGUFLayout, out: Path, changes: dict, tensor_bytes: dict | None = None,
                 arch: str | None = None) -> None:
    """`base` written again with metadata `changes` ({key: Python value}; None removes the key)
    and some tensors' stored bytes replaced."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(out), arch if arch is not None else base.metadata["general.architecture"][1])
    keys = [k for k in base.metadata if k != "general.architecture"] + [k for k in changes if k not in base.metadata]
    for key in keys:
        if key in changes:
            value = changes[key]
            if value is None or isinstance(value, dict) or value == []:
                continue  # not writable as GGUF: the key is absent
            if isinstance(value, list):
                w.add_array(key, value)
            else:
                vtype = _gguf_type(value)
                w.add_key_value(key, float(value) if vtype == gguf.GGUFValueType.FLOAT64 else value, vtype)
        else:
            vtype, value = base.metadata[key]
            if vtype == 9:
                w.add_key_value(key, value[1], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType(value[0]))
            else:
                w.add_key_value(key, value, gguf.GGUFValueType(vtype))
    for t in base.tensors:
        data = (tensor_bytes or {}).get(t["name"])
        if data is None:
            data = np.frombuffer(base.blob, np.uint8, t["nbytes"], t["start"])
        shape = tuple(reversed(t["dims"]))
        w.add_tensor(t["name"], data.reshape(shape[:-1] + (-1,)), raw_dtype=gguf.GGMLQuantizationType(t["type"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    blob = out.read_bytes()
    if NOT_UTF8.encode() in blob:
        out.write_bytes(blob.replace(NOT_UTF8.encode(), b"\xff\xfe" + b"x" * (len(NOT_UTF8) - 2)))


def mutate_gguf(base: GGUFLayout, out: Path, rng: random.Random) -> str:
    """Write one mutation of `base` to `out`; return what was done."""
    import numpy as np

    blob = bytearray(base.blob)
    kind = rng.choice(["truncate", "truncate", "flip", "flip", "flip", "extreme", "extreme", "offset",
                       "type", "alignment", "metadata", "metadata", "tokens", "template", "tensor", "arch",
                       "duplicate"])
    if kind == "truncate":  # anywhere, or a few bytes around a field boundary
        if rng.random() < 0.5:
            cut = rng.randrange(len(blob))
        else:
            _, _, at, size = rng.choice(base.fields)
            cut = max(0, at + rng.choice([0, 1, size - 1, size, size + 1]))
        out.write_bytes(blob[:cut])
        return f"truncate at {cut}"
    if kind == "flip":  # bit flips and random bytes in one region
        region = rng.choice(["header", "kv", "tensor_info"])
        lo, hi = base.region(region)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(lo, hi)
            blob[at] = rng.randrange(256) if rng.random() < 0.3 else blob[at] ^ (1 << rng.randrange(8))
        out.write_bytes(blob)
        return f"flip {region}"
    if kind == "extreme":  # an extreme count, length, dimension or type written over one field
        roles = sorted({role for _, role, _, size in base.fields if size in (4, 8) and role not in ("magic", "value")}
                       | {"value"})
        role = rng.choice(roles)
        _, _, at, size = rng.choice([f for f in base.fields if f[1] == role and f[3] in (4, 8)])
        value = rng.choice(EXTREME) % 2**(8 * size)
        struct.pack_into("<Q" if size == 8 else "<I", blob, at, value)
        out.write_bytes(blob)
        return f"extreme {role}={value}"
    if kind == "offset":  # tensor offsets: unaligned, past the end, overlapping another
        t = rng.choice(base.tensors)
        other = rng.choice(base.tensors)
        data_len = len(blob) - base.data_offset
        value = rng.choice([t["offset"] + 1, t["offset"] + 32, other["offset"], other["offset"] + 32, data_len,
                            data_len - 32, data_len + 32, t["offset"] - 32 if t["offset"] >= 32 else 2**63])
        struct.pack_into("<Q", blob, t["offset_at"], value % 2**64)
        out.write_bytes(blob)
        return f"offset {t['name']}={value}"
    if kind == "type":  # unknown or wrong ggml / value types
        if rng.random() < 0.6:
            t = rng.choice(base.tensors)
            value = rng.choice([2, 3, 4, 5, 6, 7, 9, 10, 12, 14, 16, 20, 28, 30, 31, 39, 40, 99, 2**31, 2**32 - 1])
            struct.pack_into("<I", blob, t["offset_at"] - 4, value)
            what = f"type {t['name']}={value}"
        else:
            _, role, at, _ = rng.choice([f for f in base.fields if f[1] in ("value_type", "array_type")])
            value = rng.choice([7, 8, 9, 10, 12, 13, 99, 2**32 - 1])
            struct.pack_into("<I", blob, at, value)
            what = f"type {role}={value}"
        out.write_bytes(blob)
        return what
    if kind == "alignment":
        value = rng.choice([0, 1, 3, 7, 16, 33, 64, 2**31, 2**32 - 1, -1, 2.5, "32"])
        rewrite_gguf(base, out, {"general.alignment": value})
        return f"alignment {value!r}"
    if kind == "metadata":
        key = rng.choice([k for k in base.metadata if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                                  "general.architecture")] + GGUF_KEYS)
        value = rng.choice(HOSTILE_NUMBERS + ["", "x" * 100000, NOT_UTF8, "\x1b[31m", [1.5, 2.5]])
        rewrite_gguf(base, out, {key: value})
        return f"metadata {key}={value!r:.60}"
    if kind == "tokens":
        key = rng.choice(["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"])
        items = list(base.metadata[key][1][1])
        how = rng.choice(["item", "item", "item", "short", "long", "empty"])
        if how == "item":
            i = rng.randrange(len(items))
            if key == "tokenizer.ggml.token_type":
                items[i] = rng.choice([0, 2, 4, 5, 6, 7, 99, -1, 2**31 - 1])
            else:
                items[i] = rng.choice(["", " ", "a b c", "\x00", NOT_UTF8, items[0], "x" * 10000, "\x1b[31m", "a  b",
                                       " a", "a "])
        elif how == "short":
            items = items[:rng.randrange(1, len(items))]
        elif how == "long":
            items = items + items[:rng.randrange(1, 50)]
        else:
            items = []
        rewrite_gguf(base, out, {key: items})
        return f"tokens {key} {how}"
    if kind == "template":
        template = rng.choice(HOSTILE_TEMPLATES)
        rewrite_gguf(base, out, {"tokenizer.chat_template": template})
        return f"template {template!r:.60}"
    if kind == "arch":
        arch = rng.choice(["mistral", "qwen2", "gemma", "gpt2", "", "x" * 1000, "llama\x1b", NOT_UTF8])
        changes = {}
        if rng.random() < 0.5:  # keep the llama keys, or rename them to the new architecture
            changes = {k.replace("llama.", arch + ".", 1): v[1] for k, v in base.metadata.items() if k.startswith("llama.")}
            changes.update({k: None for k in base.metadata if k.startswith("llama.")})
        rewrite_gguf(base, out, changes, arch=arch)
        return f"arch {arch!r:.30}"
    if kind == "duplicate":  # a tensor's name or a key written as another's (same length)
        pool = [f for f in base.fields if f[1] in ("name", "key")]
        _, role, at, size = rng.choice(pool)
        same = [f for f in pool if f[1] == role and f[3] == size and f[2] != at]
        if not same:
            out.write_bytes(blob)
            return f"duplicate {role} (none)"
        src = rng.choice(same)[2]
        blob[at:at + size] = base.blob[src:src + size]
        out.write_bytes(blob)
        return f"duplicate {role}"
    # tensor data: non-finite norm values or quantization scales
    t = rng.choice(base.tensors)
    data = np.frombuffer(base.blob, np.uint8, t["nbytes"], t["start"]).copy()
    bad = np.array([rng.choice([np.nan, np.inf, -np.inf])], np.float32)
    if t["type"] == 0:
        data.view(np.float32)[rng.randrange(data.size // 4)] = bad[0]
    else:  # a Q8_0 block: its f16 scale comes first
        block = rng.randrange(data.size // 34)
        data[block * 34:block * 34 + 2] = bad.astype(np.float16).view(np.uint8)
    rewrite_gguf(base, out, {}, {t["name"]: data})
    return f"tensor {t['name']}"


# -- safetensors folders --------------------------------------------------------------------------

def mutate_folder(base: Path, out: Path, rng: random.Random) -> str:
    """Copy `base` to `out` (a fresh folder), damaged in one way; return what was done."""
    import numpy as np

    out.mkdir()
    for f in base.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    kind = rng.choice(["config", "config", "config_file", "header", "header", "header_bytes", "header_len",
                       "truncate", "overlap", "index", "tokenizer_config", "tokenizer_json", "missing", "norm"])
    if kind == "config":
        config = json.loads((out / "config.json").read_text())
        key = rng.choice(list(config) + ["head_dim", "sliding_window", "rope_scaling", "rope_parameters",
                                         "torch_dtype", "num_experts", "attention_bias"])
        config[key] = rng.choice(HOSTILE_NUMBERS + ["", "x" * 100000, "\x1b[31m", {"type": "yarn", "factor": -1}])
        (out / "config.json").write_text(json.dumps(config))
        return f"config {key}={config[key]!r:.60}"
    if kind == "config_file":
        (out / "config.json").write_bytes(rng.choice([b"\xff\xfe{}", b"[1, 2]", b"{", b"[" * 100000, b"null", b"",
                                                       b'{"a": NaN}', b"1e999999"]))
        return "config_file"
    st = out / "model.safetensors"
    blob = bytearray(st.read_bytes())
    header_len = struct.unpack_from("<Q", blob)[0]
    header = json.loads(blob[8:8 + header_len])
    names = [n for n in header if n != "__metadata__"]
    if kind in ("header", "overlap"):
        name = rng.choice(names)
        if kind == "overlap":
            other = header[rng.choice(names)]["data_offsets"]
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = rng.choice([other, [other[0], other[0] + end - begin],
                                                       [begin + 4, end + 4], [end, begin], [begin, begin]])
            what = f"overlap {name}"
        else:
            field = rng.choice(["dtype", "shape", "data_offsets"])
            header[name][field] = rng.choice(HOSTILE_NUMBERS + [[64.5, 64], [-1, 64], ["64", 64], "F64", "I8", "U8",
                                                                "F8_E4M3", "XX", [0, 2**70], [0], [2**64, 1]])
            what = f"header {name}.{field}"
        text = json.dumps(header).encode()
        st.write_bytes(struct.pack("<Q", len(text)) + text + bytes(blob[8 + header_len:]))
        return what
    if kind == "header_bytes":
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(8 + header_len)
            blob[at] = rng.randrange(256) if rng.random() < 0.5 else blob[at] ^ (1 << rng.randrange(8))
        st.write_bytes(blob)
        return "header_bytes"
    if kind == "header_len":
        value = rng.choice([0, 1, 2, header_len - 1, header_len + 1, len(blob), len(blob) - 8, 2**32, 2**63, 2**64 - 1])
        struct.pack_into("<Q", blob, 0, value)
        st.write_bytes(blob)
        return f"header_len {value}"
    if kind == "truncate":
        cut = rng.randrange(len(blob)) if rng.random() < 0.7 else rng.choice([0, 4, 8, 8 + header_len, len(blob) - 1])
        st.write_bytes(blob[:cut])
        return f"truncate at {cut}"
    if kind == "index":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        name = rng.choice(list(index["weight_map"]))
        index["weight_map"][name] = rng.choice(["/etc/hostname", "../x.safetensors", "", "a\x00b", 5, [1],
                                                "sub/../../x", "missing.safetensors", "\\etc\\hostname",
                                                "config.json", "tokenizer.json", ".", "/dev/zero"])
        if rng.random() < 0.2:
            index = rng.choice([[], {"weight_map": [1]}, {"weight_map": "x"}, {}, {"weight_map": {}}])
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
        return "index"
    if kind == "tokenizer_config":
        config = json.loads((out / "tokenizer_config.json").read_text())
        key = rng.choice(["chat_template", "chat_template", "add_bos_token", "bos_token", "eos_token"])
        config[key] = rng.choice(HOSTILE_TEMPLATES + HOSTILE_NUMBERS + [[{"name": 1}], [5], {"content": 5}, "\udcff"])
        if rng.random() < 0.2:
            config = [1, 2]
        (out / "tokenizer_config.json").write_text(json.dumps(config))
        return f"tokenizer_config {key}={config[key] if isinstance(config, dict) else config!r:.60}"
    if kind == "tokenizer_json":
        data = bytearray((out / "tokenizer.json").read_bytes())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        (out / "tokenizer.json").write_bytes(data)
        return "tokenizer_json"
    if kind == "missing":
        name = rng.choice(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                           "model.safetensors.index.json"])
        (out / name).unlink()
        if rng.random() < 0.3:
            (out / name).mkdir()  # a directory where the file should be
        return f"missing {name}"
    begin = 8 + header_len + header["model.norm.weight"]["data_offsets"][0]  # a NaN or inf in a norm weight
    blob[begin:begin + 4] = np.array([rng.choice([np.nan, np.inf])], np.float32).tobytes()
    st.write_bytes(blob)
    return "norm"


# -- one case -------------------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case (a BaseException, so `except Exception` in the loader does
    not swallow it)."""


def _on_alarm(signum, frame):
    raise CaseTimeout


def write_bases(root: Path) -> Path:
    from model_factory import tiny_bpe_vocab, tiny_tokenizer_metadata, write_random_gguf, write_tiny_hf_folder

    root.mkdir(parents=True, exist_ok=True)
    write_random_gguf(root / "base.gguf", "Q8_0", seed=3, hidden=64, inter=128, vocab=len(tiny_bpe_vocab()[0]),
                      context=64, metadata=tiny_tokenizer_metadata())
    write_tiny_hf_folder(root / "base_hf")
    return root


def make_case(seed: int, bases: Path, layout: GGUFLayout, work: Path) -> tuple[str, Path, str]:
    """(base, path, what) of case `seed`, written under `work`."""
    rng = random.Random(seed)
    if seed % 2 == 0:
        path = work / f"case{seed}.gguf"
        return "gguf", path, mutate_gguf(layout, path, rng)
    path = work / f"case{seed}"
    return "folder", path, mutate_folder(bases / "base_hf", path, rng)


def exercise(path: Path) -> None:
    """What a user's first command does: load, render the chat template, generate two greedy tokens."""
    import numpy as np

    from torchless import Mistral, Parameters

    params = Parameters.load(path)
    tokenizer = params.tokenizer
    model = Mistral.load(params)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hello the world"}]))
    state = model.new_state()
    token = ids[-1] if ids else 0
    for _ in range(2):
        logits = model.fast_forward(state, token)
        token = int(np.argmax(logits))
    tokenizer.decode(ids + [token])


def classify(exc: BaseException | None) -> tuple[str, str]:
    """(class, detail) of a case that ended with `exc` (None: it loaded)."""
    from torchless.errors import TorchlessError

    if exc is None:
        return "ok", ""
    if isinstance(exc, CaseTimeout):
        return "hang", "time limit (SIGALRM)"
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return "memory", f"{type(exc).__name__}: {exc}"[:300]
    message = str(exc)
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" [{Path(tb[-1].filename).name}:{tb[-1].lineno}]" if tb else ""
    if isinstance(exc, TorchlessError):
        if message.isprintable() and len(message) < MAX_MESSAGE and message:
            return "clean-error", type(exc).__name__
        return "other-exception", f"{type(exc).__name__} with a bad message ({len(message)} chars): {message[:200]!r}"
    return "other-exception", f"{type(exc).__name__}: {message[:240]!r}{where}"


class HarnessError(RuntimeError):
    """The generator itself failed: a bug in this file, not in torchless."""


def run_case(seed: int, bases: Path, layout: GGUFLayout, work: Path, time_limit: float) -> dict:
    try:
        base, path, what = make_case(seed, bases, layout, work)
    except Exception as e:  # noqa: BLE001
        raise HarnessError(f"case {seed}: the generator failed: {traceback.format_exc()}") from e
    exc = None
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        exercise(path)
    except BaseException as e:  # noqa: BLE001 - every outcome is classified
        exc = e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    cls, detail = classify(exc)
    exc = None
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return dict(seed=seed, base=base, what=what, cls=cls, detail=detail)


# -- the isolated driver --------------------------------------------------------------------------

def _worker(conn, bases: str, time_limit: float, mem_limit: int, stderr_path: str) -> None:
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    if mem_limit:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    signal.signal(signal.SIGALRM, _on_alarm)
    bases_path = Path(bases)
    # Before the first case, outside its time limit: import the engine (torchless's names load
    # on first use) and run both unmutated bases, so a case's time is its own, not numba's
    # compiling of the common kernels.
    for base in ("base.gguf", "base_hf"):
        exercise(bases_path / base)
    layout = GGUFLayout((bases_path / "base.gguf").read_bytes())
    work = Path(tempfile.mkdtemp(prefix="fuzzcase", dir=bases))
    conn.send("ready")
    while True:
        seed = conn.recv()
        if seed is None:
            break
        sys.stderr.write(f"case {seed}\n")
        sys.stderr.flush()
        try:
            conn.send(run_case(seed, bases_path, layout, work, time_limit))
        except HarnessError as e:
            conn.send(dict(harness_error=str(e)))


_MEMORY_SIGNS = ("memory allocation of", "MemoryError", "bad_alloc", "Cannot allocate memory", "out of memory")


class _Slot:
    def __init__(self, ctx, index, bases, time_limit, mem_limit, root):
        self.stderr = str(Path(root) / f"worker{index}.stderr")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, str(bases), time_limit, mem_limit, self.stderr),
                                daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.seed = None
        self.since = time.monotonic()

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def death(self) -> tuple[str, str]:
        self.proc.join(5)
        code = self.proc.exitcode
        try:
            tail = Path(self.stderr).read_text(errors="replace")[-2000:]
        except OSError:
            tail = ""
        last = [line for line in tail.splitlines() if line.strip() and not line.startswith("case ")]
        note = f"exit {code}" + (f" ({signal.Signals(-code).name})" if code and code < 0 else "")
        note += f": {last[-1][:200]}" if last else ""
        if any(s in tail for s in _MEMORY_SIGNS) or code == -signal.SIGKILL:
            return "memory", note
        return "crash", note


def run_isolated(seeds, workers: int = 2, time_limit: float = 10.0, mem_limit: int = 3 << 30,
                 progress: bool = False) -> list[dict]:
    """Run each case seed in a pool of long-lived worker processes; return one result per seed."""
    ctx = mp.get_context("spawn")
    root = Path(tempfile.mkdtemp(prefix="fuzz_models"))
    results = []
    try:
        write_bases(root)
        pending = deque(seeds)
        total = len(pending)
        slots = [_Slot(ctx, i, root, time_limit, mem_limit, root) for i in range(min(workers, total))]
        started_at = time.monotonic()
        while pending or any(s.seed is not None for s in slots):
            for s in slots:
                if s.ready and s.seed is None and pending:
                    s.seed = pending.popleft()
                    s.since = time.monotonic()
                    s.conn.send(s.seed)
            ready = wait([s.conn for s in slots], timeout=0.5)
            for i, s in enumerate(slots):
                dead = None
                if s.conn in ready:
                    try:
                        msg = s.conn.recv()
                    except (EOFError, OSError):
                        dead = s.death()
                    else:
                        if msg == "ready":
                            s.ready = True
                        elif "harness_error" in msg:
                            raise HarnessError(msg["harness_error"])
                        else:
                            results.append(msg)
                            s.seed = None
                            if msg["cls"] in ("hang", "memory"):  # its state may be damaged: a fresh one
                                dead = ("", "")
                elif s.seed is not None and time.monotonic() - s.since > time_limit + 5:
                    s.proc.kill()
                    dead = ("hang", f"killed after {time_limit + 5:.0f} s")
                elif not s.ready and time.monotonic() - s.since > 300:  # its warm-up may compile
                    raise RuntimeError(f"a worker did not start: {Path(s.stderr).read_text()[-2000:]}")
                if dead is not None:
                    if s.seed is not None:
                        results.append(dict(seed=s.seed, base=BASES[s.seed % 2], what="(replay to see)",
                                            cls=dead[0], detail=dead[1]))
                    elif not s.ready:
                        raise RuntimeError(f"a worker died starting: {Path(s.stderr).read_text()[-2000:]}")
                    s.kill()
                    slots[i] = _Slot(ctx, i, root, time_limit, mem_limit, root)
            if progress and results and len(results) % 500 == 0:
                print(f"  {len(results)}/{total} cases, {time.monotonic() - started_at:.0f} s", file=sys.stderr)
        for s in slots:
            try:
                s.conn.send(None)
            except OSError:
                pass
            s.proc.join(5)
            s.kill()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def seeds_of(seed: int, cases: int) -> list[int]:
    return list(range(seed * SEED_STRIDE, seed * SEED_STRIDE + cases))


def table(results: list[dict]) -> str:
    counts = Counter((r["base"], r["cls"]) for r in results)
    lines = [f"{'base':8}{'cases':>7}" + "".join(f"{c:>17}" for c in CLASSES)]
    for base in BASES + ("total",):
        per = [sum(counts[b, c] for b in ([base] if base != "total" else BASES)) for c in CLASSES]
        lines.append(f"{base:8}{sum(per):>7}" + "".join(f"{n:>17}" for n in per))
    bad = sorted((r for r in results if r["cls"] not in ("clean-error", "ok")), key=lambda r: r["seed"])
    if bad:
        lines.append("")
        lines.append("not clean (replay with --replay SEED):")
        lines += [f"  {r['seed']:>10} {r['base']:6} {r['cls']:15} {r['what']:.50}  {r['detail']}" for r in bad]
    return "\n".join(lines)


def replay(seed: int, time_limit: float, write: str | None) -> None:
    signal.signal(signal.SIGALRM, _on_alarm)
    with tempfile.TemporaryDirectory() as tmp:
        bases = write_bases(Path(tmp))
        layout = GGUFLayout((bases / "base.gguf").read_bytes())
        work = Path(write) if write else Path(tmp) / "work"
        work.mkdir(parents=True, exist_ok=True)
        base, path, what = make_case(seed, bases, layout, work)
        print(f"case {seed}: {base}, {what}; {path}")
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        try:
            exercise(path)
            exc = None
        except BaseException as e:  # noqa: BLE001
            exc = e
            traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print("class:", *classify(exc))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="the sample: seeds SEED*10**7 ..")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds per case")
    p.add_argument("--mem-limit", type=float, default=3.0, help="GiB of address space per worker (RLIMIT_AS)")
    p.add_argument("--replay", type=int, metavar="SEED", help="run one case here, with its traceback")
    p.add_argument("--write", metavar="DIR", help="with --replay: keep the case's file or folder in DIR")
    p.add_argument("--json", metavar="FILE", help="also write every result to FILE")
    args = p.parse_args(argv)
    if args.replay is not None:
        replay(args.replay, args.time_limit, args.write)
        return 0
    start = time.perf_counter()
    results = run_isolated(seeds_of(args.seed, args.cases), args.workers, args.time_limit,
                           int(args.mem_limit * 2**30), progress=True)
    elapsed = time.perf_counter() - start
    print(table(results))
    print(f"\n{len(results)} cases in {elapsed:.0f} s ({args.workers} workers)")
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 0 if all(r["cls"] in ("clean-error", "ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
