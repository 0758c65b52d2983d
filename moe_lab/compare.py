"""Run every path on the same inputs on real ranks and check each against the reference."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from .checkpoint import open_checkpoint
from .comm import RecordingComm
from .errors import InputError
from .faults import check_fault_rank, fault_from_environment
from .launch import DEFAULT_TIMEOUT_S, RankContext, check_timeout, resolve_backend, run_ranks, run_torchrun_rank
from .moe import ExpertWeights, SharedExpertWeights, init_experts, init_shared_experts, reference_forward
from .paths import DISPATCH_DTYPES, PATHS, LocalLayer, PathOptions, RankBatch, get_path, moe_forward
from .stats import Spread, spread
from .workload import Workload, WorkloadSpec, build_workload

log = logging.getLogger(__name__)

PHASES = ("metadata", "dispatch", "compute", "combine")
COMM_PHASES = ("metadata", "dispatch", "combine")
# Largest allowed max|path - reference| / max|reference| per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# Compressed dispatch rounds the tokens on the wire, and results come back in bfloat16. e4m3 keeps
# 3 mantissa bits, so each element may be off by 1/16 of its value. The fp8 bound allows twice
# that, because a narrow expert can amplify it (hidden 16 with one token reaches 0.077).
DISPATCH_TOLERANCE = {"bfloat16": 2e-2, "fp8": 0.125}


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: a path and how it moves rows."""

    path: str
    options: PathOptions = PathOptions()

    @property
    def label(self) -> str:
        return "+".join([self.path] + ([self.options.label] if self.options.label else []))


def tolerance(dtype: torch.dtype, options: PathOptions) -> float:
    if options.dispatch_dtype is None:
        return TOLERANCE[dtype]
    return max(TOLERANCE[dtype], DISPATCH_TOLERANCE[options.dispatch_dtype])


@dataclass(frozen=True)
class CompareOptions:
    spec: WorkloadSpec = WorkloadSpec()
    paths: tuple[str, ...] = tuple(PATHS)
    repeats: int = 5
    warmup: int = 1
    backend: str = "auto"
    dispatch_dtypes: tuple[str, ...] = ()  # each adds a variant of every path that dispatches tokens
    overlap: bool = False  # adds an overlapped variant of every path that dispatches tokens
    chunks: int = 2  # chunks per rank for overlapped variants
    timeout_s: float = DEFAULT_TIMEOUT_S
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables for the ranks


def expand_variants(options: CompareOptions) -> tuple[Variant, ...]:
    """List the plain paths, then their dispatch-dtype and overlap variants, path by path."""
    variants = []
    for name in options.paths:
        path = get_path(name)
        plain = [Variant(name)]
        if not path.holds_whole_batch:  # only paths with a dispatch have variants
            plain += [Variant(name, PathOptions(dispatch_dtype=dtype)) for dtype in options.dispatch_dtypes]
        variants += plain
        if options.overlap and not path.holds_whole_batch:
            variants += [Variant(name, replace(v.options, overlap=True, chunks=options.chunks)) for v in plain]
    return tuple(variants)


@dataclass
class PathResult:
    path: str  # variant label, e.g. "alltoall+fp8"
    rank_outputs: list[torch.Tensor]
    records: list[list[dict]]  # per rank, the collectives of the last repeat
    timings: list[list[dict[str, float]]]  # per rank, per repeat: seconds per phase
    segments: list[list[tuple[str, float, float]]]  # per rank, the phase timeline of the last repeat
    wall_seconds: float = 0.0  # warm-up and repeats of this path, slowest rank
    error: float = float("nan")  # max |path - reference| / max |reference| over all ranks
    passed: bool = False
    variant: Variant | None = None
    # per rank, per repeat: seconds of each collective call in issue order (None on CUDA)
    call_seconds: list[list[list[float | None]]] = field(default_factory=list)

    @property
    def base_path(self) -> str:
        """The path this result's variant runs, e.g. "alltoall" for "alltoall+fp8"."""
        return self.variant.path if self.variant is not None else self.path

    @property
    def options(self) -> PathOptions:
        return self.variant.options if self.variant is not None else PathOptions()

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
    """Routed and shared expert weights drawn from the seed, kept for the next workload of the same shape.

    Drawing DeepSeek-V2-Lite's experts takes seconds, and a sweep runs many workloads of one
    shape in a row. Callers must not modify the returned tensors.
    """
    return init_experts(cfg, list(expert_ids), seed, dtype), init_shared_experts(cfg, seed, dtype)


def layer_weights(workload: Workload, expert_ids: list[int]) -> tuple[ExpertWeights, SharedExpertWeights | None]:
    """Read the routed experts `expert_ids` and the shared experts from the workload's checkpoint, or draw them from the seed."""
    if workload.checkpoint is not None:
        checkpoint = open_checkpoint(workload.checkpoint)
        experts = checkpoint.experts(workload.layer, expert_ids, workload.dtype)
        return experts, checkpoint.shared_experts(workload.layer, workload.dtype)
    return _expert_weights(workload.cfg, tuple(expert_ids), workload.seed, workload.dtype)


