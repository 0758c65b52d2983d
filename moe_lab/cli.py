"""The command line: `python -m moe_lab compare`, and the measuring commands of `lab_cli`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from .compare import COMM_PHASES, PHASES, TOLERANCE, CompareOptions, run_compare
from .config import PRESETS
from .errors import InputError
from .lab_cli import ADD_PARSERS, COMMANDS, add_link_option, print_compare_extras
from .launch import BACKENDS, DEFAULT_TIMEOUT_S, RankError, under_torchrun
from .paths import PATHS
from .results import path_row, result_json, result_metadata, rows_csv, write_atomic
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
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="collective timeout in seconds (default: %(default)s)")
    parser.add_argument("--routing-file", default=None,
                        help="explicit routing from a JSON file; the file also sets shape, ranks, placement, dtype and seed")
    parser.add_argument("--out", default="data/runs", help="folder for the CSV and JSON metadata (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    add_link_option(parser)


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


def save_run(result, out: str) -> tuple[Path, Path]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(out) / f"compare-{stamp}-{result.workload.cfg.name}-{result.workload.world_size}r"
    rows = [path_row(result, path) for path in result.paths]
    csv_path, json_path = base.with_suffix(".csv"), base.with_suffix(".json")
    write_atomic(csv_path, rows_csv(rows))
    write_atomic(json_path, json.dumps(result_metadata(result), indent=1, default=str) + "\n")
    return csv_path, json_path


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
    )
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
        print_compare_extras(result, args)
        print(f"saved {csv_path} and {json_path}")
    failed = [path.path for path in result.paths if not path.passed]
    if failed:
        print(f"moe_lab: error: {', '.join(failed)} did not match the reference within {TOLERANCE[result.workload.dtype]:g}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe_lab", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_compare_parser(subparsers)
    for add_parser in ADD_PARSERS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"compare": cmd_compare, **COMMANDS}[args.command](args)
    except InputError as err:
        print(f"moe_lab: error: {err}", file=sys.stderr)
        return 2
    except RankError as err:
        print(f"moe_lab: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moe_lab: interrupted; all ranks were stopped", file=sys.stderr)
        return 130
