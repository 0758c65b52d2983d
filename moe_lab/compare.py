"""Run every path on the same inputs on real ranks and check each against the reference."""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from .comm import RecordingComm
from .errors import InputError
from .launch import DEFAULT_TIMEOUT_S, RankContext, resolve_backend, run_ranks, run_torchrun_rank
from .moe import init_experts, init_shared_experts, reference_forward
from .paths import PATHS, LocalLayer, RankBatch, get_path, moe_forward
from .stats import Spread, spread
from .workload import Workload, WorkloadSpec, build_workload

log = logging.getLogger(__name__)

PHASES = ("metadata", "dispatch", "compute", "combine")
COMM_PHASES = ("metadata", "dispatch", "combine")
# Largest allowed max|path - reference| / max|reference| per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass(frozen=True)
class CompareOptions:
    spec: WorkloadSpec = WorkloadSpec()
    paths: tuple[str, ...] = tuple(PATHS)
    repeats: int = 5
    warmup: int = 1
    backend: str = "auto"
    timeout_s: float = DEFAULT_TIMEOUT_S
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables for the ranks


@dataclass
class PathResult:
    path: str
    rank_outputs: list[torch.Tensor]
    records: list[list[dict]]  # per rank, the collectives of the last repeat
    timings: list[list[dict[str, float]]]  # per rank, per repeat: seconds per phase
    segments: list[list[tuple[str, float, float]]]  # per rank, the phase timeline of the last repeat
    wall_seconds: float = 0.0  # warm-up and repeats of this path, slowest rank
    error: float = float("nan")  # max |path - reference| / max |reference| over all ranks
    passed: bool = False
    # per rank, per repeat: seconds of each collective call in issue order (None on CUDA)
    call_seconds: list[list[list[float | None]]] = field(default_factory=list)

    def bytes_by_phase(self, rank: int, key: str = "sent_bytes") -> dict[str, int | None]:
        totals: dict[str, int | None] = {phase: 0 for phase in COMM_PHASES}
        for record in self.records[rank]:
            value = record[key]
            if value is None:
                totals[record["phase"]] = None
            elif totals.get(record["phase"]) is not None:
                totals[record["phase"]] = totals.get(record["phase"], 0) + value
        return totals

    def phase_seconds(self, phase: str) -> float:
        """Median over repeats of the slowest rank's time in `phase`."""
        per_repeat = zip(*self.timings)  # each item: one repeat, every rank
        return statistics.median(max(rank.get(phase, 0.0) for rank in ranks) for ranks in per_repeat)

    def total_seconds(self) -> float:
        per_repeat = zip(*self.timings)
        return statistics.median(max(sum(rank.values()) for rank in ranks) for ranks in per_repeat)

    @property
    def repeats(self) -> int:
        return len(self.timings[0]) if self.timings else 0

    def phase_spread(self, phase: str) -> Spread:
        """Median, p10 and p90 over repeats of the slowest rank's time in `phase`."""
        return spread(max(rank.get(phase, 0.0) for rank in ranks) for ranks in zip(*self.timings))

    def total_spread(self) -> Spread:
        return spread(max(sum(rank.values()) for rank in ranks) for ranks in zip(*self.timings))

    def comm_spread(self) -> Spread:
        """Time in the communication phases (metadata, dispatch, combine) of the slowest rank."""
        return spread(
            max(sum(rank.get(phase, 0.0) for phase in COMM_PHASES) for rank in ranks) for ranks in zip(*self.timings)
        )

    def collective_spread(self) -> Spread | None:
        """Time inside the collective calls alone, per repeat, over repeats.

        A rank that reaches a collective early waits there for the others, so each call is
        timed by the rank that spent least in it (the last to arrive): the call's own time.
        None where calls were not timed (CUDA, where they run asynchronously).
        """
        if not self.call_seconds or any(
            seconds is None for rank in self.call_seconds for repeat in rank for seconds in repeat
        ):
            return None
        per_repeat = []
        for ranks in zip(*self.call_seconds):  # one repeat: each rank's list of call seconds
            per_repeat.append(sum(min(calls) for calls in zip(*ranks)))
        return spread(per_repeat)


