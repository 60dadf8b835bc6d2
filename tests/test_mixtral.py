"""Mixtral (sparse mixture of experts) against transformers (CPU torch), and expert parallelism.

Tiny random MixtralForCausalLM models (4 experts top 2; 8 experts top 3 with a sliding window),
read from a checkpoint folder as transformers saves it (block_sparse_moe.experts.E.w1/w2/w3), from
a folder of transformers >= 5's fused layout (mlp.experts.gate_up_proj / down_proj) and from GGUF as
llama.cpp's converter writes Mixtral (architecture llama, expert_count / expert_used_count,
stacked ffn_*_exps tensors): logits at every position within 1e-4 of transformers on every run
path (prefill in chunks, the reference and the compiled decode steps, a micro-batch of sequences,
tensor-parallel threads, a pipeline). Under tensor parallelism each rank keeps 1/world of the
experts (counted in bytes), on threads and under `mpiexec -n 2`.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

from model_factory import hf_logits, make_hf_model, save_hf_folder, write_gguf
from test_architectures import (SEQ, assert_close_rel, assert_every_position_close, batched_logits,
                                fast_decode_logits, load, pipeline_logits, prefill_logits,
                                reference_decode_logits, rel_error, tensor_parallel_logits)
from torchless import Mistral, ModelConfig, Parameters, UnsupportedModelError
from torchless.errors import ModelFileError
from torchless.kernels.tensor_parallel import TensorParallelConfig
from torchless.model.parallel import TensorParallelMistral

# name -> (transformers config overrides, formats)
CASES = {
    "mixtral": ({}, ("safetensors", "fused", "gguf", "gguf_per_expert")),
    "mixtral_8x3": (dict(num_local_experts=8, num_experts_per_tok=3, sliding_window=7), ("safetensors", "gguf")),
}
PARAMS = [(name, fmt) for name, (_, fmts) in CASES.items() for fmt in fmts]


def save_fused_folder(model, folder):
    """The model's own tensors (transformers >= 5 names: experts stacked, gate and up fused)."""
    from safetensors.numpy import save_file

    save_hf_folder(model, folder)
    (folder / "model.safetensors").unlink()
    save_file({name: t.float().numpy() for name, t in model.state_dict().items()},
              str(folder / "model.safetensors"))
    return folder


def write_per_expert_gguf(stacked, path):
    """The GGUF `stacked` as llama.cpp wrote Mixtral before it stacked the experts: one tensor
    per expert, blk.N.ffn_gate.E.weight (and up, down)."""
    import gguf

    from model_factory import _add_metadata
    from torchless.formats.gguf import GGUFFile

    source = GGUFFile(stacked)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in source.metadata.items():
        if key != "general.architecture":
            _add_metadata(w, key, value)
    for name, t in source.tensors.items():
        array = t.dequantize()
        if name.endswith("_exps.weight"):
            _, layer, kind, _ = name.split(".")
            for e, expert in enumerate(array):
                w.add_tensor(f"blk.{layer}.{kind.removesuffix('_exps')}.{e}.weight", np.ascontiguousarray(expert))
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    """name -> (hf_model, {format: path}, reference logits of SEQ), built on first use."""
    built = {}

    def get(name):
        if name not in built:
            overrides, fmts = CASES[name]
            model = make_hf_model("mixtral", seed=7, **overrides)
            root = tmp_path_factory.mktemp(name)
            paths = {"safetensors": save_hf_folder(model, root / "hf"), "gguf": write_gguf(model, root / "m.gguf")}
            if "fused" in fmts:
                paths["fused"] = save_fused_folder(model, root / "fused")
            if "gguf_per_expert" in fmts:
                paths["gguf_per_expert"] = write_per_expert_gguf(paths["gguf"], root / "per_expert.gguf")
            built[name] = (model, paths, hf_logits(model, SEQ))
        return built[name]
    return get


@pytest.mark.parametrize("name, fmt", PARAMS)
@pytest.mark.parametrize("path", ["prefill", "decode", "fast_decode", "batched"])
def test_every_position_matches_transformers(case_files, name, fmt, path):
    params, ref = load(case_files, name, fmt)
    assert_every_position_close(Mistral.load(params), ref, path)


@pytest.mark.parametrize("name, fmt, world", [("mixtral", "gguf", 2), ("mixtral", "safetensors", 3),
                                              ("mixtral_8x3", "gguf", 2)])
