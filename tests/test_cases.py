"""The routing cases in tests/cases (inputs that broke real MoE systems) on every path."""

from __future__ import annotations

import pytest

from moe_lab.bytes_model import token_bytes_sent
from moe_lab.compare import expand_variants, tolerance

from conftest import ALL_VARIANTS, CASE_FILES

CASES = [path.stem for path in CASE_FILES]
VARIANTS = [variant.label for variant in expand_variants(ALL_VARIANTS)]


def test_cases_present():
    assert len(CASES) >= 10


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_case_matches_reference(case_results, case, variant):
    result = case_results[case]
    path_result = next(p for p in result.paths if p.path == variant)
    limit = tolerance(result.workload.dtype, path_result.variant.options)
    assert path_result.error <= limit, f"error {path_result.error:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_case_ends_within_a_minute(case_results, case):
    assert case_results[case].wall_seconds < 60


def test_local_experts_only_moves_no_tokens(case_results):
    result = case_results["local_experts_only"]
    for name in ("alltoall", "alltoall_dedup", "alltoall+fp8", "alltoall_dedup+overlap"):
        alltoall = next(p for p in result.paths if p.path == name)
        for records in alltoall.records:
            assert token_bytes_sent(records) == 0, name
    allreduce = next(p for p in result.paths if p.path == "allreduce")
    tokens = sum(result.workload.tokens_per_rank)
    row_bytes = result.workload.cfg.hidden * 4
    for records in allreduce.records:
        assert token_bytes_sent(records) == tokens * row_bytes  # 2 ranks: a ring sends the whole buffer once


@pytest.mark.parametrize("name", ["alltoall", "alltoall_dedup"])
def test_idle_expert_rank_gets_no_rows(case_results, name):
    alltoall = next(p for p in case_results["rank_gets_no_tokens"].paths if p.path == name)
    assert token_bytes_sent(alltoall.records[0], phase="dispatch") == 0
    assert token_bytes_sent(alltoall.records[1], phase="combine") == 0


def test_int32_ids_sent_as_int32(case_results):
    alltoall = next(p for p in case_results["int32_ids_bfloat16_tokens"].paths if p.path == "alltoall")
    id_records = [r for r in alltoall.records[0] if r["what"] == "expert_ids"]
    assert id_records and all(r["dtype"] == "int32" for r in id_records)
    token_records = [r for r in alltoall.records[0] if r["what"] == "tokens"]
    assert all(r["dtype"] == "bfloat16" for r in token_records)
