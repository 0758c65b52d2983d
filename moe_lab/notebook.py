"""Helpers for the notebooks: quick mode, and small pictures of the layer and its placement.

Quick mode (`MOE_LAB_QUICK=1`, set by the test suite) shrinks sizes so every notebook runs in
CI; readers get the full sizes by default.
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import torch

from .routing import Placement, Routing


def quick_mode() -> bool:
    """Return True when MOE_LAB_QUICK=1, where notebooks use small sizes."""
    return os.environ.get("MOE_LAB_QUICK", "0") == "1"


def pick(full, quick):
    """Return `quick` in quick mode, else `full`."""
    return quick if quick_mode() else full


def expert_load(routing: Routing, n_experts: int) -> torch.Tensor:
    """Count how many of each rank's tokens picked each expert: (ranks, n_experts) int64."""
    return torch.stack([torch.bincount(ids.reshape(-1).long(), minlength=n_experts) for ids in routing.topk_ids])


def plot_expert_load(routing: Routing, placement: Placement, title: str = ""):
    """Draw tokens per expert, stacked by the rank the tokens come from, on a background shaded by
    the rank that owns each expert, so a reader sees where each rank's work comes from."""
    load = expert_load(routing, placement.n_experts)  # (ranks, E)
    owner = placement.owner_table()
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for rank in range(placement.world_size):
        for expert in placement.local_experts(rank):
            ax.axvspan(expert - 0.5, expert + 0.5, color=colours(rank), alpha=0.15, linewidth=0)
    bottom = torch.zeros(placement.n_experts)
    for rank in range(load.shape[0]):
        ax.bar(range(placement.n_experts), load[rank], bottom=bottom, color=colours(rank), label=f"tokens of rank {rank}")
        bottom += load[rank]
    ax.set_xlabel("expert (background: shaded by the rank that holds it)")
    ax.set_ylabel("tokens routed")
    ax.set_xlim(-0.5, placement.n_experts - 0.5)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or f"Expert load, {placement.kind} placement on {placement.world_size} ranks "
                 f"(experts on rank 0: {owner.eq(0).sum().item()})")
    fig.tight_layout()
    return fig


def local_share(routing: Routing, placement: Placement) -> list[float]:
    """Return, per rank, the share of its (token, expert) pairs whose expert is on that same rank."""
    shares = []
    for rank, ids in enumerate(routing.topk_ids):
        shares.append(float((placement.owner(ids) == rank).float().mean()) if ids.numel() else float("nan"))
    return shares


PHASE_COLOURS = {"metadata": "#9467bd", "dispatch": "#1f77b4", "compute": "#bbbbbb", "combine": "#d62728"}


def plot_work_split(routing: Routing, placement: Placement, tokens: int = 24, title: str = ""):
    """Draw the (token, expert) pairs of the first `tokens` tokens of each rank, coloured by the
    rank whose expert computes the pair."""
    colours = plt.get_cmap("tab10")

    # One row per shown token: the owner rank of each chosen expert, -1 elsewhere.
    rows, labels = [], []
    for rank, ids in enumerate(routing.topk_ids):
        for t in range(min(tokens, ids.shape[0])):
            row = torch.full((placement.n_experts,), -1)
            row[ids[t].long()] = placement.owner(ids[t])
            rows.append(row)
            labels.append(rank)
    grid = torch.stack(rows).float()  # (shown tokens, E)
    image = torch.ones(*grid.shape, 3)
    for rank in range(placement.world_size):
        image[grid == rank] = torch.tensor(colours(rank)[:3], dtype=torch.float32)

    fig, ax = plt.subplots(figsize=(10, 0.12 * len(rows) + 1.2))
    ax.imshow(image, aspect="auto", interpolation="nearest")
    boundaries = [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
    for boundary in boundaries:
        ax.axhline(boundary - 0.5, color="black", linewidth=1)

    # Label each block of rows with the rank that owns those tokens.
    starts = [0] + boundaries
    ends = boundaries + [len(labels)]
    ax.set_yticks([(a + b - 1) / 2 for a, b in zip(starts, ends)])
    ax.set_yticklabels([f"tokens of\nrank {labels[a]}" for a in starts])
    ax.set_xlabel("expert")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(rank)) for rank in range(placement.world_size)]
    ax.legend(handles, [f"computed on rank {rank}" for rank in range(placement.world_size)], fontsize=8,
              loc="upper right", framealpha=0.9)
    ax.set_title(title or "Which rank computes each (token, expert) pair")
    fig.tight_layout()
    return fig