def test_tensor_parallel_and_pipeline_match_transformers(case_files, name, fmt, world):
    params, ref = load(case_files, name, fmt)
    assert_close_rel(tensor_parallel_logits(params, world), ref)
    assert_close_rel(pipeline_logits(params), ref[11:])


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_quantized_experts_fast_paths_equal_the_reference(case_files, tmp_path, quant):
    """Stacked experts quantized (3-D Q8_0 / Q4_0 tensors, the router kept f32 as llama.cpp
    keeps it): the compiled paths and the expert-parallel threads give the reference forward's
    logits, itself near transformers'."""
    model_hf, _, ref = case_files("mixtral")
    params = Parameters.load(write_gguf(model_hf, tmp_path / f"{quant}.gguf", quant=quant))
    assert params.tensors["blk.0.ffn_gate_exps.weight"].ggml_type.name == quant
    assert params.tensors["blk.0.ffn_gate_inp.weight"].ggml_type.name == "F32"
    model = Mistral.load(params)
    reference = reference_decode_logits(model)
    # near transformers at most positions: a quantized router may rank two experts the other way
    # round where their probabilities are close (here 2 of 24 positions for Q8_0), which moves
    # that token's logits by more than the quantization error alone. Bounds: a dense llama of this
    # size and init, quantized the same way, has a median of 0.015 (Q8_0) and 0.23 (Q4_0).
    per_position = np.abs(reference - ref).max(axis=1) / np.abs(ref).max()
    assert np.median(per_position) < {"Q8_0": 0.03, "Q4_0": 0.4}[quant], per_position
    assert_close_rel(prefill_logits(model), reference)
    assert_close_rel(fast_decode_logits(model), reference)
    for start, rows in batched_logits(model).items():
        assert_close_rel(rows, reference[start:start + len(rows)])
    assert_close_rel(tensor_parallel_logits(params, 2), reference)


# -- the routing decides these logits: broken, they are far from transformers ----------------------

BREAKS = [dict(moe_norm_topk=False), dict(n_experts_used=1), dict(n_experts_used=3)]


@pytest.mark.parametrize("broken", BREAKS, ids=["no-renormalization", "top-1", "top-3"])
def test_the_routing_decides_these_logits(case_files, broken):
    params, ref = load(case_files, "mixtral", "gguf")
    params.config = dataclasses.replace(params.config, **broken)
    assert rel_error(prefill_logits(Mistral.load(params)), ref) > 1e-2


# -- expert parallelism ----------------------------------------------------------------------------

class _NoGroup:
    """A stand-in group for inspecting shards without running them."""

    def __init__(self, world_size):
        self.world_size = world_size

    def all_reduce_sum(self, array):
        raise AssertionError("not for running")


