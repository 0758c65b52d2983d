"""The command line: `python -m moe_lab compare` and `python -m moe_lab env`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from .compare import COMM_PHASES, PHASES, TOLERANCE, CompareOptions, run_compare
from .config import PRESETS
from .environment import advise, choose_backend, format_report, inspect_environment
from .errors import InputError
from .faults import FAULT_ENV
from .launch import BACKENDS, DEFAULT_TIMEOUT_S, RankError, under_torchrun
from .paths import PATHS
from .results import path_row, result_json, result_metadata, rows_csv, write_new_atomic
from .routing import PLACEMENTS, ROUTINGS
from .workload import DTYPES, WorkloadSpec

DEFAULT_TOKENS = 64  # per rank: the default compare finishes in about 20 s on 2 CPU cores


def human_bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def parse_tokens(text: str) -> int | tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid token count {text!r}: give one integer per rank or one for all, e.g. 64 or 7,1,4"
        ) from None
    return counts[0] if len(counts) == 1 else counts


def parse_paths(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_compare_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="run every path on the same inputs and print bytes and time per phase",
        description="Run the expert-parallel paths on real ranks, check each against the "
        "single-process reference, and print bytes sent and time per phase.",
        epilog=f"To make a rank fail on purpose, set {FAULT_ENV}, e.g. {FAULT_ENV}=rank=1,phase=dispatch,kind=hang "
        "(keys: rank, phase, kind, path, seconds; see moe_lab/faults.py).",
    )
    parser.add_argument("--preset", default="deepseek-v2-lite",
                        help=f"MoE shape: {', '.join(PRESETS)}, or a path to a Hugging Face config.json (default: %(default)s)")
    parser.add_argument("--world-size", type=int, default=None, help="number of ranks (default: 2)")
    parser.add_argument("--tokens", type=parse_tokens, default=None,
                        help=f"tokens per rank, one number or one per rank like 7,1,4 (default: {DEFAULT_TOKENS})")
    parser.add_argument("--routing", default="gate", help=f"routing source: {', '.join(ROUTINGS)} (default: %(default)s)")
    parser.add_argument("--locality", type=float, default=1.0,
                        help="for --routing local: share of each token's experts on its own rank, 0..1 (default: %(default)s)")
    parser.add_argument("--zipf-exponent", type=float, default=1.2, help="for --routing skewed: Zipf exponent (default: %(default)s)")
    parser.add_argument("--placement", default=None, help=f"expert placement: {', '.join(PLACEMENTS)} (default: contiguous)")
    parser.add_argument("--dtype", default=None, help=f"dtype of tokens and weights: {', '.join(DTYPES)} (default: float32)")
    parser.add_argument("--backend", default="auto", help=f"{', '.join(BACKENDS)}; auto picks nccl with one GPU per rank, else gloo (default: %(default)s)")
    parser.add_argument("--paths", type=parse_paths, default=tuple(PATHS), help=f"comma-separated paths (default: {','.join(PATHS)})")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per path, after warm-up (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per path before the repeats (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed for weights, tokens and synthetic routing (default: 0)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="collective timeout in seconds: a rank that waits this long for another ends the run with "
                        "an error naming the rank it waited for (default: %(default)s)")
    parser.add_argument("--no-p2p", action="store_true",
                        help="set NCCL_P2P_DISABLE=1 for the ranks, so NCCL moves data through host memory as on GPUs "
                        "without P2P; recorded in the metadata")
    parser.add_argument("--routing-file", default=None,
                        help="explicit routing from a JSON file; the file also sets shape, ranks, placement, dtype and seed")
    parser.add_argument("--out", default="data/runs", help="folder for the CSV and JSON metadata (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")


def spec_from_args(args) -> WorkloadSpec:
    if args.routing_file is not None:
        conflicting = [name for name in ("world_size", "tokens", "placement", "dtype", "seed") if getattr(args, name) is not None]
        if conflicting or args.preset != "deepseek-v2-lite":
            options = ", ".join("--" + name.replace("_", "-") for name in conflicting + (["preset"] if args.preset != "deepseek-v2-lite" else []))
            raise InputError(f"--routing-file sets the shape, ranks, placement, dtype and seed; drop {options}")
    return WorkloadSpec(
        preset=args.preset,
        world_size=2 if args.world_size is None else args.world_size,
        tokens=DEFAULT_TOKENS if args.tokens is None else args.tokens,
        routing=args.routing,
        locality=args.locality,
        zipf_exponent=args.zipf_exponent,
        placement=args.placement or "contiguous",
        dtype=args.dtype or "float32",
        seed=0 if args.seed is None else args.seed,
        routing_file=args.routing_file,
    )


def format_table(result) -> str:
    workload = result.workload
    cfg = workload.cfg
    lines = [
        f"moe_lab compare: {cfg.name} (hidden {cfg.hidden}, expert FFN {cfg.moe_intermediate}, "
        f"{cfg.n_experts} experts, top-{cfg.top_k}, {cfg.n_shared_experts} shared)",
        f"{workload.world_size} ranks on {result.backend}, {str(workload.dtype).removeprefix('torch.')}, "
        f"routing {workload.source}, {workload.placement.kind} placement, tokens per rank {workload.tokens_per_rank}",
        f"bytes: sent by one rank to the others (largest rank); OS = bytes written to sockets (gloo only)",
        f"times: median over {result.options.repeats} repeats after {result.options.warmup} warm-up, slowest rank; "
        f"error: max |path - reference| / max |reference|, tolerance {TOLERANCE[workload.dtype]:g}",
        "",
    ]
    header = (
        f"{'path':<24}" + "".join(f"{phase:>11}" for phase in COMM_PHASES) + f"{'total':>11}{'OS total':>11} |"
        + "".join(f"{phase + ' ms':>12}" for phase in PHASES) + f"{'total ms':>10} |{'error':>9}  check"
    )
    lines += [header, "-" * len(header)]
    for path in result.paths:
        row = path_row(result, path)
        lines.append(
            f"{path.path:<24}"
            + "".join(f"{human_bytes(row[f'sent_{phase}_bytes']):>11}" for phase in COMM_PHASES)
            + f"{human_bytes(row['sent_total_bytes']):>11}{human_bytes(row['os_sent_total_bytes']):>11} |"
            + "".join(f"{row[f'{phase}_ms']:>12.2f}" for phase in PHASES)
            + f"{row['total_ms']:>10.2f} |{row['rel_error']:>9.1e}  {'ok' if path.passed else 'FAIL'}"
        )
    shares = ", ".join(
        f"{path.path} {path.wall_seconds:.1f} s ({100 * path.wall_seconds / result.wall_seconds:.0f}%)" for path in result.paths
    )
    lines += [
        "",
        f"wall time: {result.wall_seconds:.1f} s for the ranks (start-up and weights included), "
        f"{result.reference_seconds:.1f} s for the reference",
        f"of which running the paths, warm-up included: {shares}",
    ]
    return "\n".join(lines)


def check_out_dir(out: str) -> None:
    """Make sure results can be saved in `out` before ranks run, so a finished run is never lost."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {out!r} is a file, not a folder; give a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {out!r}: cannot create the folder ({err.strerror}); give a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--out {out!r} is not writable; give a writable folder")


