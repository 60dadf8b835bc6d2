"""Runners: what the engine runs micro-batches on, and the one factory that picks one.

A runner takes micro-batches (lists of `Span`s: runs of tokens of different sequences) with
`submit(tag, spans)` and hands back `(tag, logits)` from `collect()`, one row of logits per
span (its last token), or the exception that micro-batch raised. `depth` says how many
micro-batches it can usefully hold at once: 1 for a model in this process, the micro-batch count
for a pipeline, whose stages work on different micro-batches at the same time.

Under mpiexec only rank 0 runs the engine (`is_driver`); the other ranks call `follow()`, which
runs whatever rank 0's runner sends them until rank 0 closes it.

    model in this process       LocalRunner               (here)
    tensor shards on threads    ThreadedTensorParallel    (shards.py)
    pipeline on threads         PipelineParallelMistral   (pipeline.py)
    tensor shards on MPI ranks  MPITensorParallel         (tp_mpi.py)
    pipeline on MPI ranks       MPIPipelineMistral        (pipeline_mpi.py, tp x pp too)
"""

from __future__ import annotations

from collections import deque

from ..errors import TorchlessError
from ..kernels.gemm import single_threaded_blas
from ..kernels.workdist import WorkDistributionConfig
from .batch_split import BatchSplit
from .kv_cache import KVCache


class Runner:
    """The protocol, with the defaults of a runner in one process."""

    depth = 1
    is_driver = True
    group = None  # the MPI group whose ranks share the model; None in one process

    def new_state(self, max_seq_len: int):
        return self.model.new_state(max_seq_len)

    def release(self, state) -> None:
        """The sequence of `state` is done: its caches (on every rank) may go."""

    def cache_bytes(self, n_tokens: int) -> int:
        """KV cache memory in this process of a sequence of n_tokens."""
        return KVCache.bytes_for(self.config, self.config.n_kv_heads, n_tokens)

    def has_room(self, spans) -> bool:
        return True

    def caches(self, state) -> list:
        """A sequence's KV caches in this process, one per shard, for the engine's prefix
        cache; empty where some live in other processes (MPI ranks), which turns it off."""
        return []

    def micro_batch_rows(self, running: int) -> int:
        """How many of the `running` sequences go into one micro-batch: all of them when one
        micro-batch is in flight at a time, else a fair share of the `depth`."""
        return max(1, -(-running // self.depth))

    def submit(self, tag, spans) -> None:
        raise NotImplementedError

    def collect(self):
        raise NotImplementedError

    def end_call(self) -> None:
        """The driver's engine is idle at the end of a library call: followers' `follow()`
        returns (True), so every rank goes on to the caller's next line."""

    def follow(self) -> bool:
        """Ranks other than 0: run the driver's micro-batches until it ends the call (True) or
        closes the runner (False)."""
        raise TorchlessError(f"{type(self).__name__} runs in one process: nothing to follow")

    def weight_bytes_per_token(self) -> int:
        return self.model.weight_bytes_per_token()

    def linears(self) -> list:
        """The linear layers this process holds."""
        return self.model.linears()

    def close(self) -> None:
        pass


class LocalRunner(Runner):
    """The whole model in this process: each micro-batch runs when submitted."""

    def __init__(self, model):
        self.model, self.config, self._done = model, model.config, deque()
        self._split = BatchSplit()  # a decode step's sequences in parts, a thread each

    def caches(self, state) -> list:
        return [state.cache]

    def submit(self, tag, spans) -> None:
        try:
            with single_threaded_blas():  # the big products split over our own threads
                self._done.append((tag, self._split.forward(self.model, spans)))
        except Exception as e:  # noqa: BLE001 - this micro-batch fails, the runner goes on
            self._done.append((tag, e))

    def collect(self):
        return self._done.popleft()

    def close(self) -> None:
        self._split.close()


def make_runner(params, parallel=None) -> Runner:
    """The runner for a parallel configuration (a ParallelConfig, its string form, or None
    for one process; "auto": ParallelConfig.for_model). Under mpiexec every rank calls this and
    gets its own part of the model. The runner keeps the configuration it ran (`parallel`) and
    what the NUMA hint did (`numa`)."""
    from .parallel import ParallelConfig

    if isinstance(parallel, str):
        auto = parallel.strip() == "auto"
        parallel = ParallelConfig.for_model(params.config) if auto else ParallelConfig.from_string(parallel)
    parallel = parallel or ParallelConfig.default()
    runner = _make(params, parallel)
    runner.parallel = parallel
    runner.numa = _apply_numa(runner, parallel)
    return runner


def _apply_numa(runner, parallel):
    """With `work.numa_aware`: an MPI rank pins its threads to the node it runs on; one process
    interleaves the weights' pages over the nodes, since all its threads read all of them. On
    one node this does nothing, and the hint's `reason` says so."""
    from ..kernels.workdist import NumaHint

    if not parallel.work.numa_aware:
        return None
    if parallel.backend == "mpi":
        return NumaHint.local()
    hint = NumaHint.interleaved()
    for linear in runner.linears():
        for array in (linear.packed.codes, linear.packed.scale):
            hint.apply_to(array)
    return hint


def _make(params, parallel) -> Runner:
    from .mistral import Mistral

    world, stages = parallel.tensor.world_size, parallel.pipeline_stages
    if world == 1 and stages == 1:
        model = Mistral.load(params)
        if parallel.work != WorkDistributionConfig():
            model.work = parallel.work  # the decode steps' task sizes
        return LocalRunner(model)
    if parallel.backend == "mpi":
        from ..distributed import current_group

        group = current_group()
        if group.world_size != stages * world:
            each = {(True, True): "stage and shard", (True, False): "stage"}.get(
                (stages > 1, world > 1), "shard")
            raise TorchlessError(f"--parallel {parallel.spec()} needs {stages * world} MPI ranks "
                                 f"(one per {each}), but mpiexec started {group.world_size}")
        if stages > 1:
            from .pipeline_mpi import MPIPipelineMistral

            return MPIPipelineMistral.load(params, group, parallel.pipeline_config, tp=world)
        from .tp_mpi import MPITensorParallel

        return MPITensorParallel.load(params, parallel.tensor, group)
    if stages > 1:
        if world > 1:
            raise TorchlessError("tensor and pipeline parallelism together (tp=N,pp=S) run under "
                                 "mpiexec only, one rank per shard of each stage")
        from .pipeline import PipelineParallelMistral

        return PipelineParallelMistral(Mistral.load(params), stages, parallel.pipeline_config)
    from .shards import ThreadedTensorParallel

    return ThreadedTensorParallel.load(params, world, parallel.tensor)
