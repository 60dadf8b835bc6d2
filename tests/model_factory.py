"""Tiny random-weight models built by transformers, saved as safetensors folders and as GGUF.

The GGUF writer is the `gguf` package's; Q/K rows are permuted the way llama.cpp's converter does
for llama-architecture files, so torchless must undo that layout to match transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ARCHS = {
    # GQA 4:1 and a sliding window shorter than the test sequences.
    "mistral": dict(cls="MistralForCausalLM", cfg="MistralConfig", gguf_arch="llama",
                    extra=dict(sliding_window=7)),
    "llama": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", gguf_arch="llama", extra={}),
    # 4 experts, top 2: in GGUF, llama.cpp's llama architecture with stacked expert tensors
    "mixtral": dict(cls="MixtralForCausalLM", cfg="MixtralConfig", gguf_arch="llama",
                    extra=dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", gguf_arch="qwen2", extra={}),
    # head_dim 16 with hidden 64 and 8 heads: q is wider than the hidden state
    "qwen3": dict(cls="Qwen3ForCausalLM", cfg="Qwen3Config", gguf_arch="qwen3", extra=dict(head_dim=16)),
    # 6 layers, as llama.cpp runs every Gemma 3 (whose GGUF keeps no pattern, local base or query
    # scale): 5 local (window 4, RoPE base 10,000), then a global one (base 1,000 here); queries
    # scaled by 1/sqrt(head_dim), as all but the 27B; tied embeddings
    "gemma3": dict(cls="Gemma3ForCausalLM", cfg="Gemma3TextConfig", gguf_arch="gemma3", extra=dict(
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
        rope_theta=1000.0, query_pre_attn_scalar=16, rms_norm_eps=1e-6, tie_word_embeddings=True)),
}


def tiny_config(arch: str, **overrides) -> dict:
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=300, max_position_embeddings=128,
               rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.update(ARCHS[arch]["extra"])
    cfg.update(overrides)
    return cfg


def make_hf_model(arch: str, seed: int = 0, **overrides):
    """A transformers model with random weights (float32, eager attention, eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, ARCHS[arch]["cfg"])(**tiny_config(arch, **overrides))
    config._attn_implementation = "eager"
    model = getattr(transformers, ARCHS[arch]["cls"])(config).eval()
    with torch.no_grad():  # larger norms than the default init, so errors are not hidden
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name:
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.08)
    return model


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def save_hf_folder(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: rotate-half pairs (i, i + d/2) become adjacent pairs (2i, 2i + 1)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(model, path: Path, quant=None, tokenizer_metadata: dict | None = None) -> Path:
    """Write `model` as GGUF. quant: a gguf quantization type name applied to 2-D weights, or a
    function of the GGUF tensor name giving one (or None: float32) per 2-D weight, to mix types
    as llama.cpp's quantizer does (e.g. `mixed_q5_quant`)."""
    import gguf

    cfg = model.config
    arch_name = next(a for a, v in ARCHS.items() if v["cls"] == type(model).__name__)
    arch = ARCHS[arch_name]["gguf_arch"]
    rope = global_rope_parameters(cfg)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "sliding_window", None) and arch_name in ("mistral", "mixtral"):
        w.add_sliding_window(cfg.sliding_window)
    if arch_name == "mixtral":  # convert_hf_to_gguf.py's keys for Mixtral
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch_name == "gemma3":  # what convert_hf_to_gguf.py's Gemma3Model adds (write_gguf_with_rope: head_dim)
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    for key, value in (tokenizer_metadata or {}).items():
        _add_metadata(w, key, value)

    from torchless.loader import hf_to_gguf_name

    qtype = getattr(gguf.GGMLQuantizationType, quant) if isinstance(quant, str) else None
    for name, tensor in model.state_dict().items():
        gguf_name = hf_to_gguf_name(name, arch_name)
        if gguf_name is None or (cfg.tie_word_embeddings and gguf_name == "output.weight"):
            continue
        if callable(quant):
            qtype = getattr(gguf.GGMLQuantizationType, quant(gguf_name) or "F32")
            qtype = None if qtype == gguf.GGMLQuantizationType.F32 else qtype
        arr = tensor.float().numpy().astype(np.float32)
        if gguf_name.endswith("ffn_gate_up_exps.weight"):  # transformers >= 5 fuses them: split
            gate, up = np.split(arr, 2, axis=1)                # as llama.cpp's converter stacks them
            for kind, part in (("gate", gate), ("up", up)):
                _add_weight(w, gguf_name.replace("gate_up", kind), np.ascontiguousarray(part), qtype)
            continue
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            arr = _permute_qk(arr, cfg.num_attention_heads)
        elif arch == "llama" and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            arr = _permute_qk(arr, cfg.num_key_value_heads)
        elif arch == "gemma3" and gguf_name.endswith("norm.weight"):
            arr = arr + np.float32(1.0)  # the converter folds Gemma3RMSNorm's (1 + w) in
        _add_weight(w, gguf_name, arr, None if gguf_name.endswith("ffn_gate_inp.weight") else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_weight(w, name: str, arr: np.ndarray, qtype) -> None:
    """One tensor: weights (2-D, or stacked experts 3-D) quantized to qtype, if given."""
    import gguf

    if qtype is not None and arr.ndim >= 2:
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    else:
        w.add_tensor(name, arr)


def mixed_q5_quant(gguf_name: str) -> str:
    """A Q5_0/Q5_1 mix for `write_gguf(quant=...)`, as llama.cpp's fallbacks put them in a
    Q4_K_M file: attention and the embedding in Q5_0, the FFN and the LM head in Q5_1."""
    return "Q5_0" if "attn_" in gguf_name or gguf_name.startswith("token_embd") else "Q5_1"


def mixed_low_bit_quant(gguf_name: str) -> str:
    """A Q2_K/Q3_K/IQ4_NL/IQ4_XS mix for `write_random_gguf(qtype=...)`, each type on at least
    one attention and one FFN or output product: the embedding Q3_K, Q/K Q2_K, V/output
    IQ4_NL, gate/up IQ4_XS, down Q3_K, the LM head Q2_K."""
    for part, t in [("token_embd", "Q3_K"), ("attn_q.", "Q2_K"), ("attn_k.", "Q2_K"), ("attn_v.", "IQ4_NL"),
                    ("attn_output", "IQ4_NL"), ("ffn_gate", "IQ4_XS"), ("ffn_up", "IQ4_XS"),
                    ("ffn_down", "Q3_K"), ("output.", "Q2_K")]:
        if part in gguf_name:
            return t
    raise ValueError(gguf_name)


def mixed_ternary_mxfp4_quant(gguf_name: str) -> str:
    """A TQ1_0/TQ2_0/MXFP4 mix for `write_random_gguf(qtype=...)`: the embedding, V/output and
    the LM head MXFP4, Q/K and down TQ1_0, gate/up TQ2_0."""
    for part, t in [("attn_q.", "TQ1_0"), ("attn_k.", "TQ1_0"), ("ffn_down", "TQ1_0"), ("ffn_gate", "TQ2_0"),
                    ("ffn_up", "TQ2_0")]:
        if part in gguf_name:
            return t
    return "MXFP4"


def mixed_iq_quant(gguf_name: str) -> str:
    """The lattice types for `write_random_gguf(qtype=...)`: embedding and down IQ3_S, Q IQ2_XXS,
    K IQ2_XS, V IQ3_XXS, attention output and the LM head IQ2_S, gate IQ1_S, up IQ1_M."""
    for part, t in [("token_embd", "IQ3_S"), ("attn_q.", "IQ2_XXS"), ("attn_k.", "IQ2_XS"),
                    ("attn_v.", "IQ3_XXS"), ("attn_output", "IQ2_S"), ("ffn_gate", "IQ1_S"),
                    ("ffn_up", "IQ1_M"), ("ffn_down", "IQ3_S"), ("output.", "IQ2_S")]:
        if part in gguf_name:
            return t
    raise ValueError(gguf_name)


def _add_metadata(writer, key, value):
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        values = list(value.tolist() if isinstance(value, np.ndarray) else value)
        writer.add_array(key, values)


def tokenizer_metadata_of(gguf_path: Path) -> dict:
    """The tokenizer.* metadata of a GGUF file, for giving a tiny model a real vocabulary."""
    from torchless.formats.gguf import GGUFFile

    meta = GGUFFile(gguf_path).metadata
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


# f16 scale fields per block of the types gguf-py cannot quantize: (offset, typical magnitude)
_K_SCALES = {"Q4_K": [(0, 1e-4), (2, 5e-5)], "Q5_K": [(0, 5e-5), (2, 2.5e-5)], "Q6_K": [(208, 2e-5)],
             "Q2_K": [(80, 1.5e-3), (82, 2e-3)], "Q3_K": [(108, 1e-3)], "IQ4_NL": [(0, 1e-3)],
             "IQ4_XS": [(0, 6e-5)], "IQ2_XXS": [(0, 1.5e-3)], "IQ2_XS": [(0, 1.5e-3)],
             "IQ2_S": [(0, 1.5e-3)], "IQ3_XXS": [(0, 6e-4)], "IQ3_S": [(0, 6e-4)], "IQ1_S": [(0, 1e-2)],
             "IQ1_M": []}  # IQ1_M: see _iq1_m_scale


def random_weight_blocks(rows: int, cols: int, qtype: str, rng) -> tuple[np.ndarray, object]:
    """Stored bytes of a random (rows, cols) weight of `qtype`, with moderate values.

    Types gguf-py can quantize are made by quantizing random floats; K types, which it cannot,
    are random blocks with small f16 scales."""
    import gguf

    t = getattr(gguf.GGMLQuantizationType, qtype)
    if qtype not in _K_SCALES:
        w = (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)
        return (w if qtype == "F32" else gguf.quants.quantize(w, t)), t
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off, mag in _K_SCALES[qtype]:
        scale = (mag * rng.uniform(0.5, 1.5, len(raw))).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    if qtype == "IQ1_M":
        _iq1_m_scale(raw, (1e-2 * rng.uniform(0.5, 1.5, len(raw))).astype(np.float16))
    return raw.reshape(rows, -1), t


def _iq1_m_scale(blocks: np.ndarray, d: np.ndarray) -> None:
    """IQ1_M keeps its f16 d in the top nibbles of its 4 scale words (bytes 48..55): set it."""
    nib = (d.view(np.uint16)[:, None] >> np.array([0, 4, 8, 12], np.uint16)) & np.uint16(0xF)
    words = (blocks[:, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)) | (nib << np.uint16(12))
    blocks[:, 48:56] = words.view(np.uint8)


def write_random_gguf(path: Path, qtype: str, seed: int = 0, hidden: int = 256, inter: int = 512,
                      n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, vocab: int = 320,
                      context: int = 256, sliding_window: int | None = None,
                      metadata: dict | None = None) -> Path:
    """A random llama-architecture GGUF whose 2-D weights are all of `qtype` (or of `qtype(name)`,
    when it is a function of the GGUF tensor name, e.g. `mixed_low_bit_quant`); `metadata` adds
    keys (e.g. `tiny_tokenizer_metadata()`)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    for key, value in (metadata or {}).items():
        _add_metadata(w, key, value)
    hd = hidden // n_heads
    shapes = {"attn_q": (n_heads * hd, hidden), "attn_k": (n_kv_heads * hd, hidden),
              "attn_v": (n_kv_heads * hd, hidden), "attn_output": (hidden, n_heads * hd),
              "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}

    def add(name, rows, cols):
        data, t = random_weight_blocks(rows, cols, qtype(name) if callable(qtype) else qtype, rng)
        if data.dtype == np.uint8:  # stored bytes: the writer derives the shape from the type
            w.add_tensor(name, data, raw_dtype=t)
        else:
            w.add_tensor(name, data)

    def norm(name):
        w.add_tensor(name, rng.uniform(0.5, 1.5, hidden).astype(np.float32))

    add("token_embd.weight", vocab, hidden)
    for i in range(n_layers):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        for kind, (rows, cols) in shapes.items():
            add(f"blk.{i}.{kind}.weight", rows, cols)
    norm("output_norm.weight")
    add("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- tiny files without torch: bases for the hostile-file tests --------------------------------

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_bpe_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (GPT-2's 256 byte spellings, a few merges, two specials)."""
    from torchless.tokenizer import _bytes_to_unicode

    tokens = list(_bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ t", "Ġt h", "Ġth e"]
    tokens += [m.replace(" ", "") for m in merges] + ["<|im_start|>", "<|im_end|>"]
    return tokens, merges


def tiny_tokenizer_metadata() -> dict:
    """GGUF tokenizer.* metadata of the tiny byte-level BPE vocabulary, with a ChatML template."""
    tokens, merges = tiny_bpe_vocab()
    types = [1] * (len(tokens) - 2) + [3, 3]  # NORMAL, then CONTROL for the specials
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": len(tokens) - 2,
            "tokenizer.ggml.eos_token_id": len(tokens) - 1, "tokenizer.chat_template": CHATML}


def write_tiny_hf_folder(folder: Path, seed: int = 0, hidden: int = 64, inter: int = 96,
                         n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2) -> Path:
    """A random llama Hugging Face folder, written without torch: config.json, one safetensors
    file with its index, tokenizer.json (the tiny BPE vocabulary) and tokenizer_config.json."""
    import json

    import tokenizers
    from safetensors.numpy import save_file

    tokens, merges = tiny_bpe_vocab()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden,
                  intermediate_size=inter, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  num_key_value_heads=n_kv_heads, vocab_size=len(tokens), max_position_embeddings=64,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(config))
    hd = hidden // n_heads
    shapes = {"self_attn.q_proj": (n_heads * hd, hidden), "self_attn.k_proj": (n_kv_heads * hd, hidden),
              "self_attn.v_proj": (n_kv_heads * hd, hidden), "self_attn.o_proj": (hidden, n_heads * hd),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    weights = {"model.embed_tokens.weight": (len(tokens), hidden), "lm_head.weight": (len(tokens), hidden),
               "model.norm.weight": (hidden,)}
    for i in range(n_layers):
        weights.update({f"model.layers.{i}.{k}.weight": shape for k, shape in shapes.items()})
        weights.update({f"model.layers.{i}.{k}.weight": (hidden,)
                        for k in ("input_layernorm", "post_attention_layernorm")})
    arrays = {name: (rng.standard_normal(shape) * (0.08 if len(shape) == 2 else 0.1) + (len(shape) == 1))
              .astype(np.float32) for name, shape in weights.items()}
    save_file(arrays, str(folder / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "model.safetensors" for name in arrays}}))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return folder


