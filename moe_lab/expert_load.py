"""Expert-load statistics of a routing trace, and what each path would move for it.

For every MoE layer of a trace this counts the (token, expert) pairs each expert gets. It also
finds the share of each token's experts on the token's own rank under each placement, with the
tokens split over the ranks in contiguous blocks as a replay splits them. The bytes each path
sends come from the analytic formulas in `moe_lab.bytes_model`. `trace_stats` returns plain numbers,
`format_trace_stats` prints them, `plot_trace_stats` draws them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .bytes_model import expected_sent_bytes
from .config import MoEConfig
from .paths import PATHS
from .routing import PLACEMENTS, Placement, Routing, RoutingError
from .trace import TraceFile, open_trace, split_tokens
from .workload import DTYPES, Workload, parse_dtype

BACKENDS = ("nccl", "gloo")


def trace_stats(
    trace: str | Path | TraceFile,
    world_size: int = 2,
    placements: tuple[str, ...] = PLACEMENTS,
    backend: str = "nccl",
    dtype: str | None = None,
    layers: list[int] | None = None,
) -> dict:
    """Expert load, local share and bytes per path for each MoE layer of a trace.

    `dtype` is the token dtype the bytes are counted for (default: the dtype the model ran in
    when the trace was recorded). `backend` picks the collective algorithms of `moe_lab.wire`.
    Returns a JSON-ready dict; per-layer values are dicts keyed by layer.
    """
    trace = trace if isinstance(trace, TraceFile) else open_trace(trace)
    if backend not in BACKENDS:
        raise RoutingError(f"unknown backend {backend!r} for byte counts; choose one of {', '.join(BACKENDS)}")
    if dtype is None:
        dtype = trace.metadata.get("model_dtype") if trace.metadata.get("model_dtype") in DTYPES else "float32"
    torch_dtype = parse_dtype(dtype)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise RoutingError(f"world_size must be an integer >= 1, got {world_size!r}")
    unknown = [name for name in placements if name not in PLACEMENTS]
    if unknown:
        raise RoutingError(f"unknown placement {unknown[0]!r}; choose from {', '.join(PLACEMENTS)}")
    cfg = trace.cfg
    layers = trace.moe_layers if layers is None else list(layers)
    for layer in layers:
        trace.check_layer(layer)
    tokens_per_rank = split_tokens(trace.n_tokens, world_size)
    usable = _usable_placements(placements, cfg, world_size)

    stats = {
        "trace": str(trace.path),
        "checkpoint": trace.metadata.get("checkpoint", {}),
        "n_tokens": trace.n_tokens,
        "n_sequences": len(trace.metadata.get("sequence_lengths", [])),
        "n_experts": cfg.n_experts,
        "top_k": cfg.top_k,
        "layers": layers,
        "world_size": world_size,
        "tokens_per_rank": tokens_per_rank,
        "backend": backend,
        "dtype": dtype,
        "placements": list(usable),
        "skipped_placements": {name: reason for name, reason in placements_skipped(placements, cfg, world_size).items()},
        "tokens_per_expert": {},
        "load_imbalance": {},
        "local_share": {name: {} for name in usable},
        "fully_local_tokens": {name: {} for name in usable},
        "pairs_per_rank": {name: {} for name in usable},
        "sent_bytes": {name: {path: {} for path in PATHS} for name in usable},
    }
    rank_of_token = torch.arange(world_size).repeat_interleave(torch.tensor(tokens_per_rank))  # (T,)
    for layer in layers:
        ids, weights = trace.routing(layer)  # (T, k) each
        counts = torch.bincount(ids.reshape(-1), minlength=cfg.n_experts)
        stats["tokens_per_expert"][layer] = counts.tolist()
        mean = ids.numel() / cfg.n_experts
        stats["load_imbalance"][layer] = float(counts.max()) / mean if mean else 0.0
        for name, placement in usable.items():
            local = placement.owner(ids) == rank_of_token.unsqueeze(1)  # (T, k)
            stats["local_share"][name][layer] = float(local.float().mean()) if ids.numel() else 0.0
            stats["fully_local_tokens"][name][layer] = float(local.all(dim=1).float().mean()) if ids.numel() else 0.0
            stats["pairs_per_rank"][name][layer] = torch.bincount(placement.owner(ids.reshape(-1)), minlength=world_size).tolist()
            workload = _bytes_workload(cfg, placement, torch_dtype, tokens_per_rank, ids, weights)
            for path in PATHS:
                per_rank = expected_sent_bytes(path, workload, backend)
                stats["sent_bytes"][name][path][layer] = max(sum(phases.values()) for phases in per_rank)
    return stats


def _usable_placements(placements, cfg: MoEConfig, world_size: int) -> dict[str, Placement]:
    usable = {}
    for name in placements:
        if name not in placements_skipped([name], cfg, world_size):
            usable[name] = Placement(name, cfg.n_experts, world_size)
    if not usable:
        reasons = "; ".join(placements_skipped(placements, cfg, world_size).values())
        raise RoutingError(f"no placement fits {cfg.n_experts} experts on {world_size} ranks: {reasons}")
    return usable


def placements_skipped(placements, cfg: MoEConfig, world_size: int) -> dict[str, str]:
    """Placements that cannot hold `cfg`'s experts on `world_size` ranks, with the reason."""
    skipped = {}
    for name in placements:
        try:
            Placement(name, cfg.n_experts, world_size)
        except RoutingError as err:
            skipped[name] = str(err)
    return skipped


