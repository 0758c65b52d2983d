"""Sweeps: `compare` over a grid of workloads, one CSV row per (point, path), resumable.

The CSV and a JSON file of metadata live in one folder. After each launch of ranks the CSV is
rewritten atomically with the finished points added, so an interrupted sweep loses at most the
points of the launch in flight, and a rerun with the same folder skips every finished point.
A results file that cannot be read back is reported with its path and never overwritten.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .bench import CalibrationOptions, run_calibration
from .config import resolve_config
from .compare import CompareOptions, CompareResult, run_compare_many
from .costmodel import Link, calibration_path, link_from_calibration, measured_compute_rate, predict, resolve_link
from .errors import InputError
from .launch import resolve_backend
from .paths import PATHS
from .results import CSV_FIELDS, environment, path_row, write_atomic
from .workload import WorkloadSpec, build_workload

log = logging.getLogger(__name__)

SWEEP_CSV = "sweep.csv"
SWEEP_JSON = "sweep.json"
KEY_FIELDS = ("preset", "world_size", "tokens", "routing", "locality", "top_k", "dtype", "placement", "seed")
EXTRA_FIELDS = ("link", "predicted_comm_ms", "predicted_compute_ms", "compute_flops_per_s")
SWEEP_FIELDS = list(KEY_FIELDS) + [field for field in CSV_FIELDS if field not in KEY_FIELDS] + list(EXTRA_FIELDS)
# Settings every point of one sweep folder shares; a rerun with others would mix incomparable rows.
FIXED_SETTINGS = (
    "preset", "routing", "placement", "seed", "repeats", "warmup", "paths", "dispatch_dtypes", "overlap", "backend", "link",
)
# Settings added after the first sweeps were written: a folder without them used their defaults.
SETTING_DEFAULTS = {"dispatch_dtypes": [], "overlap": False}


class ResultsFileError(InputError):
    """A results file on disk that is corrupt, truncated or from another sweep."""


@dataclass(frozen=True)
class SweepGrid:
    preset: str = "deepseek-v2-lite"
    tokens: tuple[int, ...] = (1, 16, 128, 512)
    localities: tuple[float, ...] = (0.0, 0.5, 2 / 3, 5 / 6, 1.0)
    top_ks: tuple[int | None, ...] = (None,)  # None keeps the preset's top_k
    world_sizes: tuple[int, ...] = (2,)
    dtypes: tuple[str, ...] = ("float32",)
    routing: str = "local"
    placement: str = "contiguous"
    seed: int = 0

    def specs(self) -> list[WorkloadSpec]:
        """List every point, world size outermost so one launch serves a world size's points."""
        preset_top_k = resolve_config(self.preset).top_k
        return [
            WorkloadSpec(preset=self.preset, world_size=world_size, tokens=tokens, routing=self.routing, locality=locality,
                         placement=self.placement, dtype=dtype, seed=self.seed,
                         top_k=preset_top_k if top_k is None else top_k)
            for world_size, top_k, dtype, tokens, locality in itertools.product(
                self.world_sizes, self.top_ks, self.dtypes, self.tokens, self.localities
            )
        ]


@dataclass(frozen=True)
class SweepOptions:
    grid: SweepGrid = SweepGrid()
    out: str = "data/sweep"
    paths: tuple[str, ...] = tuple(PATHS)
    dispatch_dtypes: tuple[str, ...] = ()  # each adds a variant of every path that dispatches tokens
    overlap: bool = False  # adds an overlapped variant of every path that dispatches tokens
    repeats: int = 5
    warmup: int = 1
    backend: str = "auto"
    link: str = "this-machine"  # cost model for the predicted columns; calibrated per world size if missing
    points_per_launch: int = 1
    timeout_s: float = 120.0


def point_key(spec: WorkloadSpec) -> tuple[str, ...]:
    """Return the key fields of a point as the CSV stores them (strings), for resuming."""
    locality = f"{spec.locality:.6g}" if spec.routing == "local" else ""
    return (
        spec.preset, str(spec.world_size), str(spec.tokens), spec.routing, locality,
        str(spec.top_k), spec.dtype, spec.placement, str(spec.seed),
    )


