"""Microbenchmarks: raw collectives over message sizes, and the grouped expert compute.

Every collective goes through `RecordingComm`, with the same settings the paths use, so the
per-call overhead of recording is part of what is measured and fitted. Each timed call starts
right after a barrier. A rank that leaves the barrier early waits inside the call for the
others. So a call's time is taken from the rank that spent least in it (the last to arrive),
which is also how `PathResult.collective_spread` times the paths' calls.

Sizes follow nccl-tests: `size` is the larger of the send and receive buffers of one rank
(the whole buffer for all_reduce and broadcast, the gathered output for all_gather, the input
for reduce_scatter, the send buffer for all_to_all). algbw = size / time, and busbw = algbw
times the bus factor: 2(n-1)/n for all_reduce, (n-1)/n for all_gather, reduce_scatter and
all_to_all, 1 for broadcast.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, replace

import torch

from .bytes_model import pair_matrix
from .comm import RecordingComm
from .compare import COMM_PHASES, CompareOptions, CompareResult, PathResult, _assemble, local_layer, measure_workload
from .config import MoEConfig, resolve_config
from .costmodel import Link, fit_alpha_beta, link_from_calibration
from .errors import InputError
from .launch import RankContext, resolve_backend, run_ranks
from .moe import ExpertWeights, grouped_expert_forward, init_experts
from .paths import PATHS
from .stats import Spread, spread
from .workload import WorkloadSpec, build_workload, parse_dtype

log = logging.getLogger(__name__)

OPS = ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all_single")
# all_to_all_single with every row sent to the rank itself: nothing crosses a link, so its time
# is the library's local copy, which the cost model adds for the rows a path keeps on its rank.
SELF_COPY = "all_to_all_self"
DEFAULT_SIZES = tuple(8 * 4**i for i in range(12))  # 8 B to 32 MiB in steps of 4x
FEW_ITERS_ABOVE = 1 << 20  # bytes: larger messages get fewer iterations, each lasting milliseconds


def iterations_for(size: int, iters: int) -> int:
    """`iters` up to 1 MiB, then fewer in proportion to size, at least 3: every rank computes the same."""
    if size <= FEW_ITERS_ABOVE:
        return iters
    return max(3, iters * FEW_ITERS_ABOVE // size)
ELEMENT = torch.float32


def bus_factor(op: str, world_size: int) -> float:
    """nccl-tests' factor from algorithm bandwidth to bus bandwidth."""
    n = world_size
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all_single"):
        return (n - 1) / n
    if op == "broadcast":
        return 1.0
    if op == SELF_COPY:
        return 0.0
    raise InputError(f"unknown collective {op!r}; choose from {', '.join(OPS)}")


