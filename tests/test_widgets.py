"""The explorer's model side and its overlay of measured points, without a live kernel."""

from __future__ import annotations

import csv

import matplotlib

matplotlib.use("Agg")

from moe_lab.bytes_model import expected_sent_bytes
from moe_lab.notebook import sweep_crossovers
from moe_lab.widgets import VARIANTS, Settings, draw, measured_points, model_rows
from moe_lab.workload import build_workload


def test_model_rows_cover_variants():
    rows = model_rows(Settings(tokens=16, locality=0.5))
    assert [row["path"] for row in rows] == [variant.label for variant in VARIANTS]
    for row in rows:
        assert row["sent_bytes"] > 0
        assert row["predicted_comm_ms"] > 0
        assert row["predicted_compute_ms"] > 0


def test_model_rows_match_byte_model():
    settings = Settings(tokens=16, locality=0.5, link="rtx3090-pcie4-shm")
    workload = build_workload(settings.spec())
    allreduce = next(row for row in model_rows(settings) if row["path"] == "allreduce")
    expected = max(sum(rank.values()) for rank in expected_sent_bytes("allreduce", workload, "nccl"))
    assert allreduce["sent_bytes"] == expected


def test_full_locality_alltoall_sends_counts_only():
    rows = {row["path"]: row for row in model_rows(Settings(tokens=64, locality=1.0))}
    assert rows["alltoall"]["sent_bytes"] == 8  # one int64 count to the other rank
    assert rows["allreduce"]["sent_bytes"] == 2 * 64 * 2048 * 2  # 2 ranks: a ring sends the 128 bfloat16 rows once


def _write_sweep(path, rows):
    fields = ["world_size", "tokens", "routing", "locality", "top_k", "dtype", "path", "sent_total_bytes", "comm_ms", "collective_ms"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_measured_points_match_settings(tmp_path):
    base = {"world_size": "2", "tokens": "16", "routing": "local", "top_k": "6", "dtype": "bfloat16"}
    _write_sweep(tmp_path / "sweep.csv", [
        {**base, "locality": "0.5", "path": "alltoall", "sent_total_bytes": "1000", "comm_ms": "2.0"},
        {**base, "locality": "1", "path": "alltoall", "sent_total_bytes": "8", "comm_ms": "1.0"},
    ])
    points = measured_points(Settings(tokens=16, locality=0.5), tmp_path)
    assert list(points) == ["alltoall"]
    assert points["alltoall"]["sent_total_bytes"] == "1000"
    assert measured_points(Settings(tokens=64, locality=0.5), tmp_path) == {}


def test_draw_without_reference_data(tmp_path):
    figure = draw(Settings(tokens=4), tmp_path)
    assert len(figure.axes) == 2


def test_sweep_crossovers(tmp_path):
    rows = []
    for locality, alltoall_ms in (("0", "4.0"), ("0.5", "2.0"), ("1", "0.5")):
        for path, ms in (("alltoall", alltoall_ms), ("allreduce", "1.0")):
            rows.append({"world_size": "2", "tokens": "8", "routing": "local", "locality": locality, "top_k": "6",
                         "dtype": "float32", "path": path, "sent_total_bytes": "1", "comm_ms": "99", "collective_ms": ms})
    _write_sweep(tmp_path / "sweep.csv", rows)
    crossover = sweep_crossovers(tmp_path / "sweep.csv", "allreduce")[8]
    assert abs(crossover - (0.5 + 0.5 * 1.0 / 1.5)) < 1e-9