def save_run(result, out: str) -> tuple[Path, Path]:
    """Write the CSV and JSON under new names: runs started in the same second never overwrite each other."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = f"compare-{stamp}-{result.workload.cfg.name}-{result.workload.world_size}r"
    rows = [path_row(result, path) for path in result.paths]
    csv_text = rows_csv(rows)
    json_text = json.dumps(result_metadata(result), indent=1, default=str) + "\n"
    for attempt in range(1, 1000):
        base = Path(out) / (stem if attempt == 1 else f"{stem}-{attempt}")
        csv_path, json_path = base.with_suffix(".csv"), base.with_suffix(".json")
        try:
            write_new_atomic(json_path, json_text)
        except FileExistsError:
            continue
        try:
            write_new_atomic(csv_path, csv_text)
        except FileExistsError:
            json_path.unlink()
            continue
        return csv_path, json_path
    raise InputError(f"--out {out!r} already contains 999 runs named {stem}; give another folder")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def cmd_compare(args) -> int:
    spec = spec_from_args(args)
    options = CompareOptions(
        spec=spec, paths=args.paths, repeats=args.repeats, warmup=args.warmup,
        backend=args.backend, timeout_s=args.timeout,
        env=(("NCCL_P2P_DISABLE", "1"),) if args.no_p2p else (),
    )
    check_out_dir(args.out)
    if under_torchrun():
        from .compare import run_compare_torchrun

        result = run_compare_torchrun(options)
        if result is None:  # ranks other than 0 print nothing
            return 0
    else:
        result = run_compare(options)
    csv_path, json_path = save_run(result, args.out)
    if args.json:
        document = result_json(result)
        document["files"] = {"csv": str(csv_path), "metadata": str(json_path)}
        print(json.dumps(_json_safe(document), indent=1, default=str))
    else:
        print(format_table(result))
        print(f"saved {csv_path} and {json_path}")
    failed = [path.path for path in result.paths if not path.passed]
    if failed:
        print(f"moe_lab: error: {', '.join(failed)} did not match the reference within {TOLERANCE[result.workload.dtype]:g}", file=sys.stderr)
        return 1
    return 0


def add_env_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "env",
        help="print CPUs, GPUs, the P2P matrix, NCCL and torch versions, the backend and advice",
        description="Describe this machine as the kit sees it: CPUs, GPUs and which can read each "
        "other's memory (P2P), NCCL and torch versions, the backend compare would pick, and advice "
        "for GPUs without P2P.",
    )
    parser.add_argument("--world-size", type=int, default=2, help="ranks to plan for (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the machine description as JSON")


def cmd_env(args) -> int:
    if args.world_size < 1:
        raise InputError(f"--world-size must be an integer >= 1, got {args.world_size}")
    report = inspect_environment()
    if args.json:
        choice = choose_backend("auto", args.world_size, len(report.gpus), report.nccl_available)
        document = {
            **report.to_dict(),
            "world_size": args.world_size,
            "backend": choice.backend,
            "backend_reason": choice.reason,
            "advice": advise(report, args.world_size),
        }
        print(json.dumps(document, indent=1))
    else:
        print(format_report(report, args.world_size))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe_lab", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_compare_parser(subparsers)
    add_env_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"compare": cmd_compare, "env": cmd_env}[args.command](args)
    except InputError as err:
        print(f"moe_lab: error: {err}", file=sys.stderr)
        return 2
    except RankError as err:
        print(f"moe_lab: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moe_lab: interrupted; all ranks were stopped", file=sys.stderr)
        return 130