def plot_timeline(result, paths: list[str] | None = None):
    """Draw the per-rank phases of one layer (last repeat): one row per rank, one panel per path."""
    chosen = [p for p in result.paths if paths is None or p.path in paths]
    n = result.workload.world_size
    fig, axes = plt.subplots(len(chosen), 1, figsize=(9, 0.6 + 0.4 * n * len(chosen)), squeeze=False)
    for ax, path in zip(axes[:, 0], chosen):
        for rank, segments in enumerate(path.segments):
            for phase, start, end in segments:
                ax.barh(rank, (end - start) * 1e3, left=start * 1e3, color=PHASE_COLOURS.get(phase, "black"), height=0.6)
        ax.set_yticks(range(n))
        ax.set_yticklabels([f"rank {rank}" for rank in range(n)])
        ax.invert_yaxis()
        ax.set_title(path.path, fontsize=9, loc="left")
    axes[-1][0].set_xlabel("ms from the barrier-aligned start of the layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in PHASE_COLOURS.values()]
    axes[0][0].legend(handles, list(PHASE_COLOURS), fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    return fig


def traffic_matrix(path_result, what: tuple[str, ...] | None = None) -> list[list[int]]:
    """Sum the recorded collectives into matrix[src][dst]: bytes rank src sent to rank dst in one layer."""
    n = len(path_result.records)
    matrix = [[0] * n for _ in range(n)]
    for src, records in enumerate(path_result.records):
        for record in records:
            if what is not None and record["what"] not in what:
                continue
            for dst, value in enumerate(record["sent_to"]):
                matrix[src][dst] += value
    return matrix


def plot_traffic(result, paths: list[str] | None = None):
    """Draw the bytes from each rank to each rank in one layer, one matrix per path, as the kit counted them."""
    chosen = [p for p in result.paths if paths is None or p.path in paths]
    fig, axes = plt.subplots(1, len(chosen), figsize=(2.9 * len(chosen), 2.9), squeeze=False)
    matrices = [traffic_matrix(p) for p in chosen]
    largest = max(max(max(row) for row in m) for m in matrices) or 1
    unit, scale = ("MiB", 2**20) if largest >= 2**20 else ("KiB", 2**10)
    for ax, path, matrix in zip(axes[0], chosen, matrices):
        ax.imshow([[v / scale for v in row] for row in matrix], cmap="Blues", vmin=0, vmax=largest / scale)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value / scale:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value > largest / 2 else "black")
        ax.set_xticks(range(len(matrix)))
        ax.set_yticks(range(len(matrix)))
        ax.set_xlabel("to rank")
        ax.set_ylabel("from rank")
        ax.set_title(f"{path.path} ({unit})", fontsize=9)
    fig.tight_layout()
    return fig


def plot_token_bytes(results, x_values, x_label: str, paths: list[str] | None = None):
    """Plot the token bytes rank 0 sends per layer (dispatch and combine) against one swept parameter."""
    from .bytes_model import token_bytes_sent

    names = [p.path for p in results[0].paths if paths is None or p.path in paths]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for name in names:
        values = [token_bytes_sent(next(p for p in result.paths if p.path == name).records[0]) / 2**10 for result in results]
        ax.plot(x_values, values, marker="o", label=name)
    ax.set_xlabel(x_label)
    ax.set_ylabel("token KiB sent by rank 0")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_paths(result):
    """Draw, for every path, the bytes the busiest rank sends per phase and the slowest rank's time per phase."""
    names = [p.path for p in result.paths]
    fig, (bytes_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.4))
    left = [0.0] * len(names)
    for phase in ("metadata", "dispatch", "combine"):
        values = [max(p.bytes_by_phase(rank)[phase] for rank in range(len(p.records))) / 2**20 for p in result.paths]
        bytes_ax.barh(names, values, left=left, color=PHASE_COLOURS[phase], label=phase)
        left = [a + b for a, b in zip(left, values)]
    bytes_ax.set_xlabel("MiB sent by the busiest rank")
    bytes_ax.invert_yaxis()
    bytes_ax.legend(fontsize=7)
    left = [0.0] * len(names)
    for phase in PHASE_COLOURS:
        values = [p.phase_seconds(phase) * 1e3 for p in result.paths]
        time_ax.barh(names, values, left=left, color=PHASE_COLOURS[phase], label=phase)
        left = [a + b for a, b in zip(left, values)]
    time_ax.set_yticks([])
    time_ax.invert_yaxis()
    time_ax.set_xlabel(f"ms, median of {result.options.repeats} repeats, slowest rank per phase")
    time_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep_crossovers(sweep_csv, other: str) -> dict[int, float | None]:
    """Find, per tokens per rank in a sweep CSV, the measured locality above which alltoall's time
    inside collectives beats `other`'s (None when it never does, or always does).

    Time inside collectives (each call timed by the last rank to arrive) leaves out waiting
    for the other rank's experts, as `python -m moe_lab figures` does for its crossovers.
    """
    import csv

    from .costmodel import crossing

    rows = list(csv.DictReader(open(sweep_csv)))
    result = {}
    for tokens in sorted({int(row["tokens"]) for row in rows}):
        curve = {}
        for row in rows:
            if int(row["tokens"]) == tokens and row["routing"] == "local" and row["collective_ms"]:
                curve.setdefault(float(row["locality"]), {})[row["path"]] = float(row["collective_ms"])
        points = sorted((x, v) for x, v in curve.items() if "alltoall" in v and other in v)
        if len(points) >= 2:
            xs = [x for x, _ in points]
            result[tokens] = crossing(xs, [v["alltoall"] for _, v in points], [v[other] for _, v in points])
    return result
