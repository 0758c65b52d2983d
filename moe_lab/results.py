"""Results on disk: one CSV row per path, and a JSON file with the run's environment.

Files are written to a temporary name and renamed, so a crash never leaves half a file.
`read_results_csv` and `read_results_json` read such files back and raise `ResultsFileError`,
naming the file, when one is corrupt or truncated, so that code resuming from a file reports
it instead of overwriting it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from . import __version__
from .bytes_model import path_transfers, per_rank_by_phase, token_bytes_sent
from .compare import COMM_PHASES, PHASES, CompareResult, PathResult
from .environment import inspect_environment
from .errors import InputError

CSV_FIELDS = (
    ["path", "ranks", "backend", "dtype", "routing", "placement", "tokens_per_rank", "repeats"]
    + [f"sent_{phase}_bytes" for phase in COMM_PHASES]
    + ["sent_total_bytes", "os_sent_total_bytes"]
    + [f"{phase}_ms" for phase in PHASES]
    + ["total_ms", "rel_error", "passed"]
    # spread over repeats, and the byte model (largest rank), appended so older readers keep working
    + [f"{phase}_{q}_ms" for phase in PHASES + ("total",) for q in ("p10", "p90")]
    + ["comm_ms", "comm_p10_ms", "comm_p90_ms", "collective_ms", "collective_p10_ms", "collective_p90_ms"]
    + ["model_sent_total_bytes", "model_received_total_bytes", "model_payload_total_bytes", "token_sent_bytes"]
)


class ResultsFileError(InputError):
    """A results file that cannot be read back: corrupt, truncated or of another format."""


def _write_temporary(path: Path, text: str) -> str:
    """Write `text` to a new temporary file next to `path`, flushed to disk; return its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return temporary


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: readers see the old file or the new one, never half."""
    path = Path(path)
    temporary = _write_temporary(path, text)
    try:
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_new_atomic(path: Path, text: str) -> None:
    """Create `path` with `text` in one step; raise FileExistsError if it exists, even if created meanwhile.

    The hard link fails when the name is taken, so two processes never overwrite each other.
    """
    path = Path(path)
    temporary = _write_temporary(path, text)
    try:
        os.link(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def read_results_csv(path: Path, fields=CSV_FIELDS) -> list[dict[str, str]]:
    """Read a results CSV written by `rows_csv`: one dict of strings per row.

    Raises ResultsFileError naming `path` if it is missing, empty, truncated (its last line has
    no line end or too few fields), lacks one of `fields` in its header, or is not valid CSV.
    """
    path = Path(path)
    text = _read_text(path)
    if not text.endswith("\n"):
        raise _corrupt(path, "it is truncated: its last line has no line end")
    try:
        table = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as err:
        raise _corrupt(path, f"it is not valid CSV: {err}") from None
    header, rows = table[0], table[1:]
    missing = [name for name in fields if name not in header]
    if missing:
        raise _corrupt(path, f"its header lacks the columns {', '.join(missing)}; it is not a moe_lab results table")
    records = []
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise _corrupt(path, f"line {line} has {len(row)} fields but the header has {len(header)}")
        records.append(dict(zip(header, row)))
    return records


def read_results_json(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """Read a JSON object written by moe_lab; raise ResultsFileError naming `path` if it is unusable."""
    path = Path(path)
    text = _read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise _corrupt(path, f"it is not valid JSON ({err}); a truncated file looks like this") from None
    if not isinstance(document, dict):
        raise _corrupt(path, f"it contains a JSON {type(document).__name__}, not an object")
    missing = [key for key in keys if key not in document]
    if missing:
        raise _corrupt(path, f"it lacks the keys {', '.join(missing)}")
    return document


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ResultsFileError(f"results file {str(path)!r} not found") from None
    except OSError as err:
        raise ResultsFileError(f"results file {str(path)!r} cannot be read: {err.strerror}") from None
    if not data:
        raise _corrupt(path, "it is empty")
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise _corrupt(path, f"it is not UTF-8 text (byte {err.start})") from None


def _corrupt(path: Path, detail: str) -> ResultsFileError:
    return ResultsFileError(
        f"results file {str(path)!r} is unusable: {detail}. It was left unchanged: move it away or delete it, then run again"
    )


def max_over_ranks(result: PathResult, key: str) -> dict[str, int | None]:
    """Per phase, the largest bytes any rank sent (None when a rank has no OS reading)."""
    per_rank = [result.bytes_by_phase(rank, key) for rank in range(len(result.records))]
    return {
        phase: None if any(rank[phase] is None for rank in per_rank) else max(rank[phase] for rank in per_rank)
        for phase in COMM_PHASES
    }


def total_sent(result: PathResult, key: str) -> int | None:
    totals = []
    for rank in range(len(result.records)):
        phases = result.bytes_by_phase(rank, key).values()
        if any(value is None for value in phases):
            return None
        totals.append(sum(phases))
    return max(totals)


def path_row(result: CompareResult, path: PathResult) -> dict:
    workload, options = result.workload, result.options
    sent = max_over_ranks(path, "sent_bytes")
    row = {
        "path": path.path,
        "ranks": workload.world_size,
        "backend": result.backend,
        "dtype": str(workload.dtype).removeprefix("torch."),
        "routing": workload.source,
        "placement": workload.placement.kind,
        "tokens_per_rank": " ".join(map(str, workload.tokens_per_rank)),
        "repeats": options.repeats,
        "sent_total_bytes": total_sent(path, "sent_bytes"),
        "os_sent_total_bytes": total_sent(path, "os_sent_bytes"),
        "total_ms": path.total_seconds() * 1e3,
        "rel_error": path.error,
        "passed": path.passed,
    }
    row.update({f"sent_{phase}_bytes": sent[phase] for phase in COMM_PHASES})
    row.update({f"{phase}_ms": path.phase_seconds(phase) * 1e3 for phase in PHASES})

    # Spread over repeats, time inside collectives, and the byte model.
    for phase in PHASES:
        stats = path.phase_spread(phase)
        row[f"{phase}_p10_ms"], row[f"{phase}_p90_ms"] = stats.p10 * 1e3, stats.p90 * 1e3
    total = path.total_spread()
    row["total_p10_ms"], row["total_p90_ms"] = total.p10 * 1e3, total.p90 * 1e3
    comm = path.comm_spread()
    row.update(comm_ms=comm.median * 1e3, comm_p10_ms=comm.p10 * 1e3, comm_p90_ms=comm.p90 * 1e3)
    collective = path.collective_spread()  # None where calls are not timed (CUDA)
    for key, statistic in (("collective_ms", "median"), ("collective_p10_ms", "p10"), ("collective_p90_ms", "p90")):
        row[key] = None if collective is None else getattr(collective, statistic) * 1e3
    row.update(model_totals(result, path))
    row["token_sent_bytes"] = max((token_bytes_sent(records) for records in path.records), default=0)
    return row


def model_totals(result: CompareResult, path: PathResult) -> dict[str, int | None]:
    """Return the byte model's totals for `path` on the busiest rank (as `sent_total_bytes`), or None without a model."""
    try:
        transfers = path_transfers(path.base_path, result.workload, result.backend, path.options)
    except KeyError:
        return {"model_sent_total_bytes": None, "model_received_total_bytes": None, "model_payload_total_bytes": None}
    n = result.workload.world_size
    totals = {}
    for kind, key in (("sent", "model_sent_total_bytes"), ("received", "model_received_total_bytes"), ("payload", "model_payload_total_bytes")):
        totals[key] = max((sum(rank.values()) for rank in per_rank_by_phase(transfers, n, kind)), default=0)
    return totals


