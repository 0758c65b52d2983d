"""Text tables for the measurement commands: collectives, byte model against the OS, predictions, targets."""

from __future__ import annotations

import math

from .bench import OPS, SELF_COPY, TargetsResult, bus_factor, path_exchange_spread
from .bytes_model import path_transfers, per_rank_by_phase
from .compare import COMM_PHASES, CompareResult
from .costmodel import LINK_PRESETS, Link, measured_compute_rate, predict

TARGET_A2A_OVER_RAW = 1.25
TARGET_GROUPED_OVER_DENSE = 0.7
TARGET_LOCAL_TOKEN_SHARE = 0.01
TARGET_LOCAL_SPEEDUP = 5.0
TARGET_MODEL_ERROR = 0.25

PATH_WIDTH = 36  # room for variant labels such as allgather_reducescatter+fp8+overlap


def _bytes(value) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)) else f"{seconds * 1e3:.3f}"


def format_collectives(document: dict) -> str:
    """nccl-tests style: size, count, type, time, algbw, busbw, per collective, then the fits."""
    n, backend = document["world_size"], document["backend"]
    lines = [
        f"moe_lab collectives: {n} ranks on {backend}; time = median over iterations of the least time over ranks "
        f"({document['iters']} iterations up to 1 MiB, fewer above, after {document['warmup']} warm-up), each call right after a barrier",
        "size: bytes of the larger per-rank buffer (nccl-tests convention); busbw = algbw x bus factor; "
        "wire: largest bytes a rank sends or receives (model); OS: largest bytes a rank wrote to its sockets",
    ]
    for op in OPS + (SELF_COPY,):
        points = [point for point in document["points"] if point["op"] == op]
        if not points:
            continue
        lines += [
            "",
            f"# {op}  (bus factor {bus_factor(op, n):.3g})" if op != SELF_COPY else
            f"# {op}: all_to_all_single with every row to the rank itself (a local copy, nothing on the wire)",
            f"{'size (B)':>12}{'count':>11}{'type':>8}{'time (us)':>11}{'p10':>10}{'p90':>10}{'algbw GB/s':>12}{'busbw GB/s':>12}{'wire (B)':>12}{'OS (B)':>12}",
        ]
        for point in points:
            os_bytes = "n/a" if point["os_sent_bytes"] is None else str(point["os_sent_bytes"])
            lines.append(
                f"{point['size']:>12}{point['count']:>11}{'float':>8}{point['time_s'] * 1e6:>11.1f}{point['p10_s'] * 1e6:>10.1f}"
                f"{point['p90_s'] * 1e6:>10.1f}{point['algbw'] / 1e9:>12.3f}{point['busbw'] / 1e9:>12.3f}{point['wire_bytes']:>12}{os_bytes:>12}"
            )
    lines += ["", "alpha-beta fits, t = alpha + beta * wire bytes (weighted so every size counts alike):",
              f"{'collective':<20}{'alpha (us)':>12}{'1/beta (GB/s)':>15}{'worst error':>13}"]
    for op, fit in document["fits"].items():
        bandwidth = 1 / fit["beta"] / 1e9 if fit["beta"] > 0 else math.inf
        lines.append(f"{op:<20}{fit['alpha'] * 1e6:>12.1f}{bandwidth:>15.3f}{fit['max_relative_error']:>12.0%}")
    if document.get("local_copy"):
        fit = document["local_copy"]
        bandwidth = 1 / fit["beta"] / 1e9 if fit["beta"] > 0 else math.inf
        lines.append(f"{'local copy':<20}{fit['alpha'] * 1e6:>12.1f}{bandwidth:>15.3f}{fit['max_relative_error']:>12.0%}"
                     f"   (bytes a rank copies to itself; added to calls that keep rows local)")
    if document.get("compute"):
        shape = document["compute_shape"]
        lines += ["", f"grouped expert forward, {shape['preset']} expert shape, {shape['dtype']}, {shape['experts']} experts, "
                      f"all ranks at once (mean over ranks):",
                  f"{'rows/expert':>12}{'grouped GFLOP/s':>17}{'dense GFLOP/s':>15}{'ratio':>8}"]
        for entry in document["compute"]:
            lines.append(f"{entry['rows_per_expert']:>12}{entry['flops_per_s'] / 1e9:>17.2f}{entry['dense_flops_per_s'] / 1e9:>15.2f}"
                         f"{entry['flops_per_s'] / entry['dense_flops_per_s']:>8.2f}")
    return "\n".join(lines)