@dataclass
class CompareResult:
    options: CompareOptions
    workload: Workload
    backend: str
    paths: list[PathResult] = field(default_factory=list)
    wall_seconds: float = 0.0
    reference_seconds: float = 0.0


def rank_batch(workload: Workload, rank: int, whole_batch: bool, device: torch.device) -> RankBatch:
    ids_all, weights_all = workload.routing.concat()
    batch = RankBatch(
        x=workload.hidden[rank].to(device),
        topk_ids=workload.routing.topk_ids[rank].to(device),
        topk_weights=workload.routing.topk_weights[rank].to(device),
        offset=workload.token_offset(rank),
    )
    if whole_batch:
        batch.x_all = torch.cat(workload.hidden).to(device)
        batch.topk_ids_all = ids_all.to(device)
        batch.topk_weights_all = weights_all.to(device)
    return batch


@functools.lru_cache(maxsize=1)
def _expert_weights(cfg, expert_ids: tuple[int, ...], seed: int, dtype: torch.dtype):
    """Routed and shared expert weights, kept for the next workload of the same shape.

    Drawing DeepSeek-V2-Lite's experts takes seconds, and a sweep runs many workloads of one
    shape in a row. Callers must not modify the returned tensors.
    """
    return init_experts(cfg, list(expert_ids), seed, dtype), init_shared_experts(cfg, seed, dtype)


def _on_device(weights, device: torch.device):
    if weights is None:
        return None
    moved = {name: value.to(device) for name, value in vars(weights).items() if isinstance(value, torch.Tensor)}
    return dataclasses.replace(weights, **moved)


def local_layer(workload: Workload, rank: int, device: torch.device) -> LocalLayer:
    experts, shared = _expert_weights(
        workload.cfg, tuple(workload.placement.local_experts(rank)), workload.seed, workload.dtype
    )
    return LocalLayer(workload.placement, _on_device(experts, device), _on_device(shared, device))


def compare_rank(
    ctx: RankContext, specs: tuple[WorkloadSpec, ...], path_names: tuple[str, ...], repeats: int, warmup: int
) -> list[dict]:
    """One rank's side of `compare`, for each workload in turn: one launch serves many checks."""
    return [measure_workload(ctx, spec, path_names, repeats, warmup) for spec in specs]


def measure_workload(ctx: RankContext, spec: WorkloadSpec, path_names: tuple[str, ...], repeats: int, warmup: int) -> dict:
    """Run each path on one workload, warm-up first, and return what this rank measured."""
    workload = build_workload(spec)
    if workload.world_size != ctx.world_size:
        raise ValueError(f"workload has {workload.world_size} ranks but {ctx.world_size} were started")
    layer = local_layer(workload, ctx.rank, ctx.device)
    comm = RecordingComm(device=ctx.device)
    measured = {}
    for name in path_names:
        path = get_path(name)
        batch = rank_batch(workload, ctx.rank, path.holds_whole_batch, ctx.device)
        timings, call_seconds = [], []
        started = time.perf_counter()
        for repeat in range(warmup + repeats):
            comm.barrier()  # barrier-aligned start, so the slowest rank sets the layer time
            comm.reset()
            try:
                output = moe_forward(path, comm, layer, batch)
            except BaseException as err:
                err.moe_lab_phase = f"{name}/{getattr(err, 'moe_lab_phase', 'setup')}"
                raise
            if repeat >= warmup:
                timings.append(comm.clock.totals())
                call_seconds.append([record.seconds for record in comm.records])
        measured[name] = {
            "output": output.cpu(),
            "records": [record.to_dict() for record in comm.records],
            "timings": timings,
            "call_seconds": call_seconds,
            "segments": comm.clock.segments(),
            "seconds": time.perf_counter() - started,  # warm-up and repeats, wall time on this rank
        }
    return {"backend": ctx.backend, "paths": measured}


def reference_output(workload: Workload) -> torch.Tensor:
    """The whole batch through the single-process reference, (T, H)."""
    cfg = workload.cfg
    experts, shared = _expert_weights(cfg, tuple(range(cfg.n_experts)), workload.seed, workload.dtype)
    ids, weights = workload.routing.concat()
    return reference_forward(torch.cat(workload.hidden), ids, weights, experts, shared)