def git_commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


def environment(backend: str, rank_env: dict[str, str] | None = None) -> dict:
    """Describe the run's software and hardware; `rank_env` contains variables set for the ranks only."""
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    rank_env = rank_env or {}
    return {
        "moe_lab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": backend,
        "gpus": devices,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "nccl_p2p_disable": rank_env.get("NCCL_P2P_DISABLE", os.environ.get("NCCL_P2P_DISABLE")),
        "p2p": [list(row) for row in inspect_environment().p2p],  # can_device_access_peer matrix
        "git_commit": git_commit(),
    }


def result_metadata(result: CompareResult) -> dict:
    workload, options = result.workload, result.options
    return {
        "command": "compare",
        "config": {k: v for k, v in vars(workload.cfg).items()},
        "workload": {
            "world_size": workload.world_size,
            "tokens_per_rank": workload.tokens_per_rank,
            "routing": workload.source,
            "placement": workload.placement.kind,
            "dtype": str(workload.dtype).removeprefix("torch."),
            "seed": workload.seed,
            **workload.extra,
        },
        "repeats": options.repeats,
        "warmup": options.warmup,
        "timeout_s": options.timeout_s,
        "rank_env": dict(options.env),
        "environment": environment(result.backend, dict(options.env)),
    }


def result_json(result: CompareResult) -> dict:
    paths = []
    for path in result.paths:
        paths.append({
            **path_row(result, path),
            "per_rank": [
                {
                    "sent_bytes": path.bytes_by_phase(rank, "sent_bytes"),
                    "os_sent_bytes": path.bytes_by_phase(rank, "os_sent_bytes"),
                    "collectives": path.records[rank],
                    "timeline": path.segments[rank],
                }
                for rank in range(len(path.records))
            ],
        })
    return {"metadata": result_metadata(result), "paths": paths}


def rows_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()
