"""The parallel model layer (seed: "Parallel Model Implementations").

Parallelism wraps the one model in `mistral.py` and never copies it. Tensor parallelism takes
the lazily loaded model and swaps each linear for this rank's shard of the memory-mapped weight
(gpt-fast's tp.py, mlx-lm's Model.shard): Q/K/V and gate/up by rows, the attention output and
down projection by columns, the output projection by vocabulary rows. The model then all-reduces
after each column-sharded product.

Embedding and LM head: the embedding stays whole and unpacked (a decode step reads one row of
it from the file mapping, so it costs no resident memory); the LM head is split by vocabulary
rows, since on a small model it is a quarter of the weights read per token, and its slices are
joined by the same all-reduce, over zero-padded logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..errors import TorchlessError
from ..kernels.pipeline import PipelineConfig
from ..kernels.tensor_parallel import TensorParallelConfig, TensorParallelStrategy
from ..kernels.workdist import WorkDistributionConfig
from ..loader import release_pages
from .linear import Linear, RowParallelLinear, VocabParallelLinear
from .mistral import InferenceState, Mistral, ShardLayout


# -- configuration -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ParallelConfig:
    """How one model is spread: tensor-parallel shards, pipeline stages, and (in one process)
    the work distribution of its decode steps. `backend` is "threads" (shards or stages as
    threads of this process) or "mpi" (one per rank, under mpiexec)."""
    tensor: TensorParallelConfig = field(default_factory=TensorParallelConfig)
    pipeline_stages: int = 1
    pipeline_config: PipelineConfig = field(default_factory=PipelineConfig)
    work: WorkDistributionConfig = field(default_factory=WorkDistributionConfig)
    backend: str = "threads"
    reason: str = field(default="", compare=False)  # why for_model chose this, for the user

    def __post_init__(self):
        if self.pipeline_stages < 1:
            raise TorchlessError(f"pipeline stages must be at least 1, got {self.pipeline_stages}")
        if self.backend not in ("threads", "mpi"):
            raise TorchlessError(f"parallel backend must be 'threads' or 'mpi', got {self.backend!r}")

    @classmethod
    def default(cls) -> "ParallelConfig":
        """One process: adaptive work distribution over its cores, heads in parallel."""
        return cls()

    @classmethod
    def pipeline(cls, n_micro_batches: int, n_stages: int = 2) -> "ParallelConfig":
        return cls(pipeline_stages=n_stages,
                   pipeline_config=PipelineConfig(num_micro_batches=n_micro_batches, async_execution=True),
                   backend=_backend())

    @classmethod
    def tensor_parallel(cls, world_size: int, rank: int = 0) -> "ParallelConfig":
        return cls(tensor=TensorParallelConfig(world_size, rank), backend=_backend())

    @classmethod
    def for_model(cls, config=None) -> "ParallelConfig":
        """Sensible settings for this model (a ModelConfig; None: judged by the ranks alone) on
        this machine, with `reason` saying why. In one process: every core on the one model
        (measured fastest below a few GB of weights: tensor parallelism pays an all-reduce per
        block, and a pipeline pays off only for batches), NUMA-aware where there are several
        nodes. Under mpiexec with N ranks: tensor parallelism over them if the heads split N
        ways, else a pipeline of N stages."""
        from ..distributed import current_group
        from ..kernels.workdist import NumaHint, num_cpus

        group = current_group()
        world = group.world_size
        nodes = len(NumaHint("local").nodes)
        work = WorkDistributionConfig(numa_aware=nodes > 1)
        if world == 1:
            return cls(work=work, reason=f"one process, {num_cpus()} cores, {nodes} NUMA node(s): "
                                         "every core works on each product")
        if config is None or world <= config.n_heads:
            return cls(tensor=TensorParallelConfig(world, group.rank), work=work, backend="mpi",
                       reason=f"{world} MPI ranks: tensor parallelism, each rank holds 1/{world} "
                              "of every weight")
        if world <= config.n_layers:
            return cls(pipeline_stages=world, work=work, backend="mpi",
                       pipeline_config=PipelineConfig(async_execution=True),
                       reason=f"{world} MPI ranks, more than the {config.n_heads} heads: a pipeline "
                              f"of {world} stages")
        raise TorchlessError(f"--parallel auto: {world} MPI ranks cannot split {config.n_heads} "
                             f"heads or {config.n_layers} layers")

    def spec(self) -> str:
        """The string form, as --parallel takes it."""
        parts = [f"tp={self.tensor.world_size}"] if self.tensor.world_size > 1 else []
        if self.pipeline_stages > 1:
            parts += [f"pp={self.pipeline_stages}", f"mb={self.pipeline_config.num_micro_batches}"]
        return ",".join(parts) or "none"

    @classmethod
    def from_string(cls, spec: str) -> "ParallelConfig":
        """'tp=2', 'pp=2,mb=4', 'tp=2,pp=2' or 'auto' (the CLI's --parallel)."""
        spec = (spec or "").strip()
        if spec in ("", "none", "1"):
            return cls.default()
        if spec == "auto":
            return cls.for_model()
        values = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in ("tp", "pp", "mb"):
                raise TorchlessError(f"--parallel {spec!r}: expected tp=N, pp=N, mb=N or auto")
            try:
                values[key.strip()] = int(value)
            except ValueError:
                raise TorchlessError(f"--parallel {spec!r}: {key}={value!r} is not a number") from None
            if values[key.strip()] < 1:
                raise TorchlessError(f"--parallel {spec!r}: {key} must be at least 1")
        backend = _backend()
        rank = 0
        if backend == "mpi":
            from ..distributed import current_group

            rank = current_group().rank
        tp = values.get("tp", 1)
        return cls(tensor=TensorParallelConfig(tp, rank % tp),
                   pipeline_stages=values.get("pp", 1),
                   pipeline_config=PipelineConfig(num_micro_batches=values.get("mb", 4),
                                                  async_execution=True),
                   backend=backend)


def _backend() -> str:
    from ..distributed import current_group

    return "mpi" if current_group().world_size > 1 else "threads"


# -- tensor parallelism --------------------------------------------------------------------------

def splits(first: TensorParallelStrategy, second: TensorParallelStrategy, block: str) -> bool:
    """Whether a block's strategies split it (column- then row-parallel: Megatron's split, one
    all-reduce) or replicate it (none and none: every rank computes all of it)."""
    if (first, second) == (TensorParallelStrategy.COLUMN_PARALLEL, TensorParallelStrategy.ROW_PARALLEL):
        return True
    if (first, second) == (TensorParallelStrategy.NONE, TensorParallelStrategy.NONE):
        return False
    raise TorchlessError(f"tensor parallelism: the {block} as {first.value} then {second.value} "
                         "is not supported; use column then row (split) or none and none (replicated)")


def shard_layout(config, tp: TensorParallelConfig, align: int) -> tuple[ShardLayout, dict]:
    """This rank's heads, FFN rows and vocabulary rows, as tp's strategies split them; raises
    if the world cannot split them."""
    world, hd = tp.world_size, config.head_dim
    kv_of_q = np.arange(config.n_heads) // (config.n_heads // config.n_kv_heads)
    q0, q1 = 0, config.n_heads
    if splits(tp.attention_qkv_strategy, tp.attention_output_strategy, "attention"):
        if world > config.n_heads:
            raise TorchlessError(f"tensor parallelism over {world} ranks cannot split "
                                 f"{config.n_heads} attention heads (at most {config.n_heads} ranks)")
        q0, q1 = tp.local_range(config.n_heads)
        if (q0 * hd) % align or (q1 * hd) % align:
            raise TorchlessError(f"tensor parallelism over {world} ranks splits the attention output "
                                 f"at column {q0 * hd}, not a multiple of its {align}-value blocks")
    k0, k1 = int(kv_of_q[q0]), int(kv_of_q[q1 - 1]) + 1  # a KV head is replicated where needed
    i0, i1 = 0, config.intermediate_size
    if splits(tp.mlp_gate_up_strategy, tp.mlp_down_strategy, "MLP"):
        try:
            i0, i1 = tp.local_range_aligned(config.intermediate_size, align)
        except ValueError as e:
            raise TorchlessError(f"tensor parallelism over {world} ranks: {e}") from None
        if i0 == i1:
            raise TorchlessError(f"tensor parallelism over {world} ranks cannot split the FFN of "
                                 f"{config.intermediate_size} in blocks of {align}")
    layout = ShardLayout(q1 - q0, k1 - k0, i1 - i0, tuple(int(k - k0) for k in kv_of_q[q0:q1]))
    return layout, {"q": (q0 * hd, q1 * hd), "kv": (k0 * hd, k1 * hd), "ffn": (i0, i1),
                    "vocab": tp.local_range(config.vocab_size)}


def _second(linear: Linear, start: int, stop: int, group) -> Linear:
    """The second product of a block: row-parallel over this rank's inputs, or whole where the
    block is replicated."""
    if (start, stop) == (0, linear.shape[1]):
        return linear
    return RowParallelLinear(linear, start, stop, group)


class TensorParallelMistral(Mistral):
    """One tensor-parallel rank of the model: 1/world of every layer's weights."""

    @classmethod
    def load(cls, params, tp_config: TensorParallelConfig, group=None) -> "TensorParallelMistral":
        full = Mistral.load(params, fast=False)  # views into the file; nothing read yet
        return cls.shard(full, tp_config, group)

    @classmethod
    def shard(cls, full: Mistral, tp: TensorParallelConfig, group=None,
              prepare: bool = True) -> "TensorParallelMistral":
        """This rank's shard of `full` (lazily loaded). prepare=False leaves the repacking to
        the caller (a pipeline stage repacks only its own layers)."""
        if tp.world_size > 1 and group is None:
            from ..distributed import current_group

            group = current_group()
        if group is not None and group.world_size != tp.world_size:
            raise TorchlessError(f"tensor parallelism over {tp.world_size} ranks, but the process "
                                 f"group has {group.world_size}")
        moe = full.config.n_experts > 0  # expert parallel: whole experts per rank, no FFN split
        first = full.layers[0]
        align = max(_block_size(first.attn_output), 1 if moe else _block_size(first.ffn_down))
        layout, r = shard_layout(full.config, dataclasses.replace(
            tp, mlp_gate_up_strategy=TensorParallelStrategy.NONE,
            mlp_down_strategy=TensorParallelStrategy.NONE) if moe else tp, align)
        group = group if tp.world_size > 1 else _Alone()
        # By tp's strategies, column-parallel (split output features): Q/K/V, gate, up; row-
        # parallel (split input features, all-reduced): the attention output and down projection.
        # Norms (the per-head q/k norms too) are whole on every rank. A MoE FFN keeps this
        # rank's experts (model/moe.py), summed over the group by its own all-reduce.
        layers = [dataclasses.replace(
            layer,
            attn_q=layer.attn_q.rows(*r["q"]), attn_k=layer.attn_k.rows(*r["kv"]),
            attn_v=layer.attn_v.rows(*r["kv"]),
            attn_output=_second(layer.attn_output, *r["q"], group),
            **(dict(moe=layer.moe.shard(tp, group)) if layer.moe is not None else dict(
                ffn_gate=layer.ffn_gate.rows(*r["ffn"]), ffn_up=layer.ffn_up.rows(*r["ffn"]),
                ffn_down=_second(layer.ffn_down, *r["ffn"], group)))) for layer in full.layers]
        output = VocabParallelLinear(full.output, *r["vocab"], group)
        model = cls(full.config, full.embedding, layers, full.output_norm, output, layout)
        model.tp_config, model.group = tp, group
        return model.prepare_fast(release_pages) if prepare else model


class _Alone:
    """The group of a world of one: its all-reduce is the identity."""

    rank, world_size = 0, 1

    def all_reduce_sum(self, array):
        return array


def _block_size(linear: Linear) -> int:
    from ..quant import BLOCK_LAYOUT

    return BLOCK_LAYOUT[linear.weight.ggml_type][0]


# -- the seed's parallel modules: views over one layer of the model ------------------------------

class ParallelInferenceState:
    """An InferenceState plus the parallel layer's own buffers (the per-rank states of
    in-process shards); `as_inference_state()` is the state the caller reads logits from."""

    def __init__(self, model_config, parallel_config: ParallelConfig | None = None,
                 max_seq_len: int | None = None, states: list[InferenceState] | None = None):
        self.config = model_config
        self.parallel_config = parallel_config or ParallelConfig.default()
        self.states = states or [InferenceState(model_config, max_seq_len)]

    def as_inference_state(self) -> InferenceState:
        return self.states[0]

    @property
    def pos(self) -> int:
        return self.states[0].pos

    @property
    def logits(self) -> np.ndarray:
        return self.states[0].logits

    @property
    def max_seq_len(self) -> int:
        return self.states[0].max_seq_len

    def reset(self):
        for s in self.states:
            s.reset()


class _DecodeStep:
    """One of the model's own decode steps for one layer, over a plain or parallel state."""

    step = ""  # the Mistral method this block runs

    def __init__(self, model: Mistral, layer_idx: int):
        self.model, self.layer_idx = model, layer_idx

    def forward_adaptive(self, state, work_config: WorkDistributionConfig | None = None):
        state = _plain(state)
        getattr(self.model, self.step)(self.layer_idx, state, work_config)
        return state.x


class ParallelAttention(_DecodeStep):
    """The attention block of one layer of `model`, run with a given work distribution."""

    step = "decode_attention"


class ParallelMLP(_DecodeStep):
    """The SwiGLU block of one layer of `model`: adaptive, or tensor-parallel when the model is
    a TensorParallelMistral shard (its products are this rank's, then all-reduced)."""

    step = "decode_mlp"

    def forward_tensor_parallel(self, state, tp_config: TensorParallelConfig | None = None):
        tp = getattr(self.model, "tp_config", TensorParallelConfig())
        if tp_config is not None and tp_config != tp:
            raise TorchlessError(f"this MLP is sharded as {tp}, not {tp_config}")
        return self.forward_adaptive(state)


class ParallelLayer:
    """One decoder layer: ParallelAttention then ParallelMLP."""

    def __init__(self, model: Mistral, layer_idx: int):
        self.attention = ParallelAttention(model, layer_idx)
        self.mlp = ParallelMLP(model, layer_idx)

    def forward(self, state, work_config: WorkDistributionConfig | None = None):
        self.attention.forward_adaptive(state, work_config)
        return self.mlp.forward_adaptive(state, work_config)


def _plain(state) -> InferenceState:
    return state.as_inference_state() if isinstance(state, ParallelInferenceState) else state