def format_model_bytes(result: CompareResult) -> str:
    """Per path and rank: the byte model's payload, sent and received bytes, against the counted and OS-measured ones."""
    n = result.workload.world_size
    lines = [
        "byte model per rank (all phases): payload handed to collectives, wire bytes sent and received by the model, "
        "sent as counted by the communicator, and written to sockets as the OS measured (gloo only; the OS cannot "
        "count gloo's received bytes)",
        f"{'path':<{PATH_WIDTH}}{'rank':>5}{'payload':>12}{'model sent':>12}{'model recv':>12}{'counted':>12}{'OS sent':>12}{'OS - model':>12}",
    ]
    for path in result.paths:
        try:
            transfers = path_transfers(path.base_path, result.workload, result.backend, path.options)
        except KeyError:
            lines.append(f"{path.path:<{PATH_WIDTH}} (no byte model for this path)")
            continue
        payload = per_rank_by_phase(transfers, n, "payload")
        sent = per_rank_by_phase(transfers, n, "sent")
        received = per_rank_by_phase(transfers, n, "received")
        for rank in range(n):
            counted = sum(path.bytes_by_phase(rank, "sent_bytes").values())
            os_phases = path.bytes_by_phase(rank, "os_sent_bytes").values()
            os_sent = None if any(value is None for value in os_phases) else sum(os_phases)
            model_sent = sum(sent[rank].values())
            lines.append(
                f"{path.path if rank == 0 else '':<{PATH_WIDTH}}{rank:>5}{_bytes(sum(payload[rank].values())):>12}{_bytes(model_sent):>12}"
                f"{_bytes(sum(received[rank].values())):>12}{_bytes(counted):>12}{_bytes(os_sent):>12}"
                f"{'n/a' if os_sent is None else _bytes(os_sent - model_sent):>12}"
            )
    return "\n".join(lines)


def format_spread_table(result: CompareResult) -> str:
    """Median, p10 and p90 per phase and total, and the compute FLOP rate."""
    repeats = result.options.repeats
    lines = [
        f"times in ms, median [p10, p90] over {repeats} repeats of the slowest rank; collectives = time inside the "
        f"collective calls (each call timed by the last rank to arrive); GFLOP/s = expert FLOPs of all ranks over "
        f"their median compute times",
        f"{'path':<{PATH_WIDTH}}" + "".join(f"{phase:>22}" for phase in ("metadata", "dispatch", "compute", "combine", "total", "collectives"))
        + f"{'GFLOP/s':>10}",
    ]
    for path in result.paths:
        cells = []
        for phase in ("metadata", "dispatch", "compute", "combine"):
            stats = path.phase_spread(phase)
            cells.append(f"{stats.median * 1e3:.2f} [{stats.p10 * 1e3:.2f},{stats.p90 * 1e3:.2f}]")
        total = path.total_spread()
        cells.append(f"{total.median * 1e3:.2f} [{total.p10 * 1e3:.2f},{total.p90 * 1e3:.2f}]")
        collective = path.collective_spread()
        cells.append("n/a" if collective is None else f"{collective.median * 1e3:.2f} [{collective.p10 * 1e3:.2f},{collective.p90 * 1e3:.2f}]")
        rate = measured_compute_rate(path, result.workload)
        lines.append(f"{path.path:<{PATH_WIDTH}}" + "".join(f"{cell:>22}" for cell in cells) + f"{rate / 1e9:>10.2f}")
    return "\n".join(lines)