def relative_error(output: torch.Tensor, expected: torch.Tensor, scale: float) -> float:
    if expected.numel() == 0:
        return 0.0 if output.numel() == 0 else float("inf")
    if output.shape != expected.shape:
        return float("inf")
    return float((output.float() - expected.float()).abs().max()) / max(scale, 1e-30)


def check_against_reference(result: PathResult, reference: torch.Tensor, workload: Workload) -> None:
    scale = float(reference.float().abs().max()) if reference.numel() else 1.0
    errors = []
    for rank, output in enumerate(result.rank_outputs):
        if get_path(result.path).holds_whole_batch:
            expected = reference
        else:
            start = workload.token_offset(rank)
            expected = reference[start : start + workload.tokens_per_rank[rank]]
        errors.append(relative_error(output, expected, scale))
    result.error = max(errors) if errors else 0.0
    result.passed = result.error <= TOLERANCE[workload.dtype]


def run_compare(options: CompareOptions) -> CompareResult:
    """Run the chosen paths on real ranks and check each against the reference."""
    return run_compare_many([options.spec], options)[0]


def run_compare_many(specs: list[WorkloadSpec], options: CompareOptions) -> list[CompareResult]:
    """`run_compare` for many workloads, with one launch of ranks per world size.

    `options.spec` is ignored; every other option applies to each workload.
    """
    for name in options.paths:
        get_path(name)
    if options.repeats < 1:
        raise InputError(f"repeats must be >= 1, got {options.repeats}")
    if options.warmup < 0:
        raise InputError(f"warmup must be >= 0, got {options.warmup}")
    workloads = [build_workload(spec) for spec in specs]  # validates every input before a rank starts

    results: list[CompareResult | None] = [None] * len(specs)
    for world_size in dict.fromkeys(workload.world_size for workload in workloads):
        indices = [i for i, workload in enumerate(workloads) if workload.world_size == world_size]
        backend = resolve_backend(options.backend, world_size)
        started = time.perf_counter()
        per_rank = run_ranks(
            compare_rank,
            (tuple(specs[i] for i in indices), tuple(options.paths), options.repeats, options.warmup),
            world_size=world_size,
            backend=backend,
            timeout_s=options.timeout_s,
            env=dict(options.env),
        )
        wall = time.perf_counter() - started
        for position, i in enumerate(indices):
            measured = [rank[position] for rank in per_rank]
            results[i] = _assemble(replace(options, spec=specs[i]), workloads[i], measured, wall)
    return results


def _assemble(options: CompareOptions, workload: Workload, per_rank: list[dict], wall: float) -> CompareResult:
    """Check every rank's outputs against the reference and collect them by path."""
    started = time.perf_counter()
    reference = reference_output(workload)
    reference_seconds = time.perf_counter() - started

    result = CompareResult(options, workload, per_rank[0]["backend"], wall_seconds=wall, reference_seconds=reference_seconds)
    for name in options.paths:
        measured = [rank["paths"][name] for rank in per_rank]
        path_result = PathResult(
            path=name,
            rank_outputs=[rank["output"] for rank in measured],
            records=[rank["records"] for rank in measured],
            timings=[rank["timings"] for rank in measured],
            segments=[rank["segments"] for rank in measured],
            wall_seconds=max(rank["seconds"] for rank in measured),
            call_seconds=[rank["call_seconds"] for rank in measured],
        )
        check_against_reference(path_result, reference, workload)
        result.paths.append(path_result)
    return result


def run_compare_torchrun(options: CompareOptions) -> CompareResult | None:
    """`run_compare` for a process started by torchrun: rank 0 returns the result, others None."""
    workload = build_workload(options.spec)
    started = time.perf_counter()
    per_rank = run_torchrun_rank(
        compare_rank, ((options.spec,), tuple(options.paths), options.repeats, options.warmup),
        backend=options.backend, timeout_s=options.timeout_s,
    )
    if per_rank is None:
        return None
    return _assemble(options, workload, [rank[0] for rank in per_rank], time.perf_counter() - started)
