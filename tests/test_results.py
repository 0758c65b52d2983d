"""Result files: atomic and non-overwriting writes, and reading back with clear errors."""

from __future__ import annotations

import json

import pytest

from moe_lab.results import (
    CSV_FIELDS,
    ResultsFileError,
    read_results_csv,
    read_results_json,
    rows_csv,
    write_atomic,
    write_new_atomic,
)


def sample_rows() -> list[dict]:
    row = {name: 0 for name in CSV_FIELDS}
    row.update(path="alltoall", backend="gloo", dtype="float32", tokens_per_rank="5 3", passed=True)
    return [row, {**row, "path": "allreduce", "total_ms": 1.5}]


def test_csv_round_trip(tmp_path):
    path = tmp_path / "run.csv"
    write_atomic(path, rows_csv(sample_rows()))
    rows = read_results_csv(path)
    assert [row["path"] for row in rows] == ["alltoall", "allreduce"]
    assert rows[1]["total_ms"] == "1.5"
    assert rows[0]["tokens_per_rank"] == "5 3"
    assert [p.name for p in tmp_path.iterdir()] == ["run.csv"]  # no temporary file left


def test_write_new_never_overwrites(tmp_path):
    path = tmp_path / "run.json"
    write_new_atomic(path, "first\n")
    with pytest.raises(FileExistsError):
        write_new_atomic(path, "second\n")
    assert path.read_text() == "first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def csv_text() -> str:
    return rows_csv(sample_rows())


@pytest.mark.parametrize("damage,detail", [
    (lambda text: text[:-7], "it is truncated: its last line has no line end"),
    (lambda text: "", "it is empty"),
    (lambda text: text.replace("path,", "route,", 1), "its header lacks the columns path"),
    (lambda text: text + "alltoall,2\r\n", "line 4 has 2 fields but the header has"),
    (lambda text: text + '"unterminated\r\n', "it is not valid CSV"),
])
def test_damaged_csv_reported(tmp_path, damage, detail):
    path = tmp_path / "run.csv"
    path.write_bytes(damage(csv_text()).encode())
    before = path.read_bytes()
    with pytest.raises(ResultsFileError) as info:
        read_results_csv(path)
    assert f"results file {str(path)!r} is unusable: {detail}" in str(info.value)
    assert "It was left unchanged: move it away or delete it" in str(info.value)
    assert path.read_bytes() == before


def test_csv_not_utf8(tmp_path):
    path = tmp_path / "run.csv"
    path.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(ResultsFileError, match="it is not UTF-8 text"):
        read_results_csv(path)


def test_missing_results_file(tmp_path):
    with pytest.raises(ResultsFileError, match="results file '.*nope.csv' not found"):
        read_results_csv(tmp_path / "nope.csv")


def test_json_round_trip(tmp_path):
    path = tmp_path / "run.json"
    write_atomic(path, json.dumps({"command": "compare", "repeats": 5}))
    assert read_results_json(path, keys=("command",))["repeats"] == 5


@pytest.mark.parametrize("text,keys,detail", [
    ('{"command": "compare", "rep', (), "it is not valid JSON"),
    ("[1, 2]", (), "it contains a JSON list, not an object"),
    ('{"command": "compare"}', ("command", "workload"), "it lacks the keys workload"),
])
def test_damaged_json_reported(tmp_path, text, keys, detail):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(ResultsFileError) as info:
        read_results_json(path, keys=keys)
    assert f"results file {str(path)!r} is unusable: {detail}" in str(info.value)
    assert path.read_text() == text
