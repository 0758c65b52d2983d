"""The cost model: a path's time from its modelled bytes and a link's alpha-beta fits.

Each collective call costs alpha + beta * x seconds, where x is the largest number of bytes
any rank sends or receives in that call under the library's algorithm (`Transfer.max_wire_bytes`)
and alpha, beta belong to that collective. With x measured in wire bytes, 1 / beta is the
bus bandwidth nccl-tests reports. A path's communication time is the sum over its calls. Its
compute time is its FLOPs over a FLOP rate that depends on how many rows each expert gets.

A `Link` contains the fits. It comes either from `python -m moe_lab collectives` on this machine
(`load_calibration`), or from `LINK_PRESETS`, estimates for machines the kit targets but that
were not available to measure.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bytes_model import Transfer, pair_matrix, path_transfers
from .errors import InputError
from .paths.base import PathOptions
from .workload import Workload, WorkloadSpec, build_workload

DEFAULT_DATA_DIR = Path("data")


class CalibrationError(InputError):
    """A missing or unreadable calibration file, or an unknown link preset."""


@dataclass(frozen=True)
class AlphaBeta:
    """t = alpha + beta * x: alpha in seconds, beta in seconds per wire byte."""

    alpha: float
    beta: float
    max_relative_error: float = float("nan")  # worst |fit - measured| / measured over the fitted points

    def predict(self, wire_bytes: int) -> float:
        return self.alpha + self.beta * wire_bytes

    @property
    def bandwidth(self) -> float:
        """Bytes per second for large messages (bus bandwidth in nccl-tests' terms)."""
        return 1.0 / self.beta if self.beta > 0 else math.inf


def fit_alpha_beta(wire_bytes: list[int], seconds: list[float]) -> AlphaBeta:
    """Fit t = alpha + beta * x, minimising the relative error so small and large messages count alike.

    Least squares on (alpha + beta * x_i) / t_i = 1; a negative coefficient is clamped to zero
    and the other refitted alone.
    """
    x = np.asarray(wire_bytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if len(x) < 2:
        raise ValueError(f"an alpha-beta fit needs at least 2 points, got {len(x)}")
    design = np.stack([1.0 / t, x / t], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    if alpha < 0:
        alpha, beta = 0.0, float(np.sum(x / t) / np.sum((x / t) ** 2))
    elif beta < 0:
        alpha, beta = float(np.sum(1 / t) / np.sum(1 / t**2)), 0.0
    predicted = alpha + beta * x
    return AlphaBeta(float(alpha), float(beta), float(np.max(np.abs(predicted - t) / t)))


@dataclass(frozen=True)
class Link:
    """Alpha-beta fits per collective and a compute rate table for one machine."""

    name: str
    description: str
    backend: str  # whose wire formulas apply: "gloo" or "nccl"
    collectives: dict[str, AlphaBeta]
    # (rows per expert, FLOP/s of the grouped expert forward), sorted by rows
    compute: tuple[tuple[float, float], ...]
    estimate: bool  # True for presets that were not measured by this kit
    source: str
    world_size: int | None = None  # ranks the fit was measured on; None for presets
    # beta: seconds per byte a collective copies locally (rows a rank sends to itself); None ignores them
    local_copy: AlphaBeta | None = None
    extra: dict = field(default_factory=dict)

    def collective_seconds(self, transfer: Transfer) -> float:
        if transfer.op not in self.collectives:
            raise CalibrationError(f"link {self.name!r} has no fit for {transfer.op}; recalibrate with every collective")
        seconds = self.collectives[transfer.op].predict(transfer.max_wire_bytes())
        if self.local_copy is not None:
            seconds += self.local_copy.beta * transfer.max_local_bytes()
        return seconds

    def flops_per_s(self, rows_per_expert: float) -> float:
        """Grouped expert FLOP rate at this many rows per expert, log-linear between table entries."""
        if not self.compute:
            return math.nan
        rows = [max(r, 1e-9) for r, _ in self.compute]
        rates = [rate for _, rate in self.compute]
        return float(np.exp(np.interp(np.log(max(rows_per_expert, 1e-9)), np.log(rows), np.log(rates))))


# -- presets -------------------------------------------------------------------------------

# NOTE: estimates, not measurements: no such machine was available to this kit. Replace them by
# running `python -m moe_lab collectives --backend nccl` on the target box.
_RTX3090_LATENCY_S = 12e-6
_RTX3090_BUSBW = 12e9
_RTX3090_FLOPS = 0.5 * 35.6e12
_RTX3090_MEMORY_BW = 936e9  # bytes/s of GDDR6X; a local copy reads and writes each byte once

LINK_PRESETS: dict[str, Link] = {
    "rtx3090-pcie4-shm": Link(
        name="rtx3090-pcie4-shm",
        description="2x RTX 3090, PCIe 4.0 x16, no P2P (NCCL over host shared memory)",
        backend="nccl",
        collectives={op: AlphaBeta(_RTX3090_LATENCY_S, 1.0 / _RTX3090_BUSBW) for op in
                     ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all_single")},
        compute=((1.0, _RTX3090_FLOPS), (1e6, _RTX3090_FLOPS)),
        estimate=True,
        local_copy=AlphaBeta(0.0, 2.0 / _RTX3090_MEMORY_BW),
        source=(
            "latency 12 us: nccl-tests alltoall_perf on 2x RTX 4090 (PCIe 4.0) with P2P disabled "
            "reports 11.3-11.9 us for 8-64 B messages (github.com/tinygrad/open-gpu-kernel-modules "
            "issue 17); bus bandwidth 12 GB/s: half of the 24 GB/s NCCL's topology assigns a PCIe 4.0 "
            "x16 link (NCCL INFO log in github.com/NVIDIA/nccl-tests issue 307), because without P2P "
            "every byte is written to host memory by one GPU and read back by the other; compute "
            "17.8 TFLOP/s: an assumed 50% of the RTX 3090's 35.6 TFLOP/s FP32 peak from its published "
            "specification table; local copies: read and write at the 936 GB/s memory bandwidth of the same table"
        ),
    ),
}


def calibration_path(backend: str, world_size: int, data_dir: Path = DEFAULT_DATA_DIR) -> Path:
    return Path(data_dir) / f"collectives-{backend}-{world_size}r.json"


def link_from_calibration(document: dict, name: str) -> Link:
    fits = {op: AlphaBeta(**fit) for op, fit in document["fits"].items()}
    compute = tuple(sorted((entry["rows_per_expert"], entry["flops_per_s"]) for entry in document.get("compute", [])))
    environment = document.get("metadata", {}).get("environment", {})
    return Link(
        name=name,
        description=f"this machine, calibrated ({environment.get('processor', '?')}, {document['world_size']} ranks on {document['backend']})",
        backend=document["backend"],
        collectives=fits,
        compute=compute,
        estimate=False,
        source=f"measured by `python -m moe_lab collectives` ({name})",
        world_size=document["world_size"],
        local_copy=None if not document.get("local_copy") else AlphaBeta(**document["local_copy"]),
    )


def load_calibration(path: str | Path) -> Link:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(
            f"calibration file {str(path)!r} not found; run `python -m moe_lab collectives` to measure this machine"
        )
    try:
        document = json.loads(path.read_text())
        return link_from_calibration(document, str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CalibrationError(
            f"calibration file {str(path)!r} is corrupt or truncated ({type(err).__name__}: {err}); "
            f"delete it and run `python -m moe_lab collectives` again"
        ) from None


def resolve_link(name: str, backend: str = "gloo", world_size: int = 2, data_dir: Path = DEFAULT_DATA_DIR) -> Link:
    """Load a link: a preset by name, "this-machine" for the calibration file of (backend, world_size), or a path to one."""
    if name in LINK_PRESETS:
        return LINK_PRESETS[name]
    if name == "this-machine":
        return load_calibration(calibration_path(backend, world_size, data_dir))
    if name.endswith(".json"):
        return load_calibration(name)
    raise CalibrationError(
        f"unknown link {name!r}; choose this-machine, a calibration .json file, or a preset: {', '.join(LINK_PRESETS)}"
    )


# -- predictions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    path: str
    comm_seconds: float  # all collective calls
    phase_seconds: dict[str, float]  # collective time per phase
    compute_seconds: float  # the rank with the most expert work


def compute_work(workload: Workload) -> list[dict]:
    """Per rank: routed rows its experts run, their FLOPs, and the shared experts' FLOPs on its own tokens.

    Every path runs the same expert work: each rank computes the (token, expert) pairs routed to
    its experts, and the shared experts on its own tokens.
    """
    cfg = workload.cfg
    pairs = pair_matrix(workload)
    per_row = 2 * 3 * cfg.hidden * cfg.moe_intermediate
    work = []
    for rank in range(workload.world_size):
        rows = sum(pairs[src][rank] for src in range(workload.world_size))
        tokens = workload.tokens_per_rank[rank]
        work.append({
            "routed_rows": rows,
            "rows_per_expert": rows / max(1, len(workload.placement.local_experts(rank))),
            "routed_flops": rows * per_row,
            "shared_rows": tokens,
            "shared_flops": tokens * 2 * 3 * cfg.hidden * cfg.shared_intermediate,
        })
    return work


def measured_compute_rate(path_result, workload: Workload) -> float:
    """FLOP/s of the compute phase: all ranks' expert FLOPs over the sum of their median compute times."""
    work = compute_work(workload)
    flops = sum(rank["routed_flops"] + rank["shared_flops"] for rank in work)
    seconds = sum(
        float(np.median([repeat.get("compute", 0.0) for repeat in rank_timings])) for rank_timings in path_result.timings
    )
    return flops / seconds if seconds > 0 else math.nan


def predict_compute(workload: Workload, link: Link) -> float:
    seconds = []
    for rank in compute_work(workload):
        routed = rank["routed_flops"] / link.flops_per_s(rank["rows_per_expert"]) if rank["routed_rows"] else 0.0
        # The shared experts are one wide SwiGLU: its rows count as rows of one expert, times its width.
        shared = rank["shared_flops"] / link.flops_per_s(rank["shared_rows"]) if rank["shared_rows"] else 0.0
        seconds.append(routed + shared)
    return max(seconds, default=0.0)


def predict(path: str, workload: Workload, link: Link, options: PathOptions = PathOptions()) -> Prediction:
    transfers = path_transfers(path, workload, link.backend, options)
    per_phase: dict[str, float] = {}
    for transfer in transfers:
        per_phase[transfer.phase] = per_phase.get(transfer.phase, 0.0) + link.collective_seconds(transfer)
    return Prediction(path, sum(per_phase.values()), per_phase, predict_compute(workload, link))


def crossing(xs: list[float], a: list[float], b: list[float]) -> float | None:
    """Find the x where a - b changes sign (linear interpolation), scanning from the largest x down.

    Used for locality: all-to-all (a) wins at high locality, so the scan starts where a < b and
    returns the first x below which a is no longer faster. None when a never wins, or always does.
    """
    points = sorted(zip(xs, a, b), reverse=True)
    previous = None
    for x, ya, yb in points:
        diff = ya - yb
        if previous is not None:
            px, pdiff = previous
            if pdiff < 0 <= diff:
                return px + (x - px) * (0 - pdiff) / (diff - pdiff) if diff != pdiff else x
        if previous is None and diff >= 0:
            return None  # a loses even at the highest locality
        previous = (x, diff)
    return None


def predicted_crossover(spec: WorkloadSpec, link: Link, other: str, steps: int = 25) -> tuple[float | None, list[dict]]:
    """Locality above which all-to-all's predicted communication time beats `other`'s.

    Evaluates the model on local routing at `steps` localities from 0 to 1 for the shape in
    `spec` (its routing and locality are replaced). Returns the crossing and the curve.
    """
    curve = []
    for locality in np.linspace(0.0, 1.0, steps).tolist():
        workload = build_workload(WorkloadSpec(**{**vars(spec), "routing": "local", "locality": locality}))
        curve.append({
            "locality": locality,
            "alltoall": predict("alltoall", workload, link).comm_seconds,
            other: predict(other, workload, link).comm_seconds,
        })
    xs = [point["locality"] for point in curve]
    return crossing(xs, [point["alltoall"] for point in curve], [point[other] for point in curve]), curve