def prediction_rows(result: CompareResult, link: Link) -> list[dict]:
    rows = []
    for path in result.paths:
        try:
            prediction = predict(path.base_path, result.workload, link, path.options)
        except KeyError:
            continue
        collective = path.collective_spread()
        measured = None if collective is None else collective.median
        rows.append({
            "path": path.path,
            "predicted_comm_s": prediction.comm_seconds,
            "measured_comm_s": measured,
            "measured_comm_p10_s": None if collective is None else collective.p10,
            "comm_ratio": None if not measured else prediction.comm_seconds / measured,
            "measured_phases_s": path.comm_spread().median,
            "predicted_compute_s": prediction.compute_seconds,
            "measured_compute_s": path.phase_spread("compute").median,
        })
    return rows


def format_predictions(result: CompareResult, link: Link) -> str:
    kind = "estimate" if link.estimate else "calibrated"
    lines = [
        f"cost model ({link.name}, {kind}: {link.description}) against this run; ms",
        "comm: all collective calls (measured: time inside them, each timed by the last rank to arrive, median and p10 "
        "over repeats); phases: metadata + dispatch + combine of the slowest rank, local work included",
        f"{'path':<{PATH_WIDTH}}{'predicted comm':>16}{'measured comm':>15}{'p10':>9}{'ratio':>8}{'phases':>10}{'predicted compute':>19}{'measured compute':>18}",
    ]
    for row in prediction_rows(result, link):
        ratio = "n/a" if row["comm_ratio"] is None else f"{row['comm_ratio']:.2f}"
        lines.append(
            f"{row['path']:<{PATH_WIDTH}}{_ms(row['predicted_comm_s']):>16}{_ms(row['measured_comm_s']):>15}{_ms(row['measured_comm_p10_s']):>9}{ratio:>8}"
            f"{_ms(row['measured_phases_s']):>10}{_ms(row['predicted_compute_s']):>19}{_ms(row['measured_compute_s']):>18}"
        )
    return "\n".join(lines)


def target_rows(targets: TargetsResult) -> list[dict]:
    """Compute each target: what was measured, the ratio, the bound, and whether it is met."""
    rows = []

    ratio = targets.alltoall_exchange.median / targets.raw_alltoall.median
    rows.append({
        "target": "alltoall dispatch+combine / raw all_to_all_single, same splits",
        "measured": f"{targets.alltoall_exchange.median * 1e3:.2f} ms / {targets.raw_alltoall.median * 1e3:.2f} ms",
        "ratio": ratio, "bound": f"<= {TARGET_A2A_OVER_RAW}", "met": ratio <= TARGET_A2A_OVER_RAW,
    })

    grouped = sum(rank["grouped_flops_per_s"] for rank in targets.compute) / len(targets.compute)
    dense = sum(rank["dense_flops_per_s"] for rank in targets.compute) / len(targets.compute)
    rows.append({
        "target": "grouped expert FLOP rate / dense matmul of equal FLOPs",
        "measured": f"{grouped / 1e9:.1f} / {dense / 1e9:.1f} GFLOP/s per rank",
        "ratio": grouped / dense, "bound": f">= {TARGET_GROUPED_OVER_DENSE}", "met": grouped / dense >= TARGET_GROUPED_OVER_DENSE,
    })

    paths = {path.path: path for path in targets.local.paths}
    token_bytes = {name: max(sum(r["sent_bytes"] for r in records if r["what"] == "tokens") for records in path.records)
                   for name, path in paths.items()}
    share = token_bytes["alltoall"] / token_bytes["allreduce"] if token_bytes["allreduce"] else math.nan
    rows.append({
        "target": "local-only routing: alltoall token bytes / allreduce token bytes",
        "measured": f"{_bytes(token_bytes['alltoall'])} / {_bytes(token_bytes['allreduce'])} per rank",
        "ratio": share, "bound": f"<= {TARGET_LOCAL_TOKEN_SHARE}", "met": share <= TARGET_LOCAL_TOKEN_SHARE,
    })
    # The minimum over ranks per repeat is the exchange's own time, without waiting on another rank's experts.
    allreduce_comm = path_exchange_spread(paths["allreduce"]).median
    alltoall_comm = path_exchange_spread(paths["alltoall"]).median
    speedup = allreduce_comm / alltoall_comm
    rows.append({
        "target": "local-only routing: allreduce exchange / alltoall exchange",
        "measured": f"{allreduce_comm * 1e3:.2f} ms / {alltoall_comm * 1e3:.2f} ms",
        "ratio": speedup, "bound": f">= {TARGET_LOCAL_SPEEDUP}", "met": speedup >= TARGET_LOCAL_SPEEDUP,
    })

    for label, result in (("gate", targets.gate), ("local p=1", targets.local)):
        for row in prediction_rows(result, targets.link):
            if row["comm_ratio"] is None:
                continue
            rows.append({
                "target": f"cost model / measured comm, {row['path']}, {label} routing",
                "measured": f"{_ms(row['predicted_comm_s'])} ms / {_ms(row['measured_comm_s'])} ms",
                "ratio": row["comm_ratio"], "bound": f"{1 - TARGET_MODEL_ERROR:.2f}..{1 + TARGET_MODEL_ERROR:.2f}",
                "met": abs(row["comm_ratio"] - 1) <= TARGET_MODEL_ERROR,
            })
    return rows


