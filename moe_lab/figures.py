"""Every figure of the kit, drawn from result files in one data folder.

Inputs: `sweep.csv` (from `sweep`), `collectives-*.csv` (from `collectives`) and `layer-*.json`
(the output of `compare --json`, for traffic matrices and timelines). Output is deterministic:
the Agg backend, one fixed style, no dates or software versions in the files, and a fixed SVG
hash salt, so the same data gives byte-identical files. Paths get colours from a fixed table,
and a path missing from it (a new one) gets the next colour of a fixed cycle, in name order.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from .costmodel import crossing  # noqa: E402
from .sweep import SWEEP_CSV, SWEEP_FIELDS, ResultsFileError, read_results  # noqa: E402

log = logging.getLogger(__name__)

PHASES = ("metadata", "dispatch", "compute", "combine")
PATH_COLOURS = {
    "allreduce": "#1f77b4",
    "broadcast": "#ff7f0e",
    "allgather_reducescatter": "#2ca02c",
    "alltoall": "#d62728",
}
EXTRA_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
PHASE_COLOURS = {"metadata": "#9467bd", "dispatch": "#1f77b4", "compute": "#bbbbbb", "combine": "#d62728"}
STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "moe_lab",
    "svg.fonttype": "path",
    "path.simplify": False,
}
METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}


def path_colours(names) -> dict[str, str]:
    colours = dict(PATH_COLOURS)
    extra = iter(EXTRA_COLOURS)
    for name in sorted(set(names) - set(colours)):
        colours[name] = next(extra, "#000000")
    return colours


def _float(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def _save(fig, out: Path, name: str, fmt: str) -> Path:
    path = out / f"{name}.{fmt}"
    fig.savefig(path, format=fmt, metadata=METADATA[fmt])
    plt.close(fig)
    return path


# -- from sweep.csv --------------------------------------------------------------------------


def _series(rows: list[dict], x: str, y: str, **fixed) -> dict[str, list[tuple[float, float]]]:
    """Per path, sorted (x, y) points of rows matching `fixed`, skipping empty cells."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if any(row[key] != value for key, value in fixed.items()):
            continue
        xv, yv = _float(row[x]), _float(row[y])
        if xv is not None and yv is not None:
            series.setdefault(row["path"], []).append((xv, yv))
    return {path: sorted(points) for path, points in sorted(series.items())}


def _shape_label(row: dict) -> str:
    return f"{row['preset']}, top-{row['top_k']}, {row['world_size']} ranks, {row['dtype']}"


def _main_shape(rows: list[dict]) -> dict:
    """Find the (preset, world size, top-k, dtype) with the most rows: the locality and tokens grid of the sweep."""
    counts: dict[tuple, int] = {}
    for row in rows:
        key = (row["preset"], row["world_size"], row["top_k"], row["dtype"])
        counts[key] = counts.get(key, 0) + 1
    preset, world_size, top_k, dtype = max(sorted(counts), key=lambda key: counts[key])
    return {"preset": preset, "world_size": world_size, "top_k": top_k, "dtype": dtype}


def _tokens_values(rows: list[dict], shape: dict) -> list[str]:
    values = {row["tokens"] for row in rows if all(row[k] == v for k, v in shape.items())}
    return sorted(values, key=int)


def bytes_vs_locality(rows, shape, colours, out, fmt) -> Path:
    tokens = _tokens_values(rows, shape)
    fig, axes = plt.subplots(1, len(tokens), figsize=(3.2 * len(tokens), 3.2), squeeze=False, sharey=False)
    for ax, count in zip(axes[0], tokens):
        for path, points in _series(rows, "locality", "model_sent_total_bytes", tokens=count, **shape).items():
            ax.plot([p[0] for p in points], [p[1] / 2**20 for p in points], "-", color=colours[path], label=f"{path} (model)")
        for path, points in _series(rows, "locality", "sent_total_bytes", tokens=count, **shape).items():
            ax.plot([p[0] for p in points], [p[1] / 2**20 for p in points], "o", color=colours[path], ms=4, mfc="none")
        for path, points in _series(rows, "locality", "os_sent_total_bytes", tokens=count, **shape).items():
            ax.plot([p[0] for p in points], [p[1] / 2**20 for p in points], "x", color=colours[path], ms=4)
        ax.set_title(f"{count} tokens per rank")
        ax.set_xlabel("locality")
    axes[0][0].set_ylabel("MiB sent by the busiest rank")
    axes[0][-1].legend(fontsize=7, title="line: model, o: counted, x: OS", title_fontsize=7)
    fig.suptitle(f"Bytes per path against locality, the share of a token's experts on its own rank ({_shape_label(shape)})")
    fig.tight_layout()
    return _save(fig, out, "bytes_vs_locality", fmt)


