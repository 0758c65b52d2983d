"""The measuring layer: byte model against recorded and OS bytes, fits, cost model, sweep, figures, targets."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lab.bench import CalibrationOptions, TargetsOptions, bus_factor, run_targets
from moe_lab.bytes_model import expected_payload_bytes, expected_received_bytes, expected_sent_bytes, path_transfers, traffic_matrix
from moe_lab.cli import main
from moe_lab.costmodel import LINK_PRESETS, AlphaBeta, CalibrationError, crossing, fit_alpha_beta, predict, predicted_crossover, resolve_link
from moe_lab.figures import make_figures
from moe_lab.paths import PATHS
from moe_lab.report import format_targets, target_rows
from moe_lab.stats import spread
from moe_lab.workload import WorkloadSpec, build_workload

from conftest import MATRIX

PAIRS = [(label, path) for label in MATRIX for path in PATHS]


def _by_phase(records: list[dict], key: str) -> dict[str, int]:
    totals = {"metadata": 0, "dispatch": 0, "combine": 0}
    for record in records:
        totals[record["phase"]] += record[key]
    return totals


@pytest.mark.parametrize("label,path", PAIRS)
def test_model_received_and_payload(matrix_results, label, path):
    result = matrix_results[label]
    path_result = next(p for p in result.paths if p.path == path)
    received = expected_received_bytes(path, result.workload, result.backend)
    payload = expected_payload_bytes(path, result.workload, result.backend)
    for rank, records in enumerate(path_result.records):
        assert _by_phase(records, "recv_bytes") == received[rank], f"rank {rank} received"
        assert _by_phase(records, "payload_bytes") == payload[rank], f"rank {rank} payload"


@pytest.mark.parametrize("label,path", PAIRS)
def test_traffic_matrix_matches_records(matrix_results, label, path):
    result = matrix_results[label]
    path_result = next(p for p in result.paths if p.path == path)
    n = result.workload.world_size
    counted = [[0] * n for _ in range(n)]
    for src, records in enumerate(path_result.records):
        for record in records:
            assert sum(record["sent_to"]) == record["sent_bytes"]
            for dst, value in enumerate(record["sent_to"]):
                counted[src][dst] += value
    assert counted == traffic_matrix(path_transfers(path, result.workload, result.backend), n)


@pytest.mark.parametrize("label", list(MATRIX))
def test_os_bytes_against_model(matrix_results, label):
    """gloo writes the modelled bytes plus a header of at most 576 bytes per peer and call."""
    result = matrix_results[label]
    n = result.workload.world_size
    for path_result in result.paths:
        model = expected_sent_bytes(path_result.path, result.workload, result.backend)
        for rank, records in enumerate(path_result.records):
            extra = sum(r["os_sent_bytes"] for r in records) - sum(model[rank].values())
            assert 0 <= extra <= 576 * max(n - 1, 1) * len(records), (path_result.path, rank)


def test_spread_percentiles():
    stats = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median, stats.n) == (3.0, 5)
    assert math.isclose(stats.p10, 1.4)
    assert math.isclose(stats.p90, 4.6)


def test_timing_spread_per_path(matrix_results):
    path_result = matrix_results["2r-gate-contiguous"].paths[0]
    stats = path_result.total_spread()
    assert stats.n == 1
    assert stats.p10 == stats.median == stats.p90
    assert path_result.collective_spread().median > 0


def test_fit_recovers_alpha_beta():
    sizes = [8 * 4**i for i in range(10)]
    fit = fit_alpha_beta(sizes, [50e-6 + size / 2e9 for size in sizes])
    assert math.isclose(fit.alpha, 50e-6, rel_tol=1e-6)
    assert math.isclose(fit.bandwidth, 2e9, rel_tol=1e-6)
    assert fit.max_relative_error < 1e-9


def test_fit_clamps_negative_alpha():
    fit = fit_alpha_beta([1000, 2000, 4000], [0.9e-6, 2.0e-6, 4.1e-6])
    assert fit.alpha >= 0
    assert fit.beta > 0


def test_bus_factors():
    assert bus_factor("all_reduce", 4) == 1.5
    assert bus_factor("all_gather", 4) == bus_factor("reduce_scatter", 4) == bus_factor("all_to_all_single", 4) == 0.75
    assert bus_factor("broadcast", 4) == 1.0


def test_presets_labelled_estimates():
    for link in LINK_PRESETS.values():
        assert link.estimate
        assert link.source and "github.com" in link.source
    assert "RTX 3090" in LINK_PRESETS["rtx3090-pcie4-shm"].description


def test_unknown_link_rejected(tmp_path):
    with pytest.raises(CalibrationError, match="unknown link 'fast'"):
        resolve_link("fast")
    with pytest.raises(CalibrationError, match="run `python -m moe_lab collectives`"):
        resolve_link("this-machine", data_dir=tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"fits": ')
    with pytest.raises(CalibrationError, match="corrupt or truncated"):
        resolve_link(str(broken))


def test_crossing_interpolates():
    assert crossing([0.0, 0.5, 1.0], [4.0, 2.0, 0.0], [1.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert crossing([0.0, 1.0], [2.0, 2.0], [1.0, 1.0]) is None


def test_predicted_crossover_on_preset():
    link = LINK_PRESETS["rtx3090-pcie4-shm"]
    spec = WorkloadSpec(preset="deepseek-v2-lite", tokens=64)
    point, curve = predicted_crossover(spec, link, "allreduce", steps=7)
    assert curve[-1]["alltoall"] < curve[-1]["allreduce"]  # local-only routing: almost nothing to send
    assert point is not None and 0.5 < point < 1.0


def test_local_rows_priced_as_copies():
    workload = build_workload(WorkloadSpec(preset="tiny", tokens=8, routing="local", locality=1.0))
    dispatch = [call for call in path_transfers("alltoall", workload, "gloo") if call.what == "tokens"][0]
    assert dispatch.max_wire_bytes() == 0
    assert dispatch.max_local_bytes() == 8 * 2 * 32 * 4  # every (token, expert) row of one rank, float32
    link = LINK_PRESETS["rtx3090-pcie4-shm"]
    assert link.collective_seconds(dispatch) > link.collectives["all_to_all_single"].alpha


def test_prediction_sums_calls():
    link = LINK_PRESETS["rtx3090-pcie4-shm"]
    workload = build_workload(WorkloadSpec(preset="tiny", tokens=8, routing="uniform"))
    prediction = predict("alltoall", workload, link)
    calls = path_transfers("alltoall", workload, "nccl")
    assert prediction.comm_seconds == pytest.approx(sum(link.collective_seconds(call) for call in calls))
    assert len(calls) == 4
    assert prediction.compute_seconds > 0


# -- commands, run as a user runs them ------------------------------------------------------


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lab", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lab_data(tmp_path_factory):
    """A small data folder as the reference one is made: sweep, calibration and one compare --json."""
    folder = tmp_path_factory.mktemp("data")
    sweep = run_cli("sweep", "--preset", "tiny", "--tokens", "2,8", "--locality", "0,0.5,1", "--repeats", "2",
                    "--points-per-launch", "3", "--out", str(folder))
    assert sweep.returncode == 0, sweep.stderr
    layer = run_cli("compare", "--preset", "tiny", "--tokens", "4,6", "--json", "--repeats", "1", "--out", str(folder / "runs"))
    assert layer.returncode == 0, layer.stderr
    (folder / "layer-gate-2r.json").write_text(layer.stdout)
    return folder, sweep


def test_sweep_writes_rows(lab_data):
    folder, sweep = lab_data
    assert "6/6" in sweep.stderr  # the progress bar
    lines = (folder / "sweep.csv").read_text().splitlines()
    assert len(lines) == 1 + 6 * len(PATHS)
    metadata = json.loads((folder / "sweep.json").read_text())
    assert metadata["grids"][0]["points"] == 6
    assert metadata["environment"]["torch"]
    assert (folder / "collectives-gloo-2r.json").exists()
    assert (folder / "collectives-gloo-2r.csv").exists()


def test_sweep_resumes_without_rerunning(lab_data, tmp_path):
    folder, _ = lab_data
    before = (folder / "sweep.csv").read_bytes()
    again = run_cli("sweep", "--preset", "tiny", "--tokens", "2,8", "--locality", "0,0.5,1", "--repeats", "2", "--out", str(folder))
    assert again.returncode == 0, again.stderr
    assert (folder / "sweep.csv").read_bytes() == before


def test_sweep_rejects_truncated_csv(lab_data, tmp_path):
    folder, _ = lab_data
    broken = tmp_path / "broken"
    broken.mkdir()
    text = (folder / "sweep.csv").read_text()
    (broken / "sweep.csv").write_text(text[: len(text) // 2])
    completed = run_cli("sweep", "--preset", "tiny", "--tokens", "2", "--locality", "1", "--out", str(broken))
    assert completed.returncode == 2
    assert str(broken / "sweep.csv") in completed.stderr
    assert (broken / "sweep.csv").read_text() == text[: len(text) // 2]


def test_sweep_rejects_other_settings(lab_data):
    folder, _ = lab_data
    completed = run_cli("sweep", "--preset", "tiny", "--tokens", "2", "--repeats", "4", "--out", str(folder))
    assert completed.returncode == 2
    assert "repeats=2 there but 4 now" in completed.stderr


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_figures_byte_identical(lab_data, tmp_path, fmt):
    folder, _ = lab_data
    first, notes = make_figures(folder, tmp_path / "a", fmt)
    make_figures(folder, tmp_path / "b", fmt)
    names = {path.name for path in first}
    for expected in ("bytes_vs_locality", "phases_vs_tokens", "crossover", "predicted_vs_measured",
                     "busbw_vs_size_gloo-2r", "traffic_matrix_gate-2r", "timeline_gate-2r"):
        assert f"{expected}.{fmt}" in names
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert any(note.startswith("crossover alltoall vs allreduce") for note in notes)


def test_figures_missing_folder(tmp_path, capsys):
    assert main(["figures", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err


def test_collectives_command(tmp_path):
    completed = run_cli("collectives", "--preset", "tiny", "--max-bytes", "4K", "--iters", "3", "--out", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    for column in ("size (B)", "algbw GB/s", "busbw GB/s", "alpha (us)", "grouped GFLOP/s"):
        assert column in completed.stdout
    document = json.loads((tmp_path / "collectives-gloo-2r.json").read_text())
    assert set(document["fits"]) == {"all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all_single"}
    for point in document["points"]:
        assert point["busbw"] == pytest.approx(point["algbw"] * bus_factor(point["op"], 2))
        assert point["os_sent_bytes"] >= point["wire_bytes"]
    own = [point for point in document["points"] if point["op"] == "all_to_all_self"]
    assert own and all(point["wire_bytes"] == 0 for point in own)
    assert document["local_copy"]["beta"] >= 0


def test_collectives_bad_op(capsys, tmp_path):
    assert main(["collectives", "--ops", "all_reduce,gossip", "--out", str(tmp_path)]) == 2
    assert "unknown collective 'gossip'" in capsys.readouterr().err


def test_targets_rows():
    options = TargetsOptions(
        preset="tiny", tokens=8, repeats=2,
        calibration=CalibrationOptions(sizes=(8, 512, 8192), iters=3, preset="tiny", rows_per_expert=(1, 8)),
    )
    targets = run_targets(options)
    rows = {row["target"]: row for row in target_rows(targets)}
    assert rows["local-only routing: alltoall token bytes / allreduce token bytes"]["ratio"] == 0.0
    assert any(name.startswith("cost model / measured comm, alltoall") for name in rows)
    assert all(path.passed for path in targets.gate.paths + targets.local.paths)
    text = format_targets(targets)
    assert "MISSED" in text or "met" in text
    assert "rtx3090-pcie4-shm" in text
