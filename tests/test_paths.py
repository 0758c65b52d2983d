"""Every path on real gloo ranks against the single-process reference, and its bytes."""

from __future__ import annotations

import pytest

from moe_lab.bytes_model import expected_sent_bytes, token_bytes_lower_bound, token_bytes_sent
from moe_lab.compare import TOLERANCE, expand_variants, tolerance
from moe_lab.paths import PATHS

from conftest import ALL_VARIANTS, MATRIX, VARIANT_SPECS

VARIANT_PAIRS = [(label, variant.label) for label in VARIANT_SPECS for variant in expand_variants(ALL_VARIANTS)]

PAIRS = [(label, path) for label in MATRIX for path in PATHS]


@pytest.mark.parametrize("label,path", PAIRS)
def test_path_matches_reference(matrix_results, label, path):
    result = matrix_results[label]
    path_result = next(p for p in result.paths if p.path == path)
    assert path_result.error <= TOLERANCE[result.workload.dtype], (
        f"{path} on {label}: relative error {path_result.error:.3g}"
    )
    assert path_result.passed


@pytest.mark.parametrize("label,path", PAIRS)
def test_counted_bytes_match_model(matrix_results, label, path):
    result = matrix_results[label]
    path_result = next(p for p in result.paths if p.path == path)
    expected = expected_sent_bytes(path, result.workload, result.backend)
    for rank in range(result.workload.world_size):
        assert path_result.bytes_by_phase(rank) == expected[rank], f"rank {rank}"


@pytest.mark.parametrize("label", list(MATRIX))
def test_os_bytes_within_header(matrix_results, label):
    """gloo adds a fixed header per message: 48 bytes for broadcast, 144 per peer for the others."""
    result = matrix_results[label]
    n = result.workload.world_size
    for path_result in result.paths:
        for rank, records in enumerate(path_result.records):
            for record in records:
                if record["os_sent_bytes"] is None:  # asynchronous: not measured per call
                    continue
                extra = record["os_sent_bytes"] - record["sent_bytes"]
                assert 0 <= extra <= 576 * max(n - 1, 1), (path_result.path, rank, record)


def test_bfloat16_within_tolerance(matrix_results):
    result = matrix_results["2r-uniform-bfloat16"]
    assert TOLERANCE[result.workload.dtype] == 2e-2
    for path_result in result.paths:
        assert path_result.error <= 2e-2, path_result.path
        assert all(output.dtype == result.workload.dtype for output in path_result.rank_outputs)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_local_routing_sends_no_token_rows(matrix_results, world_size):
    label = next(label for label in MATRIX if label.startswith(f"{world_size}r-local"))
    alltoall = next(p for p in matrix_results[label].paths if p.path == "alltoall")
    for records in alltoall.records:
        assert token_bytes_sent(records) == 0


def test_allreduce_bytes_ignore_routing(matrix_results):
    local = next(p for p in matrix_results["2r-local-contiguous"].paths if p.path == "allreduce")
    uniform = next(p for p in matrix_results["2r-uniform-same-shape-as-local"].paths if p.path == "allreduce")
    assert local.records[0] and [r["sent_bytes"] for r in local.records[0]] == [r["sent_bytes"] for r in uniform.records[0]]


@pytest.mark.parametrize("label,variant", VARIANT_PAIRS)
def test_variant_matches_reference(variant_results, label, variant):
    result = variant_results[label]
    path_result = next(p for p in result.paths if p.path == variant)
    limit = tolerance(result.workload.dtype, path_result.variant.options)
    assert path_result.error <= limit, f"{variant} on {label}: relative error {path_result.error:.3g}"


@pytest.mark.parametrize("label,variant", VARIANT_PAIRS)
def test_variant_bytes_match_model(variant_results, label, variant):
    result = variant_results[label]
    path_result = next(p for p in result.paths if p.path == variant)
    expected = expected_sent_bytes(path_result.variant.path, result.workload, result.backend, path_result.variant.options)
    for rank in range(result.workload.world_size):
        assert path_result.bytes_by_phase(rank) == expected[rank], f"rank {rank}"


@pytest.mark.parametrize("label", list(VARIANT_SPECS))
def test_dedup_token_bytes_at_lower_bound(variant_results, label):
    result = variant_results[label]
    bound = token_bytes_lower_bound(result.workload)
    dedup = next(p for p in result.paths if p.path == "alltoall_dedup")
    plain = next(p for p in result.paths if p.path == "alltoall")
    for rank, records in enumerate(dedup.records):
        assert token_bytes_sent(records, phase="dispatch") == bound[rank]
        assert token_bytes_sent(plain.records[rank], phase="dispatch") >= bound[rank]
        header = sum(r["os_sent_bytes"] - r["sent_bytes"] for r in records if r["what"] == "tokens")
        os_tokens = sum(r["os_sent_bytes"] for r in records if r["what"] == "tokens" and r["phase"] == "dispatch")
        assert 0 <= os_tokens - bound[rank] <= header


def test_overlap_metadata_per_chunk(variant_results):
    result = variant_results["2r-uniform"]
    plain = next(p for p in result.paths if p.path == "alltoall")
    overlapped = next(p for p in result.paths if p.path == "alltoall+overlap")
    count = lambda path: sum(1 for r in path.records[0] if r["what"] == "counts")
    assert count(overlapped) == ALL_VARIANTS.chunks * count(plain)
    assert all(r["os_sent_bytes"] is None for r in overlapped.records[0] if r["what"] == "tokens" and r["phase"] == "dispatch")
