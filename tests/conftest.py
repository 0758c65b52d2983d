"""Shared launches: each fixture starts ranks once per world size and many tests read the results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_lab.compare import CompareOptions, run_compare_many
from moe_lab.workload import WorkloadSpec

CASES_DIR = Path(__file__).parent / "cases"
CASE_FILES = sorted(CASES_DIR.glob("*.json"))

# Ragged token counts per world size, an idle rank included from 3 ranks up.
TOKENS = {1: 6, 2: (5, 3), 3: (4, 0, 2), 4: (3, 1, 0, 5)}
SYNTHETIC = [("gate", {}), ("uniform", {}), ("skewed", {}), ("local", {"locality": 1.0})]


def matrix_specs() -> dict[str, WorkloadSpec]:
    specs = {}
    for world_size, tokens in TOKENS.items():
        placement = "round_robin" if 8 % world_size else "contiguous"  # tiny has 8 experts
        for routing, extra in SYNTHETIC:
            label = f"{world_size}r-{routing}-{placement}"
            specs[label] = WorkloadSpec(
                preset="tiny", world_size=world_size, tokens=tokens, routing=routing, placement=placement, **extra
            )
    for routing in ("gate", "uniform"):
        specs[f"2r-{routing}-bfloat16"] = WorkloadSpec(preset="tiny", tokens=(6, 4), routing=routing, dtype="bfloat16")
    specs["2r-uniform-round_robin"] = WorkloadSpec(preset="tiny", tokens=(6, 4), routing="uniform", placement="round_robin")
    specs["2r-uniform-same-shape-as-local"] = WorkloadSpec(preset="tiny", tokens=(5, 3), routing="uniform")
    return specs


MATRIX = matrix_specs()


@pytest.fixture(scope="session")
def matrix_results():
    """label -> CompareResult for every workload in MATRIX, one launch per world size."""
    labels = list(MATRIX)
    results = run_compare_many([MATRIX[label] for label in labels], CompareOptions(repeats=1, warmup=0))
    return dict(zip(labels, results))


# Every path with every variant: compressed dispatch and overlap.
ALL_VARIANTS = CompareOptions(repeats=1, warmup=0, dispatch_dtypes=("bfloat16", "fp8"), overlap=True, chunks=3)

VARIANT_SPECS = {
    "2r-uniform": WorkloadSpec(preset="tiny", tokens=(7, 4), routing="uniform"),
    "2r-local": WorkloadSpec(preset="tiny", tokens=(5, 5), routing="local", locality=1.0),
    "3r-idle-round_robin": WorkloadSpec(preset="tiny", world_size=3, tokens=(4, 0, 6), routing="gate", placement="round_robin"),
    "4r-skewed": WorkloadSpec(preset="tiny", world_size=4, tokens=(2, 5, 1, 3), routing="skewed"),
    "2r-bfloat16": WorkloadSpec(preset="tiny", tokens=(6, 6), routing="uniform", dtype="bfloat16"),
}


@pytest.fixture(scope="session")
def variant_results():
    """label -> CompareResult with every variant of every path."""
    labels = list(VARIANT_SPECS)
    results = run_compare_many([VARIANT_SPECS[label] for label in labels], ALL_VARIANTS)
    return dict(zip(labels, results))


@pytest.fixture(scope="session")
def case_results():
    """case name -> CompareResult for every file in tests/cases, every variant included."""
    specs = [WorkloadSpec(routing_file=str(path)) for path in CASE_FILES]
    results = run_compare_many(specs, ALL_VARIANTS)
    return {path.stem: result for path, result in zip(CASE_FILES, results)}


def load_case(name: str) -> dict:
    return json.loads((CASES_DIR / f"{name}.json").read_text())