def read_results(path: Path, fields: list[str]) -> list[dict]:
    """Rows of a results CSV; raises ResultsFileError naming the file if it cannot be trusted."""
    # NOTE: a minimal check (header, column count, no stray bytes) written for the sweep alone;
    # a shared reader for every results file would replace it.
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ResultsFileError(f"results file {str(path)!r} is not text ({err}); move it away and rerun") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise ResultsFileError(f"results file {str(path)!r} is empty; delete it and rerun")
    if rows[0] != fields:
        raise ResultsFileError(
            f"results file {str(path)!r} has other columns than this version writes; "
            f"move it away or use another --out folder"
        )
    if not text.endswith("\n"):
        raise ResultsFileError(f"results file {str(path)!r} is truncated (no newline after the last row); move it away and rerun")
    records = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(fields):
            raise ResultsFileError(
                f"results file {str(path)!r} is corrupt: line {number} has {len(row)} fields, expected {len(fields)}; "
                f"move it away and rerun"
            )
        records.append(dict(zip(fields, row)))
    return records


def rows_to_csv(rows: list[dict], fields: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({field: _csv_value(row.get(field)) for field in fields})
    return buffer.getvalue()


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def calibration_csv(document: dict) -> str:
    """Format the calibration's points as CSV, with the fitted time beside each, for the busbw figure."""
    fields = ["op", "size", "count", "ranks", "backend", "iters", "time_us", "p10_us", "p90_us", "algbw_GBps", "busbw_GBps",
              "wire_bytes", "os_sent_bytes", "fit_us"]
    rows = []
    for point in document["points"]:
        fit = document["fits"].get(point["op"]) or document.get("local_copy") or {"alpha": float("nan"), "beta": float("nan")}
        rows.append({
            "op": point["op"], "size": point["size"], "count": point["count"], "ranks": document["world_size"],
            "backend": document["backend"], "iters": point["iters"], "time_us": point["time_s"] * 1e6,
            "p10_us": point["p10_s"] * 1e6, "p90_us": point["p90_s"] * 1e6, "algbw_GBps": point["algbw"] / 1e9,
            "busbw_GBps": point["busbw"] / 1e9, "wire_bytes": point["wire_bytes"], "os_sent_bytes": point["os_sent_bytes"],
            "fit_us": (fit["alpha"] + fit["beta"] * point["wire_bytes"]) * 1e6,
        })
    return rows_to_csv(rows, fields)


def sweep_rows(result: CompareResult, spec: WorkloadSpec, link: Link | None) -> list[dict]:
    """Build one CSV row per path of a finished point."""
    key = dict(zip(KEY_FIELDS, point_key(spec)))
    rows = []
    for path in result.paths:
        row = {**path_row(result, path), **key}
        row["compute_flops_per_s"] = measured_compute_rate(path, result.workload)
        if link is not None:
            try:
                prediction = predict(path.base_path, result.workload, link, path.options)
            except KeyError:
                prediction = None  # a path the byte model does not cover yet
            row["link"] = link.name
            row["predicted_comm_ms"] = None if prediction is None else prediction.comm_seconds * 1e3
            row["predicted_compute_ms"] = None if prediction is None else prediction.compute_seconds * 1e3
        rows.append(row)
    return rows


def _settings(options: SweepOptions) -> dict:
    grid = options.grid
    return {
        "preset": grid.preset, "routing": grid.routing, "placement": grid.placement, "seed": grid.seed,
        "repeats": options.repeats, "warmup": options.warmup, "paths": list(options.paths),
        "dispatch_dtypes": list(options.dispatch_dtypes), "overlap": options.overlap,
        "backend": options.backend, "link": options.link,
    }


def check_metadata(folder: Path, options: SweepOptions) -> dict:
    """Load the folder's metadata and check that it was made with the same fixed settings."""
    path = folder / SWEEP_JSON
    if not path.exists():
        return {}
    try:
        metadata = json.loads(path.read_text())
        previous = metadata["settings"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ResultsFileError(f"metadata file {str(path)!r} is corrupt ({type(err).__name__}: {err}); move it away and rerun") from None
    current = _settings(options)
    previous = {**SETTING_DEFAULTS, **previous}
    changed = [name for name in FIXED_SETTINGS if previous.get(name) != current.get(name)]
    if changed:
        details = ", ".join(f"{name}={previous.get(name)!r} there but {current.get(name)!r} now" for name in changed)
        raise ResultsFileError(f"sweep folder {str(folder)!r} was made with other settings ({details}); use --out with a new folder")
    return metadata


def link_for(options: SweepOptions, world_size: int, backend: str, folder: Path) -> Link | None:
    """Return the cost model for a world size: a preset or file, or this machine, calibrated now if not yet done."""
    if options.link == "none":
        return None
    if options.link != "this-machine":
        return resolve_link(options.link)
    path = calibration_path(backend, world_size, folder)
    if not path.exists():
        document = run_calibration(CalibrationOptions(
            world_size=world_size, backend=backend, preset=options.grid.preset,
            dtype=options.grid.dtypes[0], timeout_s=options.timeout_s,
        ))
        document["metadata"] = {"command": "collectives", "environment": environment(backend)}
        write_atomic(path, json.dumps(document, indent=1) + "\n")
        write_atomic(path.with_suffix(".csv"), calibration_csv(document))
    return resolve_link(str(path))


def run_sweep(options: SweepOptions, progress=None) -> Path:
    """Run every unfinished point of the grid and return the CSV path.

    `progress(points_done)` is called after each launch, for a progress bar.
    """
    if options.points_per_launch < 1:
        raise InputError(f"points per launch must be >= 1, got {options.points_per_launch}")
    folder = Path(options.out)
    csv_path = folder / SWEEP_CSV
    specs = options.grid.specs()
    for spec in specs:
        build_workload(spec)  # reject bad input before anything runs
    metadata = check_metadata(folder, options)
    rows = read_results(csv_path, SWEEP_FIELDS) if csv_path.exists() else []
    done = {tuple(row[field] for field in KEY_FIELDS) for row in rows}
    todo = [spec for spec in specs if point_key(spec) not in done]
    if progress is not None:
        progress(len(specs) - len(todo))

    backend_name = resolve_backend(options.backend, max(options.grid.world_sizes))
    metadata = {
        "command": "sweep",
        "settings": _settings(options),
        # every grid run into this folder, in order: points of one grid may extend another's
        "grids": metadata.get("grids", []) + [{**asdict(options.grid), "points": len(specs)}],
        "environment": environment(backend_name),
        "started": metadata.get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
        "seconds": metadata.get("seconds", 0.0),
    }
    compare_options = CompareOptions(paths=options.paths, repeats=options.repeats, warmup=options.warmup,
                                     backend=options.backend, timeout_s=options.timeout_s,
                                     dispatch_dtypes=options.dispatch_dtypes, overlap=options.overlap)
    started = time.perf_counter()
    for world_size in dict.fromkeys(spec.world_size for spec in todo):
        backend = resolve_backend(options.backend, world_size)
        link = link_for(options, world_size, backend, folder)
        mine = [spec for spec in todo if spec.world_size == world_size]
        for first in range(0, len(mine), options.points_per_launch):
            chunk = mine[first : first + options.points_per_launch]
            results = run_compare_many(chunk, replace(compare_options))
            for spec, result in zip(chunk, results):
                failed = [path.path for path in result.paths if not path.passed]
                if failed:
                    log.warning("point %s: %s did not match the reference", point_key(spec), ", ".join(failed))
                rows.extend(sweep_rows(result, spec, link))
            metadata["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            write_atomic(csv_path, rows_to_csv(rows, SWEEP_FIELDS))
            write_atomic(folder / SWEEP_JSON, json.dumps(metadata, indent=1, default=str) + "\n")
            if progress is not None:
                progress(len(chunk))
    if not todo:
        log.info("every point of the grid is already in %s", csv_path)
    return csv_path