def _bytes_workload(cfg, placement, dtype, tokens_per_rank, ids, weights) -> Workload:
    """Build a workload with the trace's routing for the byte formulas, which never read token values."""
    routing = Routing(list(ids.split(tokens_per_rank)), list(weights.split(tokens_per_rank)))
    hidden = [torch.empty(tokens, cfg.hidden, dtype=dtype) for tokens in tokens_per_rank]
    return Workload(cfg, placement, dtype, 0, list(tokens_per_rank), hidden, routing, source="trace")


def total_sent_bytes(stats: dict) -> dict[str, dict[str, int]]:
    """Per placement and path: bytes the largest rank sends, summed over the trace's MoE layers."""
    return {
        placement: {path: sum(per_layer.values()) for path, per_layer in paths.items()}
        for placement, paths in stats["sent_bytes"].items()
    }


# ---- printout ----


def _human(value: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def format_trace_stats(stats: dict) -> str:
    """Format the statistics as text tables: expert load, local share, and bytes per path."""
    checkpoint = stats["checkpoint"]
    placements = stats["placements"]
    lines = [
        f"trace {stats['trace']}",
        f"checkpoint {checkpoint.get('name', '?')} revision {checkpoint.get('revision') or 'unknown'}: "
        f"{stats['n_tokens']} tokens in {stats['n_sequences']} sequences, {len(stats['layers'])} MoE layers, "
        f"{stats['n_experts']} experts, top-{stats['top_k']}",
        f"{stats['world_size']} ranks, tokens per rank {stats['tokens_per_rank']} (contiguous blocks); "
        f"bytes for {stats['dtype']} tokens with {stats['backend']} algorithms, largest rank",
    ]
    for name, reason in stats["skipped_placements"].items():
        lines.append(f"placement {name} skipped: {reason}")

    lines += ["", "expert load: (token, expert) pairs per expert; imbalance = busiest expert / mean"]
    show_counts = stats["n_experts"] <= 16
    header = f"{'layer':>5}  {'min':>6} {'max':>6} {'idle':>5} {'imbalance':>9}"
    if show_counts:
        header += "  pairs per expert"
    lines.append(header)
    for layer in stats["layers"]:
        counts = stats["tokens_per_expert"][layer]
        row = (
            f"{layer:>5}  {min(counts):>6} {max(counts):>6} {sum(1 for c in counts if c == 0):>5} "
            f"{stats['load_imbalance'][layer]:>9.2f}"
        )
        if show_counts:
            row += "  " + " ".join(f"{c:>3}" for c in counts)
        lines.append(row)

    lines += ["", "local share: share of each token's experts on its own rank (mean); all local: tokens with no remote expert"]
    lines.append(f"{'layer':>5}" + "".join(f"{'local ' + name:>26}{'all local':>11}" for name in placements))
    for layer in stats["layers"]:
        lines.append(
            f"{layer:>5}"
            + "".join(
                f"{stats['local_share'][name][layer]:>26.3f}{stats['fully_local_tokens'][name][layer]:>11.3f}"
                for name in placements
            )
        )

    totals = total_sent_bytes(stats)
    lines += ["", f"bytes sent by the largest rank, summed over the {len(stats['layers'])} MoE layers"]
    lines.append(f"{'path':<24}" + "".join(f"{name:>16}" for name in placements))
    for path in PATHS:
        lines.append(f"{path:<24}" + "".join(f"{_human(totals[name][path]):>16}" for name in placements))
    return "\n".join(lines)


# ---- figure ----


def plot_trace_stats(stats: dict, path: str | Path | None = None):
    """Draw expert load per layer, local share per placement, and bytes per path; save to `path` if given.

    Uses matplotlib's Agg canvas and no pyplot state, so the same stats give the same PNG.
    Returns the matplotlib Figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers, placements = stats["layers"], stats["placements"]
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    load_axes, share_axes, bytes_axes = figure.subplots(1, 3, width_ratios=[1.4, 1, 1])

    # Expert load: layers down, experts across.
    counts = [stats["tokens_per_expert"][layer] for layer in layers]
    image = load_axes.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    load_axes.set_xlabel("expert")
    load_axes.set_ylabel("MoE layer")
    load_axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    load_axes.set_title("(token, expert) pairs per expert")
    figure.colorbar(image, ax=load_axes, label="pairs")

    # Local share per layer and placement, against routing that ignores placement.
    for name in placements:
        share_axes.plot(layers, [stats["local_share"][name][layer] for layer in layers], marker="o", label=name)
    share_axes.axhline(1 / stats["world_size"], color="grey", linestyle="--", label="uniform routing")
    share_axes.set_ylim(0, 1)
    share_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    share_axes.set_xlabel("MoE layer")
    share_axes.set_ylabel("share of a token's experts on its rank")
    share_axes.set_title(f"local experts, {stats['world_size']} ranks")
    share_axes.legend(fontsize="small")

    # Bytes per path, summed over layers, one bar group per path.
    totals = total_sent_bytes(stats)
    largest = max(max(per_path.values()) for per_path in totals.values())
    unit, size = next(((unit, size) for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if largest >= size), ("B", 1))
    width = 0.8 / len(placements)
    for i, name in enumerate(placements):
        positions = [p + i * width for p in range(len(PATHS))]
        bytes_axes.bar(positions, [totals[name][path] / size for path in PATHS], width=width, label=name)
    bytes_axes.set_xticks(
        [p + 0.4 - width / 2 for p in range(len(PATHS))], list(PATHS), rotation=25, ha="right", fontsize="small"
    )
    bytes_axes.set_ylabel(f"{unit} sent by the largest rank, all layers")
    bytes_axes.set_title(f"bytes per path, {stats['dtype']}, {stats['backend']}")
    bytes_axes.legend(fontsize="small")

    name = stats["checkpoint"].get("name") or Path(stats["trace"]).stem
    figure.suptitle(f"{name}: {stats['n_tokens']} tokens")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100, metadata={"Software": None})
    return figure