@pytest.mark.parametrize("name, world", [("mixtral", 2), ("mixtral_8x3", 2), ("mixtral_8x3", 4)])
def test_each_rank_holds_its_share_of_the_experts(case_files, name, world):
    """Counted in bytes, stored and repacked: rank r holds experts local_range(r) of every layer,
    1/world of the expert weights; the router is whole on every rank, attention split as ever."""
    params, _ = load(case_files, name, "gguf")
    full = Mistral.load(params)
    n = full.config.n_experts

    def expert_bytes(model):
        return sum(linear.packed.nbytes for layer in model.layers for linear in layer.moe.expert_linears())

    whole = expert_bytes(full)
    shards = [TensorParallelMistral.load(params, TensorParallelConfig(world, r), _NoGroup(world)) for r in range(world)]
    for r, shard in enumerate(shards):
        for layer in shard.layers:
            assert sorted(layer.moe.experts) == list(range(r * n // world, (r + 1) * n // world))
            assert layer.moe.router.shape == (n, full.config.hidden_size)
        assert expert_bytes(shard) * world == whole
        assert shard.layout.n_heads == full.config.n_heads // world
    assert sum(map(expert_bytes, shards)) == whole


def test_threads_equal_one_process(case_files):
    params, _ = load(case_files, "mixtral_8x3", "gguf")
    model = Mistral.load(params)
    state = model.new_state(64)
    one = np.concatenate([model.prefill(state, SEQ[:12], chunk_size=5, all_logits=True),
                          np.stack([model.fast_forward(state, t).copy() for t in SEQ[12:]])])
    for world in (2, 4):
        assert_close_rel(tensor_parallel_logits(params, world), one, rel=1e-5)


def test_mpi_ranks_hold_their_experts_and_equal_one_process(case_files):
    from test_tensor_parallel import SCRIPTS, mpiexec

    path = load(case_files, "mixtral_8x3", "gguf")[0].path
    r = mpiexec(2, sys.executable, str(SCRIPTS / "moe_ep_check.py"), str(path), ",".join(map(str, SEQ[:12])),
                timeout=240)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    lines = {line.split()[0]: dict(kv.split("=", 1) for kv in line.split()[1:])
             for line in r.stdout.splitlines() if line.startswith("rank=")}
    assert set(lines) == {"rank=0", "rank=1"}
    assert [lines[k]["experts"] for k in ("rank=0", "rank=1")] == ["0,1,2,3", "4,5,6,7"]
    whole_packed = int(next(l.split("=")[1] for l in r.stdout.splitlines() if l.startswith("whole_packed_bytes=")))
    for rank in lines.values():
        assert 2 * int(rank["stored_bytes"]) == int(rank["of"])
        assert 2 * int(rank["packed_bytes"]) == whole_packed


# -- what the files say, and what is refused -------------------------------------------------------

def test_config_read_from_files(case_files):
    for fmt in ("safetensors", "fused", "gguf"):
        c = load(case_files, "mixtral", fmt)[0].config
        assert (c.n_experts, c.n_experts_used, c.moe_norm_topk, c.plain_mlp) == (4, 2, True, False)
        assert c.architecture == ("llama" if fmt == "gguf" else "mixtral")
        assert c.rope_interleaved == (fmt == "gguf")
    for fmt in ("safetensors", "gguf"):
        c = load(case_files, "mixtral_8x3", fmt)[0].config
        assert (c.n_experts, c.n_experts_used, c.sliding_window) == (8, 3, 7)


def test_attention_runs_compiled_the_experts_kernel_by_kernel(case_files):
    blocks = Mistral.load(load(case_files, "mixtral", "gguf")[0]).fused_blocks()
    assert all(a is not None and m is None for a, m in blocks)


BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=300)


@pytest.mark.parametrize("config, message", [
    (dict(model_type="qwen2_moe", num_experts=4, shared_expert_intermediate_size=64), "shared expert"),
    (dict(model_type="qwen3_moe", num_experts=4), "Qwen3-MoE"),
    (dict(model_type="deepseek_v3", n_routed_experts=4, n_shared_experts=1), "DeepSeek's shared experts"),
    (dict(model_type="mixtral", num_local_experts=4, n_shared_experts=1), r"shared experts \(n_shared_experts 1\)"),
    (dict(model_type="mistral", num_local_experts=4), "mistral with experts"),
])
def test_unsupported_moe_configs_are_refused_in_one_line(config, message):
    with pytest.raises(UnsupportedModelError, match=message) as e:
        ModelConfig.from_hf(dict(BASE, **config))
    assert "\n" not in str(e.value)


def test_more_experts_used_than_there_are_is_refused():
    with pytest.raises(ModelFileError, match="5 experts used per token, of 4"):
        ModelConfig.from_hf(dict(BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=5))


GGUF_BASE = {"llama.embedding_length": 64, "llama.attention.head_count": 8, "llama.context_length": 128,
             "llama.block_count": 2, "llama.feed_forward_length": 96, "llama.vocab_size": 300}


@pytest.mark.parametrize("metadata, names, message", [
    ({"general.architecture": "qwen2moe"}, (), "architecture 'qwen2moe' is not supported: Qwen2-MoE's shared expert"),
    ({"general.architecture": "deepseek2"}, (), "latent attention"),
    ({"llama.expert_count": 4, "llama.expert_used_count": 2}, ("blk.0.ffn_gate_shexp.weight",), "shared experts"),
    ({"llama.expert_count": 4, "llama.expert_used_count": 2, "llama.expert_gating_func": 2}, (),
     "expert gating function 2"),
    ({}, ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.weight"), "expert tensors without llama.expert_count"),
    ({"llama.expert_count": 4, "llama.expert_used_count": 2, "llama.expert_feed_forward_length": 32}, (),
     "expert_feed_forward_length 32"),
])
def test_unsupported_moe_gguf_is_refused_in_one_line(metadata, names, message):
    meta = dict({"general.architecture": "llama"}, **GGUF_BASE, **metadata)
    with pytest.raises(UnsupportedModelError, match=message) as e:
        ModelConfig.from_gguf(meta, names)
    assert "\n" not in str(e.value)


# -- the CLI, end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixtral_with_vocabulary(tmp_path_factory):
    """A tiny Mixtral GGUF (8 experts, top 2, Q8_0) with the tiny byte-level BPE vocabulary."""
    from model_factory import tiny_tokenizer_metadata

    meta = tiny_tokenizer_metadata()
    model = make_hf_model("mixtral", seed=3, num_local_experts=8, vocab_size=len(meta["tokenizer.ggml.tokens"]))
    return write_gguf(model, tmp_path_factory.mktemp("mixtral_cli") / "m.gguf", quant="Q8_0", tokenizer_metadata=meta)


def test_generate_on_expert_parallel_threads_ranks_and_stages_prints_what_one_process_prints(mixtral_with_vocabulary):
    import subprocess

    from test_tensor_parallel import assert_mpi_generate_prints_what_one_process_prints

    mpi = assert_mpi_generate_prints_what_one_process_prints(mixtral_with_vocabulary, 2, "tp=2", prompt="hello there")
    args = [sys.executable, "-m", "torchless", "generate", "-m", str(mixtral_with_vocabulary),
            "--max-tokens", "12", "--temperature", "0", "hello there"]
    threads = subprocess.run(args + ["--parallel", "tp=2"], capture_output=True, text=True, timeout=300)
    assert threads.returncode == 0, threads.stderr
    assert threads.stdout == mpi.stdout
    pipeline = assert_mpi_generate_prints_what_one_process_prints(mixtral_with_vocabulary, 2, "pp=2,mb=2",
                                                                  prompt="hello there")
    assert pipeline.stdout == mpi.stdout


def test_a_decode_step_reads_the_top_k_of_the_experts(case_files):
    """weight_bytes_per_token (bench's bandwidth figure) counts 3 of 8 experts per token."""
    model = Mistral.load(load(case_files, "mixtral_8x3", "gguf")[0])
    experts = sum(linear.packed.nbytes for layer in model.layers for linear in layer.moe.expert_linears())
    everything = sum(linear.packed.nbytes for linear in model.linears())
    assert model.weight_bytes_per_token() == everything - experts + experts * 3 // 8