def _on_device(weights, device: torch.device):
    if weights is None:
        return None
    moved = {name: value.to(device) for name, value in vars(weights).items() if isinstance(value, torch.Tensor)}
    return dataclasses.replace(weights, **moved)


def local_layer(workload: Workload, rank: int, device: torch.device) -> LocalLayer:
    experts, shared = layer_weights(workload, workload.placement.local_experts(rank))
    return LocalLayer(workload.placement, _on_device(experts, device), _on_device(shared, device))


def compare_rank(
    ctx: RankContext, specs: tuple[WorkloadSpec, ...], variants: tuple[Variant, ...], repeats: int, warmup: int
) -> list[dict]:
    """Measure every workload in turn on this rank, so one launch of ranks serves many checks."""
    return [measure_workload(ctx, spec, variants, repeats, warmup) for spec in specs]


def measure_workload(
    ctx: RankContext, spec: WorkloadSpec, variants: tuple[Variant | str, ...], repeats: int, warmup: int
) -> dict:
    """Run each variant (or plain path name) on one workload, warm-up first, and return what this rank measured."""
    variants = tuple(variant if isinstance(variant, Variant) else Variant(variant) for variant in variants)
    workload = build_workload(spec)
    if workload.world_size != ctx.world_size:
        raise ValueError(f"workload has {workload.world_size} ranks but {ctx.world_size} were started")
    layer = local_layer(workload, ctx.rank, ctx.device)
    comm = RecordingComm(device=ctx.device, monitor=ctx.monitor)
    measured = {}
    for variant in variants:
        name = variant.label
        path = get_path(variant.path)
        if ctx.monitor is not None:
            ctx.monitor.set_path(name)
        batch = rank_batch(workload, ctx.rank, path.holds_whole_batch, ctx.device)
        timings, call_seconds = [], []
        started = time.perf_counter()
        for repeat in range(warmup + repeats):
            comm.barrier()  # barrier-aligned start, so the slowest rank sets the layer time
            comm.reset()
            try:
                output = moe_forward(path, comm, layer, batch, variant.options)
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
    """Run the whole batch through the single-process reference: (T, H)."""
    experts, shared = layer_weights(workload, list(range(workload.cfg.n_experts)))
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
        if get_path(result.variant.path).holds_whole_batch:
            expected = reference
        else:
            start = workload.token_offset(rank)
            expected = reference[start : start + workload.tokens_per_rank[rank]]
        errors.append(relative_error(output, expected, scale))
    result.error = max(errors) if errors else 0.0
    result.passed = result.error <= tolerance(workload.dtype, result.variant.options)


def check_options(options: CompareOptions) -> None:
    """Reject invalid run options before any rank starts; workloads are checked by `build_workload`."""
    if not options.paths:
        raise InputError(f"no path to run; choose from {', '.join(PATHS)}")
    for name in options.paths:
        get_path(name)
    for dtype in options.dispatch_dtypes:
        if dtype not in DISPATCH_DTYPES:
            raise InputError(f"unknown dispatch dtype {dtype!r}; choose from {', '.join(DISPATCH_DTYPES)}")
    for name, low in (("repeats", 1), ("warmup", 0), ("chunks", 1)):
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    check_timeout(options.timeout_s)
    fault_from_environment({**os.environ, **dict(options.env)})  # a malformed MOE_LAB_FAULT fails here


def run_compare(options: CompareOptions) -> CompareResult:
    """Run the chosen paths on real ranks and check each against the reference."""
    return run_compare_many([options.spec], options)[0]


def run_compare_many(specs: list[WorkloadSpec], options: CompareOptions) -> list[CompareResult]:
    """`run_compare` for many workloads, with one launch of ranks per world size.

    `options.spec` is ignored; every other option applies to each workload.
    """
    check_options(options)
    workloads = [build_workload(spec) for spec in specs]  # validates every input before a rank starts
    world_sizes = list(dict.fromkeys(workload.world_size for workload in workloads))
    backends = {world_size: resolve_backend(options.backend, world_size) for world_size in world_sizes}
    fault = fault_from_environment({**os.environ, **dict(options.env)})
    for world_size in world_sizes:
        check_fault_rank(fault, world_size)

    results: list[CompareResult | None] = [None] * len(specs)
    for world_size in world_sizes:
        indices = [i for i, workload in enumerate(workloads) if workload.world_size == world_size]
        backend = backends[world_size]
        started = time.perf_counter()
        per_rank = run_ranks(
            compare_rank,
            (tuple(specs[i] for i in indices), expand_variants(options), options.repeats, options.warmup),
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
    for variant in expand_variants(options):
        name = variant.label
        measured = [rank["paths"][name] for rank in per_rank]
        path_result = PathResult(
            path=name,
            variant=variant,
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
    check_options(options)
    workload = build_workload(options.spec)
    started = time.perf_counter()
    per_rank = run_torchrun_rank(
        compare_rank, ((options.spec,), expand_variants(options), options.repeats, options.warmup),
        backend=options.backend, timeout_s=options.timeout_s, env=dict(options.env),
    )
    if per_rank is None:
        return None
    return _assemble(options, workload, [rank[0] for rank in per_rank], time.perf_counter() - started)
