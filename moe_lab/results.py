"""Results on disk: one CSV row per path, and a JSON file with the run's environment.

Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from . import __version__
from .compare import COMM_PHASES, PHASES, CompareResult, PathResult

CSV_FIELDS = (
    ["path", "ranks", "backend", "dtype", "routing", "placement", "tokens_per_rank", "repeats"]
    + [f"sent_{phase}_bytes" for phase in COMM_PHASES]
    + ["sent_total_bytes", "os_sent_total_bytes"]
    + [f"{phase}_ms" for phase in PHASES]
    + ["total_ms", "rel_error", "passed"]
)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
    return row


def git_commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


def environment(backend: str) -> dict:
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
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
        "nccl_p2p_disable": os.environ.get("NCCL_P2P_DISABLE"),
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
        "environment": environment(result.backend),
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