# -- RoPE scaling and head sizes as llama.cpp's converter writes them ----------------------------

def llama_cpp_rope_extras(config, gguf_arch: str) -> tuple[dict, dict]:
    """(metadata, tensors) that llama.cpp's convert_hf_to_gguf.py adds for a transformers config:
    attention.key_length / value_length and rope.dimension_count from head_dim; rope.scaling.*
    for linear and yarn; for llama3 no key, but the rope_freqs.weight tensor of per-pair factors
    (each frequency is divided by its factor)."""
    import math

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    meta = {f"{gguf_arch}.attention.key_length": head_dim, f"{gguf_arch}.attention.value_length": head_dim,
            f"{gguf_arch}.rope.dimension_count": head_dim}
    rope = global_rope_parameters(config)
    kind, tensors = rope.get("rope_type", rope.get("type", "default")), {}
    if kind == "linear":
        meta.update({f"{gguf_arch}.rope.scaling.type": "linear",
                     f"{gguf_arch}.rope.scaling.factor": float(rope["factor"])})
    elif kind == "yarn":
        meta.update({f"{gguf_arch}.rope.scaling.type": "yarn",
                     f"{gguf_arch}.rope.scaling.factor": float(rope["factor"]),
                     f"{gguf_arch}.rope.scaling.original_context_length": int(rope["original_max_position_embeddings"])})
        for hf_key, key in [("attention_factor", "yarn_attn_factor"), ("beta_fast", "yarn_beta_fast"),
                            ("beta_slow", "yarn_beta_slow")]:
            if rope.get(hf_key) is not None:
                meta[f"{gguf_arch}.rope.scaling.{key}"] = float(rope[hf_key])
    elif kind == "llama3":
        base = float(rope["rope_theta"])
        freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        context = int(rope["original_max_position_embeddings"])
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / float(freq)
            if wavelen < context / high:
                factors.append(1.0)
            elif wavelen > context / low:
                factors.append(factor)
            else:
                smooth = (context / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        tensors["rope_freqs.weight"] = np.array(factors, np.float32)
    return meta, tensors


def global_rope_parameters(config) -> dict:
    """The rope parameters of a transformers config (>= 5), of its global layers where they
    differ by layer type (Gemma 3: the scaling applies to those only)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return dict(rope.get("full_attention", rope))


def write_gguf_with_rope(model, path: Path, quant=None) -> Path:
    """write_gguf, plus llama_cpp_rope_extras (RoPE scaling keys or tensor, explicit head size)."""
    arch = ARCHS[next(a for a, v in ARCHS.items() if v["cls"] == type(model).__name__)]["gguf_arch"]
    meta, tensors = llama_cpp_rope_extras(model.config, arch)
    write_gguf(model, path, quant=quant, tokenizer_metadata=meta)
    return add_gguf_tensors(path, tensors) if tensors else path


def add_gguf_tensors(path: Path, tensors: dict) -> Path:
    """Rewrite the GGUF at `path` in place with float32 `tensors` (name -> array) added."""
    import gguf

    from torchless.formats.gguf import GGUFFile

    source = GGUFFile(path)
    out = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(out), source.metadata["general.architecture"])
    for key, value in source.metadata.items():
        if key != "general.architecture":
            _add_metadata(w, key, value)
    for name, info in source.tensor_infos.items():
        data = np.array(source._map[info.start:info.stop])
        w.add_tensor(name, data.reshape(info.shape[:-1] + (-1,)), raw_dtype=gguf.GGMLQuantizationType(info.ggml_type))
    for name, array in tensors.items():
        w.add_tensor(name, np.asarray(array, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source.close()
    out.replace(path)
    return path