def format_outlook(targets: TargetsResult, link: Link) -> str:
    """Predict the two communication targets for another link, from the same workloads' byte model."""
    gate, local = targets.gate.workload, targets.local.workload
    alltoall_calls = path_transfers("alltoall", gate, link.backend)
    raw = sum(link.collective_seconds(call) for call in alltoall_calls if call.what == "tokens")
    exchange = sum(link.collective_seconds(call) for call in alltoall_calls)
    allreduce_local = predict("allreduce", local, link).comm_seconds
    alltoall_local = predict("alltoall", local, link).comm_seconds
    return "\n".join([
        f"the same workloads on {link.name} ({link.description}; an estimate, collectives only, local "
        f"permutations left out):",
        f"  alltoall exchange / raw all_to_all_single: {exchange * 1e3:.3f} / {raw * 1e3:.3f} ms = {exchange / raw:.2f}",
        f"  local-only routing, allreduce / alltoall comm: {allreduce_local * 1e3:.3f} / {alltoall_local * 1e3:.3f} ms "
        f"= {allreduce_local / alltoall_local:.1f}",
    ])


def format_targets(targets: TargetsResult) -> str:
    options = targets.options
    gate = targets.gate
    cfg = gate.workload.cfg
    lines = [
        f"moe_lab targets: {cfg.name}, {options.world_size} ranks on {targets.backend}, {options.dtype}, "
        f"{options.tokens} tokens per rank, gate routing and local-only routing (p=1), one launch, "
        f"{targets.wall_seconds:.0f} s",
        f"every time is the median over {options.repeats} repeats after {options.warmup} warm-up; "
        f"exchange (metadata + dispatch + combine) and raw all-to-all: per repeat the least over ranks, so waiting on "
        f"another rank's experts is left out; collectives: each call timed by the last rank to arrive",
        "",
        f"{'target':<66}{'measured':>34}{'ratio':>9}{'bound':>12}  result",
    ]
    for row in target_rows(targets):
        lines.append(f"{row['target']:<66}{row['measured']:>34}{row['ratio']:>9.3f}{row['bound']:>12}  {'met' if row['met'] else 'MISSED'}")
    lines += ["", format_predictions(targets.gate, targets.link), "", format_spread_table(targets.gate)]
    lines += ["", format_outlook(targets, LINK_PRESETS["rtx3090-pcie4-shm"])]
    return "\n".join(lines)
