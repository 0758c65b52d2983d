"""Command-line subcommands for measuring: `collectives`, `targets`, `sweep` and `figures`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .bench import OPS, CalibrationOptions, TargetsOptions, run_calibration, run_targets
from .config import PRESETS
from .costmodel import DEFAULT_DATA_DIR, LINK_PRESETS, calibration_path, resolve_link
from .errors import InputError
from .launch import BACKENDS
from .paths import PATHS
from .results import environment, write_atomic
from .sweep import calibration_csv
from .workload import DTYPES


def parse_size(text: str) -> int:
    """Bytes from '8', '64K', '32M' or '1G' (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text and text[-1].upper() in units:
            return int(float(text[:-1]) * units[text[-1].upper()])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: give bytes like 8, 64K or 32M") from None


def comma_list(kind):
    def parse(text: str):
        try:
            return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid list {text!r}: give comma-separated values like 1,16,128") from None
    return parse


def sizes_between(low: int, high: int, factor: int) -> tuple[int, ...]:
    if low < 1 or high < low or factor < 2:
        raise InputError(f"message sizes need 1 <= --min-bytes <= --max-bytes and --factor >= 2, got {low}, {high}, {factor}")
    sizes, size = [], low
    while size <= high:
        sizes.append(size)
        size *= factor
    return tuple(sizes)


# -- collectives ---------------------------------------------------------------------------


def add_collectives_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "collectives",
        help="time the raw collectives over message sizes and fit the cost model",
        description="Time all_reduce, broadcast, all_gather, reduce_scatter and all_to_all_single over message "
        "sizes, print size, time, algbw and busbw as nccl-tests does, fit t = alpha + beta * bytes per collective, "
        "measure the grouped expert FLOP rate, and save everything as the calibration of this machine.",
    )
    parser.add_argument("--world-size", type=int, default=2, help="number of ranks (default: %(default)s)")
    parser.add_argument("--backend", default="auto", help=f"{', '.join(BACKENDS)} (default: %(default)s)")
    parser.add_argument("--ops", type=comma_list(str), default=OPS, help=f"comma-separated collectives (default: {','.join(OPS)})")
    parser.add_argument("--min-bytes", type=parse_size, default=8, help="smallest message (default: %(default)s)")
    parser.add_argument("--max-bytes", type=parse_size, default=32 << 20, help="largest message, e.g. 32M (default: 32M)")
    parser.add_argument("--factor", type=int, default=4, help="size step factor (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per size up to 1 MiB, fewer above (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per size (default: %(default)s)")
    parser.add_argument("--preset", default="deepseek-v2-lite",
                        help=f"expert shape for the compute rate table: {', '.join(PRESETS)} or a config.json; 'none' skips it (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help=f"dtype for the compute rate table: {', '.join(DTYPES)} (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout in seconds (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_DATA_DIR), help="folder for collectives-<backend>-<n>r.json and .csv (default: %(default)s)")


def cmd_collectives(args) -> int:
    options = CalibrationOptions(
        world_size=args.world_size, backend=args.backend, ops=args.ops,
        sizes=sizes_between(args.min_bytes, args.max_bytes, args.factor), iters=args.iters, warmup=args.warmup,
        preset=None if args.preset == "none" else args.preset, dtype=args.dtype, timeout_s=args.timeout,
    )
    document = run_calibration(options)
    document["metadata"] = {"command": "collectives", "argv": sys.argv[1:], "environment": environment(document["backend"])}
    json_path = calibration_path(document["backend"], document["world_size"], Path(args.out))
    csv_path = json_path.with_suffix(".csv")
    write_atomic(json_path, json.dumps(document, indent=1) + "\n")
    write_atomic(csv_path, calibration_csv(document))

    from .report import format_collectives

    print(format_collectives(document))
    print(f"saved {json_path} and {csv_path}; use them with --link this-machine")
    return 0


# -- targets -------------------------------------------------------------------------------


def add_targets_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "targets",
        help="measure the kit's performance targets as ratios in one run",
        description="In one launch of ranks: calibrate the cost model, run every path on gate routing and the "
        "naive all-reduce and all-to-all on local-only routing, time raw all_to_all_single with the all-to-all "
        "path's splits and the grouped expert forward against a dense matmul, and print each target's ratio.",
    )
    parser.add_argument("--preset", default="deepseek-v2-lite", help=f"MoE shape: {', '.join(PRESETS)} or a config.json (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank (default: %(default)s)")
    parser.add_argument("--world-size", type=int, default=2, help="number of ranks (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help=f"{', '.join(DTYPES)} (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the repeats (default: %(default)s)")
    parser.add_argument("--backend", default="auto", help=f"{', '.join(BACKENDS)} (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=180.0, help="collective timeout in seconds (default: %(default)s)")
    parser.add_argument("--out", default=None, help="also write the ratios and settings to this JSON file")


def cmd_targets(args) -> int:
    from .report import format_targets, target_rows

    options = TargetsOptions(
        preset=args.preset, tokens=args.tokens, world_size=args.world_size, dtype=args.dtype, repeats=args.repeats,
        warmup=args.warmup, backend=args.backend, timeout_s=args.timeout,
        calibration=CalibrationOptions(world_size=args.world_size, backend=args.backend, preset=args.preset, dtype=args.dtype),
    )
    if options.repeats < 1 or options.warmup < 0:
        raise InputError(f"repeats must be >= 1 and warmup >= 0, got {options.repeats} and {options.warmup}")
    targets = run_targets(options)
    print(format_targets(targets))
    if args.out:
        document = {
            "command": "targets", "argv": sys.argv[1:], "environment": environment(targets.backend),
            "options": {key: value for key, value in vars(options).items() if key != "calibration"},
            "wall_seconds": targets.wall_seconds, "targets": target_rows(targets),
        }
        write_atomic(Path(args.out), json.dumps(document, indent=1, default=str) + "\n")
        print(f"saved {args.out}")
    return 0


# -- sweep ---------------------------------------------------------------------------------


def add_sweep_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run compare over a grid of workloads into a resumable CSV",
        description="Run every path over a grid of tokens per rank, locality, top-k, world size and dtype. Each "
        "finished point is added to <out>/sweep.csv with <out>/sweep.json as metadata; rerunning with the same "
        "--out skips the finished points.",
    )
    parser.add_argument("--preset", default="deepseek-v2-lite", help=f"MoE shape: {', '.join(PRESETS)} or a config.json (default: %(default)s)")
    parser.add_argument("--tokens", type=comma_list(int), default=(1, 16, 128, 512), help="tokens per rank (default: 1,16,128,512)")
    parser.add_argument("--locality", type=comma_list(float), default=(0.0, 0.5, 2 / 3, 5 / 6, 1.0),
                        help="shares of each token's experts on its own rank (default: 0,0.5,0.667,0.833,1)")
    parser.add_argument("--top-k", type=comma_list(int), default=(None,), help="experts per token (default: the preset's)")
    parser.add_argument("--world-size", type=comma_list(int), default=(2,), help="numbers of ranks (default: 2)")
    parser.add_argument("--dtype", type=comma_list(str), default=("float32",), help=f"dtypes among {', '.join(DTYPES)} (default: float32)")
    parser.add_argument("--placement", default="contiguous", help="expert placement (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--paths", type=comma_list(str), default=tuple(PATHS), help=f"paths (default: {','.join(PATHS)})")
    parser.add_argument("--dispatch-dtype", type=comma_list(str), default=(),
                        help="also run each path that dispatches tokens with tokens sent as bfloat16 or fp8 (comma-separated)")
    parser.add_argument("--overlap", action="store_true",
                        help="also run each path that dispatches tokens with communication overlapped with compute")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per path and point (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per path and point (default: %(default)s)")
    parser.add_argument("--backend", default="auto", help=f"{', '.join(BACKENDS)} (default: %(default)s)")
    parser.add_argument("--link", default="this-machine",
                        help=f"cost model for the predicted columns: this-machine (calibrated into --out if missing), "
                        f"a calibration .json, none, or a preset: {', '.join(LINK_PRESETS)} (default: %(default)s)")
    parser.add_argument("--points-per-launch", type=int, default=1,
                        help="points measured per launch of ranks: more saves start-up time, fewer loses less to an interrupt (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout in seconds (default: %(default)s)")
    parser.add_argument("--out", default="data/sweep", help="folder for sweep.csv and sweep.json (default: %(default)s)")


def cmd_sweep(args) -> int:
    from tqdm import tqdm

    from .sweep import SweepGrid, SweepOptions, run_sweep

    grid = SweepGrid(preset=args.preset, tokens=args.tokens, localities=args.locality, top_ks=args.top_k,
                     world_sizes=args.world_size, dtypes=args.dtype, placement=args.placement, seed=args.seed)
    options = SweepOptions(grid=grid, out=args.out, paths=args.paths, repeats=args.repeats, warmup=args.warmup,
                           dispatch_dtypes=args.dispatch_dtype, overlap=args.overlap,
                           backend=args.backend, link=args.link, points_per_launch=args.points_per_launch, timeout_s=args.timeout)
    if args.link not in ("this-machine", "none"):
        resolve_link(args.link)  # reject an unknown link before anything runs
    total = len(grid.specs())
    with tqdm(total=total, unit="point", desc="sweep", file=sys.stderr) as bar:
        csv_path = run_sweep(options, progress=bar.update)
    print(f"{total} points in {csv_path} (metadata in {csv_path.with_suffix('.json')})")
    return 0


# -- figures -------------------------------------------------------------------------------


def add_figures_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "figures",
        help="draw every figure from the CSVs in a data folder",
        description="Regenerate every figure from the results in --data (sweep.csv, collectives-*.csv and "
        "layer-*.json); the same data always gives byte-identical files.",
    )
    parser.add_argument("--data", default="data/reference", help="folder with sweep.csv and collectives-*.csv (default: %(default)s)")
    parser.add_argument("--out", default="figures", help="folder for the figures (default: %(default)s)")
    parser.add_argument("--format", choices=("png", "svg"), default="png", help="file format (default: %(default)s)")


def cmd_figures(args) -> int:
    from .figures import make_figures

    written, notes = make_figures(Path(args.data), Path(args.out), args.format)
    for path in written:
        print(f"wrote {path}")
    for note in notes:
        print(note)
    return 0


def add_link_option(parser) -> None:
    """--link for `compare`: print the cost model's prediction beside the measurement."""
    parser.add_argument("--link", default=None,
                        help=f"also print the cost model's prediction: this-machine (needs `collectives` first), "
                        f"a calibration .json, or a preset: {', '.join(LINK_PRESETS)}")


def print_compare_extras(result, args) -> None:
    """Print the byte model against the OS, the p10/p90 table and, with --link, predicted against measured."""
    from .report import format_model_bytes, format_predictions, format_spread_table

    print()
    print(format_model_bytes(result))
    print()
    print(format_spread_table(result))
    if getattr(args, "link", None):
        link = resolve_link(args.link, result.backend, result.workload.world_size)
        print()
        print(format_predictions(result, link))


ADD_PARSERS = (add_collectives_parser, add_targets_parser, add_sweep_parser, add_figures_parser)
COMMANDS = {"collectives": cmd_collectives, "targets": cmd_targets, "sweep": cmd_sweep, "figures": cmd_figures}
