"""The command line: `compare`, `env`, `trace`, `trace-stats`, and the measuring commands of `lab_cli`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from .compare import COMM_PHASES, DISPATCH_TOLERANCE, PHASES, TOLERANCE, CompareOptions, run_compare
from .config import PRESETS
from .environment import advise, choose_backend, format_report, inspect_environment
from .errors import InputError
from .faults import FAULT_ENV
from .lab_cli import ADD_PARSERS, COMMANDS, add_link_option, print_compare_extras
from .launch import BACKENDS, DEFAULT_TIMEOUT_S, RankError, under_torchrun
from .paths import DISPATCH_DTYPES, PATHS
from .results import path_row, result_json, result_metadata, rows_csv, write_new_atomic
from .routing import PLACEMENTS, ROUTINGS
from .trace import is_trace_file
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
    parser.add_argument("--routing", default=None, help=f"routing source: {', '.join(ROUTINGS)} (default: gate)")
    parser.add_argument("--locality", type=float, default=1.0,
                        help="for --routing local: share of each token's experts on its own rank, 0..1 (default: %(default)s)")
    parser.add_argument("--zipf-exponent", type=float, default=1.2, help="for --routing skewed: Zipf exponent (default: %(default)s)")
    parser.add_argument("--placement", default=None, help=f"expert placement: {', '.join(PLACEMENTS)} (default: contiguous)")
    parser.add_argument("--dtype", default=None, help=f"dtype of tokens and weights: {', '.join(DTYPES)} (default: float32)")
    parser.add_argument("--backend", default="auto", help=f"{', '.join(BACKENDS)}; auto picks nccl with one GPU per rank, else gloo (default: %(default)s)")
    parser.add_argument("--paths", type=parse_paths, default=tuple(PATHS), help=f"comma-separated paths (default: {','.join(PATHS)})")
    parser.add_argument("--dispatch-dtype", type=parse_paths, default=(),
                        help=f"also run each path that dispatches tokens with tokens sent as {' or '.join(DISPATCH_DTYPES)} "
                        "(comma-separated; fp8 is e4m3 with one scale per token per 128 channels, results return in bfloat16)")
    parser.add_argument("--overlap", action="store_true",
                        help="also run each path that dispatches tokens with communication overlapped with compute")
    parser.add_argument("--chunks", type=int, default=2, help="with --overlap: chunks each rank's tokens are split into (default: %(default)s)")
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
                        help="explicit routing from a JSON file (it also sets shape, ranks, placement, dtype and seed), "
                        "or a trace recorded by `trace` (it sets shape and routing; its tokens are split over the ranks)")
    parser.add_argument("--checkpoint", default=None,
                        help="local Hugging Face snapshot of a DeepSeek-V2-family model: shape, gate and expert weights "
                        "come from its MoE layer --layer")
    parser.add_argument("--layer", type=int, default=None,
                        help="model layer to run, for --checkpoint or a trace (default: the first MoE layer, "
                        "or the trace's layer with recorded hidden states)")
    parser.add_argument("--out", default="data/runs", help="folder for the CSV and JSON metadata (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    add_link_option(parser)


def spec_from_args(args) -> WorkloadSpec:
    trace = args.routing_file is not None and is_trace_file(args.routing_file)
    preset_given = args.preset != "deepseek-v2-lite"
    if args.routing_file is not None and not trace:
        conflicting = [name for name in ("world_size", "tokens", "placement", "dtype", "seed", "routing", "checkpoint", "layer") if getattr(args, name) is not None]
        if conflicting or preset_given:
            options = ", ".join("--" + name.replace("_", "-") for name in conflicting + (["preset"] if preset_given else []))
            raise InputError(f"--routing-file sets the shape, ranks, placement, dtype and seed; drop {options}")
    if trace and (preset_given or args.routing is not None):
        options = ", ".join(option for option, given in (("--preset", preset_given), ("--routing", args.routing is not None)) if given)
        raise InputError(f"a trace sets the shape and the routing; drop {options}")
    if args.checkpoint is not None and preset_given:
        raise InputError("--checkpoint sets the MoE shape from its config.json; drop --preset")
    if trace:
        tokens = args.tokens  # None: replay every token of the trace
    else:
        tokens = DEFAULT_TOKENS if args.tokens is None else args.tokens
    return WorkloadSpec(
        preset=args.preset,
        world_size=2 if args.world_size is None else args.world_size,
        tokens=tokens,
        routing=args.routing or "gate",
        locality=args.locality,
        zipf_exponent=args.zipf_exponent,
        placement=args.placement or "contiguous",
        dtype=args.dtype or "float32",
        seed=0 if args.seed is None else args.seed,
        routing_file=args.routing_file,
        checkpoint=args.checkpoint,
        layer=args.layer,
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
        f"error: max |path - reference| / max |reference|, tolerance {TOLERANCE[workload.dtype]:g}"
        + "".join(f", {dtype} dispatch {DISPATCH_TOLERANCE[dtype]:g}" for dtype in result.options.dispatch_dtypes),
        "",
    ]
    width = max(24, *(len(path.path) + 2 for path in result.paths))
    header = (
        f"{'path':<{width}}" + "".join(f"{phase:>12}" for phase in COMM_PHASES) + f"{'total':>12}{'OS total':>12} |"
        + "".join(f"{phase + ' ms':>12}" for phase in PHASES) + f"{'total ms':>10} |{'error':>9}  check"
    )
    lines += [header, "-" * len(header)]
    for path in result.paths:
        row = path_row(result, path)
        lines.append(
            f"{path.path:<{width}}"
            + "".join(f"{human_bytes(row[f'sent_{phase}_bytes']):>12}" for phase in COMM_PHASES)
            + f"{human_bytes(row['sent_total_bytes']):>12}{human_bytes(row['os_sent_total_bytes']):>12} |"
            + "".join(f"{row[f'{phase}_ms']:>12.2f}" for phase in PHASES)
            + f"{row['total_ms']:>10.2f} |{row['rel_error']:>9.1e}  {'ok' if path.passed else 'FAIL'}"
        )
    shares = [
        f"{path.path} {path.wall_seconds:.1f} s ({100 * path.wall_seconds / result.wall_seconds:.0f}%)" for path in result.paths
    ]
    lines += [
        "",
        f"wall time: {result.wall_seconds:.1f} s for the ranks (start-up and weights included), "
        f"{result.reference_seconds:.1f} s for the reference",
        "of which running the paths, warm-up included:",
    ]
    lines += ["  " + ", ".join(shares[i : i + 4]) for i in range(0, len(shares), 4)]
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
        dispatch_dtypes=args.dispatch_dtype, overlap=args.overlap, chunks=args.chunks,
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
        print_compare_extras(result, args)
        print(f"saved {csv_path} and {json_path}")
    failed = [path.path for path in result.paths if not path.passed]
    if failed:
        print(f"moe_lab: error: {', '.join(failed)} did not match the reference within tolerance", file=sys.stderr)
        return 1
    return 0


def add_trace_parser(subparsers) -> None:
    from .record import DEFAULT_TRACE_DIR, MODEL_DTYPES

    parser = subparsers.add_parser(
        "trace",
        help="run a real model on text and record every MoE layer's routing",
        description="Run a local DeepSeek-V2-family snapshot with transformers on a text file (each "
        "paragraph one sequence, tokenised with the snapshot's tokenizer) and record, for every MoE "
        "layer, each token's expert ids and weights in a trace file that compare --routing-file replays.",
    )
    parser.add_argument("--checkpoint", required=True, help="local Hugging Face snapshot folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--text-file", required=True, help="UTF-8 text; paragraphs (separated by blank lines) run as separate sequences")
    parser.add_argument("--hidden-layer", type=int, action="append", default=[],
                        help="also record this MoE layer's input hidden states, so a replay runs on real tokens (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=512, help="stop after this many tokens in all (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default: %(default)s)")
    parser.add_argument("--model-dtype", default="auto",
                        help=f"dtype to run the model in: {', '.join(MODEL_DTYPES)}; auto keeps the checkpoint's (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_TRACE_DIR, help="folder for the trace file (default: %(default)s)")
    parser.add_argument("--output", default=None, help="exact path of the trace file (overrides --out)")


def add_trace_stats_parser(subparsers) -> None:
    from .expert_load import BACKENDS

    parser = subparsers.add_parser(
        "trace-stats",
        help="print the expert load of a trace and the bytes each path would move for it",
        description="Expert-load statistics of a trace: pairs per expert per layer, the share of each "
        "token's experts on its own rank under each placement, and the bytes each path would send.",
    )
    parser.add_argument("trace", help="trace file written by `python -m moe_lab trace`")
    parser.add_argument("--world-size", type=int, default=2, help="ranks the tokens are split over (default: %(default)s)")
    parser.add_argument("--placements", type=parse_paths, default=PLACEMENTS, help=f"comma-separated placements (default: {','.join(PLACEMENTS)})")
    parser.add_argument("--backend", default="nccl", help=f"collective algorithms for byte counts: {', '.join(BACKENDS)} (default: %(default)s)")
    parser.add_argument("--dtype", default=None, help=f"token dtype for byte counts: {', '.join(DTYPES)} (default: the dtype the model ran in)")
    parser.add_argument("--figure", default=None, help="also save the figure as this PNG file")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON instead of tables")


def cmd_trace(args) -> int:
    from .record import default_trace_path, record_trace, text_file_info, tokenize_text
    from .trace import TraceError, save_trace

    text_path = Path(args.text_file)
    if not text_path.is_file():
        raise TraceError(f"text file {args.text_file!r} not found")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TraceError(f"text file {args.text_file!r} is not UTF-8: {err}") from None
    sequences = tokenize_text(args.checkpoint, text, args.max_tokens)
    trace = record_trace(
        args.checkpoint, sequences, hidden_layers=args.hidden_layer, device=args.device,
        model_dtype=args.model_dtype, text_info=text_file_info(text_path, text),
    )
    path = save_trace(trace, args.output or default_trace_path(trace, text_path, args.out))
    checkpoint = trace.metadata["checkpoint"]
    mismatched = sum(check["mismatched_tokens"] for check in trace.metadata["gate_check"].values())
    print(f"checkpoint {checkpoint['name']} revision {checkpoint['revision'] or 'unknown'}, model dtype {trace.metadata['model_dtype']}")
    print(f"{trace.n_tokens} tokens in {len(sequences)} sequences, routing of MoE layers {trace.moe_layers}, "
          f"hidden states of layers {sorted(trace.hidden_states) or 'none'}")
    print(f"moe_lab's gate on the recorded gate inputs picks the model's experts for "
          f"{trace.n_tokens * len(trace.moe_layers) - mismatched} of {trace.n_tokens * len(trace.moe_layers)} (token, layer) pairs")
    print(f"saved {path}")
    print(f"next: python -m moe_lab trace-stats {path}   or   python -m moe_lab compare --routing-file {path}")
    return 0


def cmd_trace_stats(args) -> int:
    from .expert_load import format_trace_stats, plot_trace_stats, trace_stats

    stats = trace_stats(args.trace, world_size=args.world_size, placements=args.placements, backend=args.backend, dtype=args.dtype)
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        print(format_trace_stats(stats))
    if args.figure:
        plot_trace_stats(stats, args.figure)
        print(f"saved {args.figure}", file=sys.stderr if args.json else sys.stdout)
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
    parser = argparse.ArgumentParser(
        prog="python -m moe_lab",
        description="Measure how a Mixture-of-Experts layer moves tokens between ranks under expert parallelism.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_compare_parser(subparsers)
    add_trace_parser(subparsers)
    add_trace_stats_parser(subparsers)
    add_env_parser(subparsers)
    for add_parser in ADD_PARSERS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        commands = {"compare": cmd_compare, "env": cmd_env, "trace": cmd_trace, "trace-stats": cmd_trace_stats, **COMMANDS}
        return commands[args.command](args)
    except InputError as err:
        print(f"moe_lab: error: {err}", file=sys.stderr)
        return 2
    except RankError as err:
        print(f"moe_lab: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moe_lab: interrupted; all ranks were stopped", file=sys.stderr)
        return 130
