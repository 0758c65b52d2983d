"""Backend choice and P2P advice, decided from made-up machine descriptions (no GPU needed)."""

from __future__ import annotations

import pytest

from moe_lab.environment import (
    EnvironmentReport,
    GpuInfo,
    advise,
    choose_backend,
    format_report,
    inspect_environment,
    pairs_without_p2p,
)
from moe_lab.launch import LaunchError, resolve_backend


def machine(gpus: int, p2p: bool | list[list[bool]] = False, nccl: bool = True, **variables) -> EnvironmentReport:
    """A description of a machine with `gpus` RTX 3090s; p2p=True/False for every pair, or a full matrix."""
    if isinstance(p2p, bool):
        p2p = [[i == j or p2p for j in range(gpus)] for i in range(gpus)]
    return EnvironmentReport(
        cpu_count=16, cpu_model="test CPU", torch_version="2.13.0", cuda_version="12.8" if gpus else None,
        nccl_available=nccl, nccl_version="2.27.3" if nccl and gpus else None,
        gpus=tuple(GpuInfo(i, "NVIDIA GeForce RTX 3090", 24 * 2**30, (8, 6)) for i in range(gpus)),
        p2p=tuple(tuple(row) for row in p2p), variables=dict(variables),
    )


@pytest.mark.parametrize("requested,world_size,gpus,nccl,backend,reason", [
    ("auto", 2, 0, False, "gloo", "no GPU is visible"),
    ("auto", 2, 2, True, "nccl", "NCCL is available and 2 GPU(s) are visible"),
    ("auto", 4, 2, True, "gloo", "2 GPU(s) are visible for 4 ranks and NCCL needs one GPU per rank"),
    ("auto", 2, 2, False, "gloo", "this torch build has no NCCL"),
    ("gloo", 2, 2, True, "gloo", "gloo was requested"),
    ("nccl", 2, 2, True, "nccl", "NCCL was requested"),
])
def test_backend_choice(requested, world_size, gpus, nccl, backend, reason):
    choice = choose_backend(requested, world_size, gpus, nccl)
    assert choice.backend == backend
    assert reason in choice.reason


@pytest.mark.parametrize("requested,world_size,gpus,nccl,message", [
    ("nccl", 2, 1, True, "backend 'nccl' needs one GPU per rank, 2 in all, but only 1 GPU(s) are visible; use --backend gloo or --world-size 1"),
    ("nccl", 2, 2, False, "but this torch build has no NCCL"),
    ("mpi", 2, 0, False, "unknown backend 'mpi'; choose one of auto, gloo, nccl"),
    ("auto", 0, 0, False, "world_size must be an integer >= 1, got 0"),
    ("auto", True, 0, False, "world_size must be an integer >= 1, got True"),
])
def test_backend_rejected(requested, world_size, gpus, nccl, message):
    choice = choose_backend(requested, world_size, gpus, nccl)
    assert choice.backend is None
    assert choice.reason == message or message in choice.reason


def test_resolve_backend_raises():
    with pytest.raises(LaunchError, match="unknown backend 'mpi'"):
        resolve_backend("mpi", 2)


def test_advice_target_box():
    advice = " ".join(advise(machine(2, p2p=False), 2))
    assert "No P2P between the GPUs the ranks use: this is the target setup" in advice
    assert "host shared memory" in advice
    assert "reports P2P" not in advice


def test_advice_p2p_reported():
    advice = " ".join(advise(machine(2, p2p=True), 2))
    assert "The GPUs report P2P: NCCL will use its P2P transport" in advice
    assert "compare --no-p2p" in advice
    assert "set NCCL_P2P_DISABLE=1" in advice  # in case P2P is reported but broken


def test_advice_p2p_disabled_by_variable():
    advice = " ".join(advise(machine(2, p2p=True, NCCL_P2P_DISABLE="1"), 2))
    assert "NCCL_P2P_DISABLE is set: NCCL does not use P2P" in advice
    assert "report P2P that does not work" not in advice


def test_advice_shm_disabled_without_p2p():
    advice = " ".join(advise(machine(2, p2p=False, NCCL_SHM_DISABLE="1"), 2))
    assert "NCCL_SHM_DISABLE is set too" in advice


def test_advice_partial_p2p():
    matrix = [[True, True, False], [True, True, False], [False, False, True]]
    report = machine(3, p2p=matrix)
    assert pairs_without_p2p(report, 3) == [(0, 2), (1, 2)]
    assert pairs_without_p2p(report, 2) == []  # 2 ranks use GPU 0 and 1 only
    advice = " ".join(advise(report, 3))
    assert "P2P is missing between GPU 0-2, GPU 1-2 but present between other GPUs" in advice


def test_advice_one_way_p2p_counts_as_missing():
    assert pairs_without_p2p(machine(2, p2p=[[True, True], [False, True]]), 2) == [(0, 1)]


@pytest.mark.parametrize("report,world_size,fragment", [
    (machine(0, nccl=False), 2, "No GPU is visible: ranks run on CPU with gloo"),
    (machine(1), 2, "1 GPU(s) for 2 ranks: NCCL needs one GPU per rank, so the kit uses gloo on CPU. Use --world-size 1"),
    (machine(2, nccl=False), 2, "This torch build has no NCCL"),
    (machine(1), 1, "One rank moves no data between GPUs"),
])
def test_advice_without_nccl_pair(report, world_size, fragment):
    assert fragment in " ".join(advise(report, world_size))


def test_report_prints_p2p_matrix():
    text = format_report(machine(2, p2p=[[True, False], [False, True]]), 2)
    assert "GPU0: NVIDIA GeForce RTX 3090, 24.0 GiB, compute capability 8.6" in text
    assert "P2P (torch.cuda.can_device_access_peer, row GPU reads column GPU):" in text
    assert "GPU0       -    no" in text
    assert "GPU1      no     -" in text
    assert "backend for 2 ranks (--backend auto): nccl" in text
    assert "NCCL 2.27.3" in text


def test_inspect_this_machine():
    report = inspect_environment()
    assert report.cpu_count >= 1
    assert len(report.p2p) == len(report.gpus)
    assert all(len(row) == len(report.gpus) for row in report.p2p)
