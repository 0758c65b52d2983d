"""Notebook hygiene, and the exercise checks on blank and solved notebooks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moe_lab import exercises

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
ALL_NOTEBOOKS = sorted(NOTEBOOKS.rglob("*.ipynb"))
BLANK = sorted((NOTEBOOKS / "exercises").glob("*.ipynb"))
CHECKS = {
    "01_bytes_by_hand": ("check_bytes_by_hand", ["allreduce_sent_bytes", "alltoall_dispatch_sent_bytes"]),
    "02_alltoall_splits": ("check_splits", ["permute_by_destination"]),
    "03_crossover": ("check_crossover", ["predicted_crossover"]),
    "04_dedup": ("check_dedup", ["rows_per_destination"]),
}


def test_notebooks_present():
    assert len(BLANK) >= 4
    for blank in BLANK:
        assert (NOTEBOOKS / "exercises" / "solutions" / blank.name).is_file()


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: str(p.relative_to(NOTEBOOKS)))
def test_committed_without_outputs(path):
    document = json.loads(path.read_text())
    for cell in document["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {cell.get('id')} has outputs"
            assert cell["execution_count"] is None
    assert set(document["metadata"]) <= {"kernelspec", "language_info"}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_blank_exercise_fails_check(name, tmp_path, monkeypatch):
    source = NOTEBOOKS / "exercises" / f"{name}.ipynb"
    module = tmp_path / f"blank_{name}.py"  # checks read the functions' source, so they need a file
    document = json.loads(source.read_text())
    module.write_text("import torch\n\n" + "\n\n".join(
        "".join(cell["source"]) for cell in document["cells"] if "exercise" in cell["metadata"].get("tags", [])
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    blank = __import__(module.stem)
    check_name, function_names = CHECKS[name]
    result = getattr(exercises, check_name)(*(getattr(blank, f) for f in function_names))
    assert not result
    assert "not written yet" in result.message