def phases_vs_tokens(rows, shape, colours, out, fmt) -> Path:
    localities = sorted({row["locality"] for row in rows if all(row[k] == v for k, v in shape.items())}, key=float)
    locality = localities[len(localities) // 2] if localities else ""
    paths = sorted({row["path"] for row in rows})
    fig, axes = plt.subplots(1, len(paths), figsize=(3.2 * len(paths), 3.2), squeeze=False, sharey=True)
    for ax, path in zip(axes[0], paths):
        for phase in PHASES:
            chosen = sorted(
                (row for row in rows if row["path"] == path and row["locality"] == locality
                 and all(row[k] == v for k, v in shape.items())),
                key=lambda row: int(row["tokens"]),
            )
            xs = [int(row["tokens"]) for row in chosen]
            median = [float(row[f"{phase}_ms"]) for row in chosen]
            low = [median[i] - float(row[f"{phase}_p10_ms"]) for i, row in enumerate(chosen)]
            high = [float(row[f"{phase}_p90_ms"]) - median[i] for i, row in enumerate(chosen)]
            ax.errorbar(xs, median, yerr=[low, high], color=PHASE_COLOURS[phase], marker="o", ms=3, capsize=2, label=phase)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title(path, color=colours[path])
        ax.set_xlabel("tokens per rank")
    repeats = rows[0]["repeats"] if rows else "?"
    axes[0][0].set_ylabel("ms (median, bars p10-p90)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Time per phase against tokens per rank, locality {float(locality):.2f} "
                 f"({_shape_label(shape)}; {repeats} repeats, slowest rank)")
    fig.tight_layout()
    return _save(fig, out, "phases_vs_tokens", fmt)


def crossover(rows, shape, colours, out, fmt) -> tuple[Path, list[str]]:
    tokens = _tokens_values(rows, shape)
    notes = []
    fig, axes = plt.subplots(1, len(tokens), figsize=(3.2 * len(tokens), 3.4), squeeze=False)
    for ax, count in zip(axes[0], tokens):
        measured = _series(rows, "locality", "collective_ms", tokens=count, **shape)
        predicted = _series(rows, "locality", "predicted_comm_ms", tokens=count, **shape)
        for path in ("allreduce", "broadcast", "alltoall"):
            if path in measured:
                ax.plot(*zip(*measured[path]), "o-", color=colours[path], ms=3, label=f"{path} measured")
            if path in predicted:
                ax.plot(*zip(*predicted[path]), "--", color=colours[path], lw=1, label=f"{path} predicted")
        for other in ("allreduce", "broadcast"):
            for label, series in (("measured", measured), ("predicted", predicted)):
                if "alltoall" not in series or other not in series:
                    continue
                xs = [x for x, _ in series["alltoall"]]
                a = [y for _, y in series["alltoall"]]
                b = [dict(series[other]).get(x) for x in xs]
                if None in b:
                    continue
                point = crossing(xs, a, b)
                if point is not None:
                    text = f"{point:.2f}"
                elif all(ya < yb for ya, yb in zip(a, b)):
                    text = f"none: all-to-all is faster at every locality from {min(xs):g}"
                else:
                    text = "none: all-to-all is never faster"
                notes.append(f"crossover alltoall vs {other}, {count} tokens per rank, {_shape_label(shape)}: {label} locality {text}")
                if point is not None:
                    ax.axvline(point, color=colours[other], ls=":" if label == "predicted" else "-", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{count} tokens per rank")
        ax.set_xlabel("locality")
    axes[0][0].set_ylabel("ms inside collectives")
    axes[0][-1].legend(fontsize=6)
    repeats = rows[0]["repeats"] if rows else "?"
    fig.suptitle(f"Crossover: all-to-all against the all-reduce and broadcast paths, {_shape_label(shape)} "
                 f"(vertical lines: crossings; median of {repeats} repeats)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out, "crossover", fmt), notes


def predicted_vs_measured(rows, colours, out, fmt) -> Path:
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    values = []
    for path, points in _series(rows, "predicted_comm_ms", "collective_ms").items():
        ax.plot([p[1] for p in points], [p[0] for p in points], "o", color=colours[path], ms=3, label=path)
        values += [v for p in points for v in p if v > 0]
    if values:
        low, high = min(values) / 1.5, max(values) * 1.5
        ax.plot([low, high], [low, high], "k-", lw=0.8)
        ax.fill_between([low, high], [0.75 * low, 0.75 * high], [1.25 * low, 1.25 * high], color="k", alpha=0.08, label="±25%")
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ms inside collectives")
    ax.set_ylabel("predicted ms (cost model)")
    link = rows[0]["link"] if rows else ""
    repeats = rows[0]["repeats"] if rows else "?"
    ax.set_title(f"Cost model against measurement, median of {repeats} repeats\n({link})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "predicted_vs_measured", fmt)


def _mib(value: str) -> str:
    return "n/a" if value in ("", None) else f"{float(value) / 2**20:.2f}"


def _number(value: str, digits: int = 2) -> str:
    return "n/a" if value in ("", None) else f"{float(value):.{digits}f}"


def sweep_table(rows: list[dict], out: Path) -> Path:
    """Write the sweep as a Markdown table, one line per (point, path), for BENCHMARKS.md."""
    columns = ("shape", "tokens/rank", "locality", "path", "MiB sent: model / counted / OS", "comm phases ms",
               "in collectives ms [p10, p90]", "predicted ms", "compute ms", "GFLOP/s", "total ms")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    order = lambda r: (r["preset"], int(r["world_size"]), int(r["top_k"]), r["dtype"], int(r["tokens"]),  # noqa: E731
                       float(r["locality"] or 0), r["path"])
    for row in sorted(rows, key=order):
        cells = (
            _shape_label(row), row["tokens"], _number(row["locality"] or 0), row["path"],
            f"{_mib(row['model_sent_total_bytes'])} / {_mib(row['sent_total_bytes'])} / {_mib(row['os_sent_total_bytes'])}",
            _number(row["comm_ms"]),
            f"{_number(row['collective_ms'])} [{_number(row['collective_p10_ms'])}, {_number(row['collective_p90_ms'])}]",
            _number(row["predicted_comm_ms"]), _number(row["compute_ms"], 1),
            _number(float(row["compute_flops_per_s"]) / 1e9, 1), _number(row["total_ms"], 1),
        )
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    path = out / "sweep_table.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- from collectives-*.csv --------------------------------------------------------------------


def busbw_vs_size(csv_path: Path, out: Path, fmt: str) -> Path:
    with open(csv_path, newline="") as f:
        points = list(csv.DictReader(f))
    if not points or "busbw_GBps" not in points[0]:
        raise ResultsFileError(f"results file {str(csv_path)!r} is not a collectives CSV; rerun `python -m moe_lab collectives`")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for op in dict.fromkeys(point["op"] for point in points if point["op"] != "all_to_all_self"):
        mine = [point for point in points if point["op"] == op]
        ax.plot([int(p["size"]) for p in mine], [float(p["busbw_GBps"]) for p in mine], "o-", ms=3, label=op)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes, nccl-tests convention)")
    ax.set_ylabel("busbw (GB/s)")
    first = points[0]
    ax.set_title(f"Bus bandwidth, {first['ranks']} ranks on {first['backend']} (median of {first['iters']}+ iterations)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, f"busbw_vs_size_{csv_path.stem.removeprefix('collectives-')}", fmt)


# -- from compare --json output ----------------------------------------------------------------


def _load_compare_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
        document["paths"][0]["per_rank"][0]["timeline"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise ResultsFileError(
            f"results file {str(path)!r} is not the output of `compare --json` or is truncated ({type(err).__name__}: {err})"
        ) from None
    return document


def traffic_matrices(document: dict, name: str, out: Path, fmt: str) -> Path:
    paths = document["paths"]
    n = len(paths[0]["per_rank"])
    fig, axes = plt.subplots(2, len(paths), figsize=(2.8 * len(paths), 5.4), squeeze=False)
    for column, path in enumerate(paths):
        counted = [[0] * n for _ in range(n)]
        os_rows = []
        for src, rank in enumerate(path["per_rank"]):
            for record in rank["collectives"]:
                for dst, value in enumerate(record.get("sent_to") or []):
                    counted[src][dst] += value
            os_values = list(rank["os_sent_bytes"].values())
            os_rows.append(None if any(v is None for v in os_values) else sum(os_values))
        # The OS counts one total per rank; with two ranks all of it goes to the other rank.
        measured = [[None] * n for _ in range(n)]
        for src, total in enumerate(os_rows):
            if n == 2 and total is not None:
                measured[src][1 - src] = total
                measured[src][src] = 0
        largest = max(max(line) for line in counted) or 1
        unit, scale = ("MiB", 2**20) if largest >= 2**20 else ("KiB", 2**10)
        for row, (matrix, label) in enumerate(((counted, "counted"), (measured, "OS-measured"))):
            ax = axes[row][column]
            values = [[float("nan") if v is None else v / scale for v in line] for line in matrix]
            ax.imshow(values, cmap="Blues", vmin=0, vmax=largest / scale)
            for i in range(n):
                for j in range(n):
                    value = matrix[i][j]
                    text = "n/a" if value is None else f"{value / scale:.1f}"
                    dark = value is not None and value > largest / 2
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.set_xlabel("to rank")
            ax.set_ylabel("from rank")
            ax.grid(False)
            ax.set_title(f"{path['path']}\n{label} ({unit})", fontsize=8)
    workload = document["metadata"]["workload"]
    fig.suptitle(f"Traffic matrices, one layer: {workload['routing']}, tokens per rank {workload['tokens_per_rank']}"
                 + ("" if n == 2 else " (OS counters give only per-rank totals beyond 2 ranks)"), fontsize=9)
    fig.tight_layout()
    return _save(fig, out, f"traffic_matrix_{name}", fmt)


def timelines(document: dict, name: str, out: Path, fmt: str) -> Path:
    paths = document["paths"]
    n = len(paths[0]["per_rank"])
    fig, axes = plt.subplots(len(paths), 1, figsize=(7, 1.0 + 0.45 * n * len(paths)), squeeze=False)
    for ax, path in zip(axes[:, 0], paths):
        for rank, per_rank in enumerate(path["per_rank"]):
            for phase, start, end in per_rank["timeline"]:
                ax.barh(rank, (end - start) * 1e3, left=start * 1e3, color=PHASE_COLOURS.get(phase, "#000000"), height=0.6)
        ax.set_yticks(range(n))
        ax.set_yticklabels([f"rank {rank}" for rank in range(n)])
        ax.invert_yaxis()
        ax.set_title(path["path"], fontsize=8, loc="left")
    for ax in axes[:, 0]:
        ax.set_xlim(left=0)
    axes[-1][0].set_xlabel("ms since the barrier-aligned start of the layer (last repeat)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in PHASE_COLOURS.values()]
    fig.legend(handles, list(PHASE_COLOURS), fontsize=7, ncol=4, loc="lower center")
    fig.suptitle("Per-rank phases of one layer: a long combine on one rank is waiting for the other rank's experts", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, out, f"timeline_{name}", fmt)


# -- all of them ---------------------------------------------------------------------------------


def make_figures(data: Path, out: Path, fmt: str = "png") -> tuple[list[Path], list[str]]:
    """Draw every figure the data folder has inputs for; returns the files written and notes (crossovers)."""
    if not data.is_dir():
        raise ResultsFileError(f"data folder {str(data)!r} not found; run `python -m moe_lab sweep --out {data}` first")
    out.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    with plt.rc_context(STYLE):
        sweep_csv = data / SWEEP_CSV
        if sweep_csv.exists():
            rows = read_results(sweep_csv, SWEEP_FIELDS)
            if rows:
                colours = path_colours(row["path"] for row in rows)
                shape = _main_shape(rows)
                written.append(bytes_vs_locality(rows, shape, colours, out, fmt))
                written.append(phases_vs_tokens(rows, shape, colours, out, fmt))
                path, crossings = crossover(rows, shape, colours, out, fmt)
                written.append(path)
                notes += crossings
                written.append(predicted_vs_measured(rows, colours, out, fmt))
                written.append(sweep_table(rows, out))
        else:
            notes.append(f"no {sweep_csv}: skipped the sweep figures")
        for csv_path in sorted(data.glob("collectives-*.csv")):
            written.append(busbw_vs_size(csv_path, out, fmt))
        for json_path in sorted(data.glob("layer-*.json")):
            document = _load_compare_json(json_path)
            name = json_path.stem.removeprefix("layer-")
            written.append(traffic_matrices(document, name, out, fmt))
            written.append(timelines(document, name, out, fmt))
    return written, notes
