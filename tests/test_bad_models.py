"""Well-formed files that torchless cannot run, and configs that cannot describe a model."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from model_factory import tiny_bpe_vocab, tiny_tokenizer_metadata, write_random_gguf, write_tiny_hf_folder
from test_hostile_files import rewrite_gguf

from torchless import ModelConfig, ModelFileError, Parameters, TorchlessError, UnsupportedModelError
from torchless.chat_template import render_chat_template
from torchless.formats.gguf import GGUFFile
from torchless.tokenizer import Tokenizer


def write_minimal_gguf(path, arch="llama", **metadata):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def test_unknown_gguf_architecture(tmp_path):
    path = write_minimal_gguf(tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2' is not supported"):
        Parameters.load(path)


def test_gguf_missing_hyperparameters(tmp_path):
    path = write_minimal_gguf(tmp_path / "m.gguf", embedding_length=8)
    with pytest.raises(ModelFileError, match="GGUF metadata is missing llama\\.attention\\.head_count"):
        Parameters.load(path)


def test_unknown_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported"):
        Parameters.load(tmp_path)


def test_hf_config_missing_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelFileError, match="config.json is missing 'hidden_size'"):
        Parameters.load(tmp_path)


def test_hf_folder_without_weights(tiny_models, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny_models["llama"][1] / "config.json").read_bytes())
    with pytest.raises(ModelFileError, match="no \\*.safetensors"):
        Parameters.load(tmp_path)


def test_truncated_safetensors(tiny_models, tmp_path):
    folder = tiny_models["llama"][1]
    for name in ("config.json",):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="do not fit"):
        Parameters.load(tmp_path)


@pytest.mark.parametrize("field,value", [("n_heads", 0), ("hidden_size", -1), ("n_kv_heads", 3)])
def test_inconsistent_config(field, value):
    base = dict(architecture="llama", hidden_size=64, intermediate_size=96, n_layers=2, n_heads=8,
                n_kv_heads=2, head_dim=8, vocab_size=10, context_length=32)
    base[field] = value
    with pytest.raises(ModelFileError):
        ModelConfig(**base)


def test_missing_tensor_names_the_tensor(tiny_models, tmp_path):
    from torchless import Mistral

    params = Parameters.load(tiny_models["llama"][2])
    del params.tensors["blk.1.ffn_up.weight"]
    with pytest.raises(ModelFileError, match="missing tensor blk.1.ffn_up.weight"):
        Mistral.load(params)


# -- hostile values, one bullet of issue 14 each ------------------------------------------------


TINY_VOCAB = len(tiny_bpe_vocab()[0])


def assert_one_clean_line(error):
    message = str(error.value)
    assert message.isprintable() and len(message) <= 300, message


def tiny_gguf(path, **llama_metadata):
    """A tiny Q8_0 llama GGUF with the tiny BPE vocabulary, its `llama.*` keys then overwritten
    with `llama_metadata` as given (a float is written as f32, a str as a string...)."""
    write_random_gguf(path, "Q8_0", hidden=64, inter=128, vocab=TINY_VOCAB, context=64,
                      metadata=tiny_tokenizer_metadata())
    metadata = dict(GGUFFile(path).metadata, **{f"llama.{k}": v for k, v in llama_metadata.items()})
    rewrite_gguf(path, path.with_name("rewritten.gguf"), metadata)
    return path.with_name("rewritten.gguf")


@pytest.mark.parametrize("key, value, message", [
    ("rope.freq_base", float("nan"), "rope.freq_base must be finite"),
    ("rope.freq_base", float("inf"), "rope.freq_base must be finite"),
    ("rope.freq_base", -float("inf"), "rope.freq_base must be finite"),
    ("rope.freq_base", 0.0, "rope_theta must be positive"),
    ("rope.freq_base", -10000.0, "rope_theta must be positive"),
    ("attention.layer_norm_rms_epsilon", float("nan"), "epsilon must be finite"),
    ("attention.layer_norm_rms_epsilon", float("inf"), "epsilon must be finite"),
    ("attention.layer_norm_rms_epsilon", -1e-5, "norm_eps must not be negative"),
    ("block_count", 2.5, "block_count must be an integer, got 2.5"),
    ("block_count", True, "block_count must be an integer, got True"),
    ("block_count", 1, "block_count is 1, but the file has tensors for 2 blocks"),
    ("block_count", 3, "block_count is 3, but the file has tensors for 2 blocks"),
    ("block_count", 2**31, "block_count is 2147483648"),
    ("attention.head_count", 0, "head_count must be at least 1, got 0"),
    ("attention.key_length", 0, "key_length must be at least 1, got 0"),
    ("attention.sliding_window", -4, "sliding_window must be at least 0, got -4"),
    ("embedding_length", "64", "embedding_length must be an integer, got '64'"),
    ("context_length", float("nan"), "context_length must be an integer, got nan"),
    ("feed_forward_length", [128, 128], "feed_forward_length must be an integer"),
])
def test_hostile_gguf_values_are_refused(tmp_path, key, value, message):
    path = tiny_gguf(tmp_path / "m.gguf", **{key: value})
    with pytest.raises(ModelFileError, match=message) as error:
        Parameters.load(path)
    assert str(error.value).startswith(str(path))  # names the file
    assert_one_clean_line(error)


@pytest.mark.parametrize("key, value, message", [
    ("tokenizer.ggml.tokens", ["a", "b\udc80"], r"tokens\[1\] .* is not valid UTF-8"),
    ("tokenizer.ggml.merges", ["h e x"], r"merges\[0\] 'h e x' is not two tokens"),
    ("tokenizer.ggml.merges", ["h zz"], "vocabulary or merges are corrupt"),
    ("tokenizer.ggml.token_type", np.array([1.5] * TINY_VOCAB), "token_type must be an array of finite numbers"),
    ("tokenizer.ggml.bos_token_id", "1", "bos_token_id must be an integer"),
    ("tokenizer.ggml.add_bos_token", np.array([1, 2]), "add_bos_token must be true or false"),
    ("tokenizer.chat_template", 5, "chat_template must be a string"),
    ("tokenizer.chat_template", "{{ x }}\udcff", "chat_template.* is not valid UTF-8"),
])
def test_hostile_tokenizer_metadata_is_refused(key, value, message):
    metadata = tiny_tokenizer_metadata()
    metadata["tokenizer.ggml.token_type"] = np.array(metadata["tokenizer.ggml.token_type"])
    metadata[key] = value
    with pytest.raises(ModelFileError, match=message) as error:
        Tokenizer.from_gguf_metadata(metadata)
    assert_one_clean_line(error)


def copy_folder(tiny_hf, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    for f in tiny_hf.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return write_tiny_hf_folder(tmp_path_factory.mktemp("tiny_hf") / "hf")


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", float("nan"), "num_hidden_layers must be an integer, got nan"),
    ("hidden_size", float("inf"), "hidden_size must be an integer, got inf"),
    ("num_attention_heads", 0, "num_attention_heads must be at least 1"),
    ("vocab_size", "265", "vocab_size must be an integer"),
    ("intermediate_size", [96], "intermediate_size must be an integer"),
    ("head_dim", 0, "head_dim must be at least 1, got 0"),
    ("rope_theta", float("nan"), "rope_theta must be finite"),
    ("rms_norm_eps", -1.0, "norm_eps must not be negative"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
    ("rope_scaling", [1], "RoPE scaling"),
])
def test_hostile_config_json_values_are_refused(tiny_hf, tmp_path, key, value, message):
    folder = copy_folder(tiny_hf, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TorchlessError, match=message) as error:
        Parameters.load(folder)
    assert_one_clean_line(error)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "not valid UTF-8 JSON"), (b"[1, 2]", "must hold a JSON object"),
    (b"[" * 100000, "not valid UTF-8 JSON")])
def test_unreadable_config_json(tiny_hf, tmp_path, content, message):
    folder = copy_folder(tiny_hf, tmp_path)
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as error:
        Parameters.load(folder)
    assert_one_clean_line(error)


@pytest.mark.parametrize("field, value, message", [
    ("shape", [64.5, 64], "shape must be a list of non-negative integers"),
    ("shape", [-1, 64], "shape must be a list of non-negative integers"),
    ("shape", ["64"], "shape must be a list of non-negative integers"),
    ("data_offsets", [0, float("nan")], "data_offsets must be two non-negative integers"),
    ("data_offsets", [0, 2**70], "do not fit"),
    ("dtype", ["F32"], "has dtype"),
    ("dtype", "F64", "has dtype 'F64'"),
])
def test_hostile_safetensors_header_values(tiny_hf, tmp_path, field, value, message):
    import struct

    folder = copy_folder(tiny_hf, tmp_path)
    blob = (folder / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", blob)[0]
    header = json.loads(blob[8:8 + n])
    header["model.norm.weight"][field] = value
    text = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])
    with pytest.raises(TorchlessError, match=message) as error:
        Parameters.load(folder)
    assert_one_clean_line(error)


@pytest.mark.parametrize("name", ["/etc/hostname", "../model.safetensors", "sub/../../x.safetensors"])
def test_index_cannot_name_files_outside_the_folder(tiny_hf, tmp_path, name):
    folder = copy_folder(tiny_hf, tmp_path)
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="is not a file name inside the model folder"):
        Parameters.load(folder)


@pytest.mark.parametrize("weight_map", [[1], {"a": 5}, {"a": ["x"]}])
def test_index_weight_map_must_map_names_to_files(tiny_hf, tmp_path, weight_map):
    folder = copy_folder(tiny_hf, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelFileError, match="not a valid safetensors index"):
        Parameters.load(folder)


def test_tokenizer_config_that_is_a_list(tiny_hf, tmp_path):
    folder = copy_folder(tiny_hf, tmp_path)
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="tokenizer_config.json: must hold a JSON object"):
        Parameters.load(folder).tokenizer


def test_tokenizer_config_token_that_is_not_text(tiny_hf, tmp_path):
    folder = copy_folder(tiny_hf, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "\udcff"}))
    with pytest.raises(ModelFileError, match=r"tokenizer_config.json: eos_token '\\udcff' is not valid text") as error:
        Parameters.load(folder).tokenizer
    assert_one_clean_line(error)


def test_tokenizer_model_that_is_an_array():
    metadata = {**tiny_tokenizer_metadata(), "tokenizer.ggml.model": np.array([64, 64])}
    with pytest.raises(UnsupportedModelError, match=r"unsupported tokenizer model array\(\[64, 64\]") as error:
        Tokenizer.from_gguf_metadata(metadata)
    assert_one_clean_line(error)


def test_non_finite_norm_weight_is_refused(tiny_hf, tmp_path):
    import struct

    folder = copy_folder(tiny_hf, tmp_path)
    blob = bytearray((folder / "model.safetensors").read_bytes())
    n = struct.unpack_from("<Q", blob)[0]
    begin = 8 + n + json.loads(blob[8:8 + n])["model.layers.1.input_layernorm.weight"]["data_offsets"][0]
    blob[begin + 8:begin + 12] = np.float32(np.inf).tobytes()
    (folder / "model.safetensors").write_bytes(blob)
    with pytest.raises(ModelFileError, match="blk.1.attn_norm.weight' .a norm weight. holds NaN or infinite"):
        Parameters.load(folder)


@pytest.mark.parametrize("qtype, offset", [("Q8_0", 0), ("Q4_1", 2), ("Q4_K", 2), ("Q6_K", 208)])
def test_non_finite_quantization_scale_is_refused(tmp_path, qtype, offset):
    path = write_random_gguf(tmp_path / "m.gguf", qtype, metadata=tiny_tokenizer_metadata(), vocab=TINY_VOCAB)
    source = GGUFFile(path)
    info = source.tensor_infos["blk.1.ffn_up.weight"]
    data = np.array(source._map[info.start:info.stop])
    block_bytes = {"Q8_0": 34, "Q4_1": 20, "Q4_K": 144, "Q6_K": 210}[qtype]
    at = 3 * block_bytes + offset
    data[at:at + 2] = np.float16(np.nan).reshape(1).view(np.uint8)
    rewrite_gguf(path, tmp_path / "bad.gguf", source.metadata, {"blk.1.ffn_up.weight": data})
    with pytest.raises(ModelFileError, match=r"'blk.1.ffn_up.weight': 1 blocks have a NaN or infinite scale"):
        Parameters.load(tmp_path / "bad.gguf")
    Parameters.load(path)  # the unpatched file loads


HUGE_TEMPLATES = ["{{ 'x' * 10**9 }}", "{{ [0] * 10**9 }}", "{{ 10**9 * 'x' }}", "{{ 'x' | center(10**9) }}",
                  "{{ 'x'.ljust(10**9) }}", "{{ '%999999999s' % 'x' }}", "{{ '{:>999999999}'.format('x') }}",
                  "{{ '%999999999s' | format('x') }}",
                  "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}"
                  "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
                  "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}"]


@pytest.mark.parametrize("template", HUGE_TEMPLATES)
def test_chat_template_cannot_exhaust_memory(template):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TorchlessError, match="chat template") as error:
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert_one_clean_line(error)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_chat_template_rendering_time_is_bounded(monkeypatch):
    import time

    from torchless import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(TorchlessError, match="rendering took more than"):
        render_chat_template("{% for i in range(100000) %}{% for j in range(100000) %}{{ i.real }}"
                             "{% endfor %}{% endfor %}", [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 5


def test_chat_template_lipsum_is_bounded_before_it_runs():
    import time

    start = time.monotonic()  # jinja's own lipsum(10**6) runs for minutes below any size limit
    with pytest.raises(TorchlessError, match=r"lipsum\(1000000, max=100\) asks for more than"):
        render_chat_template("{{ lipsum(10**6) }}", [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 1
    assert len(render_chat_template("{{ lipsum(2, html=False) }}", [{"role": "user", "content": "hi"}])) > 20


@pytest.mark.parametrize("template, error", [("{{ 1/0 }}", "ZeroDivisionError"), ("{{ 'a' - 1 }}", "TypeError"),
                                             ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError")])
def test_chat_template_errors_are_one_line(template, error):
    with pytest.raises(TorchlessError, match=f"chat template failed: {error}"):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_hostile_tensor_names_are_escaped_and_clipped(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("\x1b[31mred\n" + "x" * 5000, np.zeros((4, 8), np.float32))
    w.add_tensor("\x1b[31mred\n" + "x" * 5000 + "2", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    blob = (tmp_path / "m.gguf").read_bytes()
    at = blob.index(b"x2") + 2 + 4 + 16 + 4  # the second tensor's data offset: overlap the first
    (tmp_path / "m.gguf").write_bytes(blob[:at] + bytes(8) + blob[at + 8:])
    with pytest.raises(ModelFileError, match=r"tensors '\\x1b\[31mred\\nxxx.*chars\) and .* overlap") as error:
        Parameters.load(tmp_path / "m.gguf")
    assert_one_clean_line(error)


def test_lone_surrogate_is_refused_by_encode():
    tokenizer = Tokenizer.from_gguf_metadata(tiny_tokenizer_metadata())
    with pytest.raises(TorchlessError, match="not valid Unicode"):
        tokenizer.encode("hi \ud800")


def test_every_message_is_one_bounded_line():
    """The last guard: whatever a caller puts in a TorchlessError comes out one short line."""
    message = str(ModelFileError("start\n\x1b[31m" + "x" * 10_000 + " the problem"))
    assert message.isprintable() and len(message) <= 300
    assert message.startswith("start\\n\\x1b[31m") and message.endswith(" the problem")


def test_tokenizer_json_ids_far_beyond_the_vocabulary(tiny_hf, tmp_path):
    folder = copy_folder(tiny_hf, tmp_path)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["vocab"]["hello"] = 10**6
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ModelFileError, match="token ids run to 1000000 for"):
        Parameters.load(folder).tokenizer