def element_count(size: int, world_size: int) -> int:
    """float32 elements of a `size`-byte buffer, rounded up to a multiple of world_size (at least one per rank)."""
    count = max(1, -(-size // ELEMENT.itemsize))
    return -(-count // world_size) * world_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # NOTE: CUDA timing path, not run on this machine (no GPU)


def _issue(comm: RecordingComm, op: str, buffer: torch.Tensor) -> None:
    n = comm.world_size
    if op == "all_reduce":
        comm.all_reduce(buffer, what="bench")
    elif op == "broadcast":
        comm.broadcast(buffer, src=0, what="bench")
    elif op == "all_gather":
        comm.all_gather(buffer[: buffer.numel() // n], what="bench")
    elif op == "reduce_scatter":
        comm.reduce_scatter(buffer, what="bench")
    elif op == "all_to_all_single":
        rows = [buffer.numel() // n] * n
        comm.all_to_all_single(buffer, rows, rows, what="bench")
    elif op == SELF_COPY:
        rows = [buffer.numel() if peer == comm.rank else 0 for peer in range(n)]
        comm.all_to_all_single(buffer, rows, rows, what="bench")
    else:
        raise ValueError(f"unknown collective {op!r}; choose from {', '.join(OPS)}")


def collectives_rank(ctx: RankContext, ops: tuple[str, ...], sizes: tuple[int, ...], iters: int, warmup: int) -> list[dict]:
    """Time each collective at each size on this rank: one entry per (op, size)."""
    comm = RecordingComm(device=ctx.device)
    results = []
    for op in ops:
        for size in sizes:
            count = element_count(size, ctx.world_size)
            buffer = torch.ones(count, dtype=ELEMENT, device=ctx.device)
            seconds = []
            for iteration in range(warmup + iterations_for(count * ELEMENT.itemsize, iters)):
                comm.barrier()
                comm.reset()
                _sync(ctx.device)
                start = time.perf_counter()
                _issue(comm, op, buffer)
                _sync(ctx.device)
                if iteration >= warmup:
                    seconds.append(time.perf_counter() - start)
            record = comm.records[-1]
            results.append({
                "op": op, "size": count * ELEMENT.itemsize, "count": count, "seconds": seconds,
                "sent_bytes": record.sent_bytes, "recv_bytes": record.recv_bytes, "os_sent_bytes": record.os_sent_bytes,
            })
    return results


@dataclass
class CollectivePoint:
    """One (collective, size) across ranks."""

    op: str
    size: int  # bytes, nccl-tests convention (see module docstring)
    count: int  # float32 elements of that buffer
    world_size: int
    time: Spread  # seconds per call: per iteration the least time over ranks
    wire_bytes: int  # largest bytes any rank sends or receives, by the wire model
    os_sent_bytes: int | None  # largest bytes any rank wrote to its sockets (gloo), else None

    @property
    def algbw(self) -> float:
        return self.size / self.time.median

    @property
    def busbw(self) -> float:
        return self.algbw * bus_factor(self.op, self.world_size)


def assemble_points(per_rank: list[list[dict]]) -> list[CollectivePoint]:
    points = []
    world_size = len(per_rank)
    for entries in zip(*per_rank):  # the same (op, size) on every rank
        first = entries[0]
        per_iteration = [min(times) for times in zip(*(entry["seconds"] for entry in entries))]
        os_values = [entry["os_sent_bytes"] for entry in entries]
        points.append(CollectivePoint(
            op=first["op"], size=first["size"], count=first["count"], world_size=world_size,
            time=spread(per_iteration),
            wire_bytes=max(max(entry["sent_bytes"], entry["recv_bytes"]) for entry in entries),
            os_sent_bytes=None if any(value is None for value in os_values) else max(os_values),
        ))
    return points


# -- expert compute ------------------------------------------------------------------------


def _time_call(fn, repeats: int, warmup: int, device: torch.device) -> Spread:
    seconds = []
    for iteration in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if iteration >= warmup:
            seconds.append(time.perf_counter() - start)
    return spread(seconds)


def routed_flops(cfg: MoEConfig, rows: int) -> int:
    """FLOPs of `rows` (token, expert) rows through one SwiGLU expert: gate, up and down matmuls."""
    return 2 * 3 * cfg.hidden * cfg.moe_intermediate * rows


def grouped_vs_dense(
    cfg: MoEConfig, local_expert: torch.Tensor, experts: ExpertWeights, dtype: torch.dtype, device: torch.device,
    repeats: int, warmup: int = 1, seed: int = 0,
) -> dict:
    """Time the grouped expert forward on rows assigned by `local_expert`, and one dense matmul of equal FLOPs.

    The dense matmul is (N, H) @ (H, 3I): 2 * N * H * 3I FLOPs, the same as N rows through
    gate (H->I), up (H->I) and down (I->H). Returns seconds and FLOP rates of both.
    """
    rows = local_expert.numel()
    n_local = experts.n_local
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cfg.hidden, generator=generator).to(dtype).to(device)
    local_expert = local_expert.to(device)
    weight = torch.randn(cfg.hidden, 3 * cfg.moe_intermediate, generator=generator).to(dtype).to(device)

    grouped = _time_call(lambda: grouped_expert_forward(x, local_expert, experts), repeats, warmup, device)
    dense = _time_call(lambda: x @ weight, repeats, warmup, device)
    flops = routed_flops(cfg, rows)
    return {
        "rows": rows, "experts": n_local, "flops": flops,
        "grouped_seconds": grouped, "dense_seconds": dense,
        "grouped_flops_per_s": flops / grouped.median if rows else float("nan"),
        "dense_flops_per_s": flops / dense.median if rows else float("nan"),
    }


def compute_rate_table(
    cfg: MoEConfig, dtype: torch.dtype, device: torch.device, rows_per_expert: tuple[int, ...], experts: int = 4, repeats: int = 3,
) -> list[dict]:
    """Grouped expert FLOP rate at several rows per expert, for the cost model's compute time.

    Small batches leave matmuls short, so the rate depends on rows per expert; the cost model
    interpolates this table.
    """
    table = []
    weights = init_experts(cfg, list(range(experts)), seed=0, dtype=dtype)
    for name in ("w_gate", "w_up", "w_down"):
        setattr(weights, name, getattr(weights, name).to(device))
    for per_expert in rows_per_expert:
        local_expert = torch.arange(experts).repeat_interleave(per_expert)
        measured = grouped_vs_dense(cfg, local_expert, weights, dtype, device, repeats)
        table.append({"rows_per_expert": per_expert, "flops_per_s": measured["grouped_flops_per_s"],
                      "dense_flops_per_s": measured["dense_flops_per_s"]})
    return table


# -- calibration: both microbenchmarks in one launch -------------------------------------

DEFAULT_ROWS_PER_EXPERT = (1, 4, 16, 64, 256)


@dataclass(frozen=True)
class CalibrationOptions:
    world_size: int = 2
    backend: str = "auto"
    ops: tuple[str, ...] = OPS
    sizes: tuple[int, ...] = DEFAULT_SIZES
    iters: int = 20
    warmup: int = 2
    preset: str | None = "deepseek-v2-lite"  # shape for the compute rate table; None skips it
    dtype: str = "float32"
    rows_per_expert: tuple[int, ...] = DEFAULT_ROWS_PER_EXPERT
    timeout_s: float = 120.0
    local_copy: bool = True  # also time SELF_COPY, for the cost model's local-copy term


def calibrate_rank(ctx: RankContext, options: CalibrationOptions) -> dict:
    """Run this rank's side of the calibration: collectives first, then the compute rate table."""
    ops = options.ops + ((SELF_COPY,) if options.local_copy else ())
    points = collectives_rank(ctx, ops, options.sizes, options.iters, options.warmup)
    compute = []
    if options.preset is not None:
        cfg = resolve_config(options.preset)
        compute = compute_rate_table(cfg, parse_dtype(options.dtype), ctx.device, options.rows_per_expert)
    return {"points": points, "compute": compute}


def calibration_document(options: CalibrationOptions, backend: str, per_rank: list[dict]) -> dict:
    """Points, alpha-beta fits and compute table, ready to save as JSON (see costmodel.load_calibration)."""
    points = assemble_points([rank["points"] for rank in per_rank])
    fits = {}
    for op in options.ops:
        mine = [point for point in points if point.op == op]
        fit = fit_alpha_beta([point.wire_bytes for point in mine], [point.time.median for point in mine])
        fits[op] = {"alpha": fit.alpha, "beta": fit.beta, "max_relative_error": fit.max_relative_error}
    local_copy = None
    own = [point for point in points if point.op == SELF_COPY]
    if len(own) >= 2:
        fit = fit_alpha_beta([point.size for point in own], [point.time.median for point in own])
        local_copy = {"alpha": fit.alpha, "beta": fit.beta, "max_relative_error": fit.max_relative_error}
    compute = []
    for entries in zip(*(rank["compute"] for rank in per_rank)):  # mean over ranks, which ran at the same time
        compute.append({
            "rows_per_expert": entries[0]["rows_per_expert"],
            "flops_per_s": sum(entry["flops_per_s"] for entry in entries) / len(entries),
            "dense_flops_per_s": sum(entry["dense_flops_per_s"] for entry in entries) / len(entries),
        })
    return {
        "backend": backend,
        "world_size": options.world_size,
        "iters": options.iters,
        "warmup": options.warmup,
        "points": [
            {"op": p.op, "size": p.size, "count": p.count, "time_s": p.time.median, "p10_s": p.time.p10,
             "p90_s": p.time.p90, "iters": p.time.n, "algbw": p.algbw, "busbw": p.busbw,
             "wire_bytes": p.wire_bytes, "os_sent_bytes": p.os_sent_bytes}
            for p in points
        ],
        "fits": fits,
        "local_copy": local_copy,  # t = alpha + beta * bytes a rank copies to itself (SELF_COPY)
        "compute": compute,
        "compute_shape": {"preset": options.preset, "dtype": options.dtype, "experts": 4},
    }


def run_calibration(options: CalibrationOptions) -> dict:
    """Measure the collectives and the expert compute on real ranks and fit the cost model."""
    for op in options.ops:
        bus_factor(op, 2)  # rejects unknown names before ranks start
    if options.preset is not None:
        resolve_config(options.preset)
        parse_dtype(options.dtype)
    if options.iters < 1:
        raise InputError(f"iters must be >= 1, got {options.iters}")
    backend = resolve_backend(options.backend, options.world_size)
    per_rank = run_ranks(calibrate_rank, (options,), world_size=options.world_size, backend=backend, timeout_s=options.timeout_s)
    return calibration_document(options, backend, per_rank)


# -- targets: every ratio the kit promises, measured in one launch -------------------------


@dataclass(frozen=True)
class TargetsOptions:
    preset: str = "deepseek-v2-lite"
    tokens: int = 256  # per rank
    world_size: int = 2
    dtype: str = "float32"
    repeats: int = 5
    warmup: int = 1
    backend: str = "auto"
    timeout_s: float = 180.0
    calibration: CalibrationOptions = CalibrationOptions()

    def gate_spec(self) -> WorkloadSpec:
        return WorkloadSpec(preset=self.preset, world_size=self.world_size, tokens=self.tokens, routing="gate", dtype=self.dtype)

    def local_spec(self) -> WorkloadSpec:
        return replace(self.gate_spec(), routing="local", locality=1.0)


def raw_alltoall_rank(ctx: RankContext, spec: WorkloadSpec, repeats: int, warmup: int) -> list[float]:
    """Seconds per repeat of two bare all_to_all_single calls with the splits the alltoall path uses.

    The first sends each (token, expert) pair's row to its expert's rank, the second sends the
    rows back: the token traffic of dispatch and combine, without counts, ids or permutation.
    """
    workload = build_workload(spec)
    pairs = pair_matrix(workload)
    send = pairs[ctx.rank]
    receive = [pairs[src][ctx.rank] for src in range(ctx.world_size)]
    rows = torch.randn(sum(send), workload.cfg.hidden).to(workload.dtype).to(ctx.device)
    comm = RecordingComm(device=ctx.device)
    seconds = []
    for iteration in range(warmup + repeats):
        comm.barrier()
        comm.reset()
        _sync(ctx.device)
        start = time.perf_counter()
        arrived = comm.all_to_all_single(rows, send, receive, what="tokens")
        comm.all_to_all_single(arrived, receive, send, what="tokens")
        _sync(ctx.device)
        if iteration >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def expert_compute_rank(ctx: RankContext, spec: WorkloadSpec, repeats: int) -> dict:
    """Grouped expert forward on the rows this rank's experts get in `spec`, against a dense matmul."""
    workload = build_workload(spec)
    ids = torch.cat(workload.routing.topk_ids).reshape(-1)
    mine = ids[workload.placement.owner(ids) == ctx.rank]
    layer = local_layer(workload, ctx.rank, ctx.device)
    RecordingComm(device=ctx.device).barrier()  # both ranks compute at the same time, as in a layer
    return grouped_vs_dense(workload.cfg, workload.placement.local_index(mine), layer.experts, workload.dtype, ctx.device, repeats)


def targets_rank(ctx: RankContext, options: TargetsOptions) -> dict:
    """Run this rank's side of `targets`: calibration, both workloads, raw all-to-all and compute."""
    return {
        "calibration": calibrate_rank(ctx, options.calibration),
        "gate": measure_workload(ctx, options.gate_spec(), tuple(PATHS), options.repeats, options.warmup),
        "raw_alltoall": raw_alltoall_rank(ctx, options.gate_spec(), options.repeats, options.warmup),
        "local": measure_workload(ctx, options.local_spec(), ("allreduce", "alltoall"), options.repeats, options.warmup),
        "compute": expert_compute_rank(ctx, options.gate_spec(), options.repeats),
    }


@dataclass
class TargetsResult:
    options: TargetsOptions
    backend: str
    calibration: dict
    link: Link
    gate: CompareResult
    local: CompareResult
    raw_alltoall: Spread  # seconds, per repeat the least over ranks
    alltoall_exchange: Spread  # the alltoall path's metadata + dispatch + combine, same estimator
    compute: list[dict]  # per rank: grouped_vs_dense
    wall_seconds: float


def path_exchange_spread(path: PathResult) -> Spread:
    """Per repeat, the least over ranks of metadata + dispatch + combine.

    The rank that finished its experts last waits least in combine, so the least over ranks is
    the exchange's own time, without waiting on another rank's compute.
    """
    per_repeat = [
        min(sum(rank.get(phase, 0.0) for phase in COMM_PHASES) for rank in ranks) for ranks in zip(*path.timings)
    ]
    return spread(per_repeat)


def run_targets(options: TargetsOptions) -> TargetsResult:
    specs = [options.gate_spec(), options.local_spec()]
    workloads = [build_workload(spec) for spec in specs]
    backend = resolve_backend(options.backend, options.world_size)
    started = time.perf_counter()
    per_rank = run_ranks(targets_rank, (options,), world_size=options.world_size, backend=backend, timeout_s=options.timeout_s)
    wall = time.perf_counter() - started

    calibration = calibration_document(options.calibration, backend, [rank["calibration"] for rank in per_rank])
    calibration["metadata"] = {"environment": {"processor": platform.processor() or platform.machine()}}
    link = link_from_calibration(calibration, "calibrated in this run")
    gate = _assemble(CompareOptions(spec=specs[0], repeats=options.repeats, warmup=options.warmup), workloads[0],
                     [rank["gate"] for rank in per_rank], wall)
    local = _assemble(CompareOptions(spec=specs[1], paths=("allreduce", "alltoall"), repeats=options.repeats, warmup=options.warmup),
                      workloads[1], [rank["local"] for rank in per_rank], wall)
    raw = spread(min(times) for times in zip(*(rank["raw_alltoall"] for rank in per_rank)))
    alltoall = next(path for path in gate.paths if path.path == "alltoall")
    return TargetsResult(options, backend, calibration, link, gate, local, raw, path_exchange_spread(alltoall),
                         [rank["compute"] for rank in per_rank], wall)
