"""The command line as a user runs it: `python -m moe_lab compare`, under python and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lab.cli import main

from conftest import CASES_DIR


def run_cli(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_lab", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def test_compare_json_tiny(tmp_path):
    completed = run_cli("compare", "--preset", "tiny", "--json", "--repeats", "2", "--out", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert [p["path"] for p in document["paths"]] == ["allreduce", "broadcast", "allgather_reducescatter", "alltoall", "alltoall_dedup"]
    for path in document["paths"]:
        assert path["passed"] is True
        assert path["rel_error"] <= 1e-5
        assert path["repeats"] == 2
        assert len(path["per_rank"]) == 2
        assert path["sent_total_bytes"] > 0
        assert path["os_sent_total_bytes"] >= path["sent_total_bytes"]
    metadata = document["metadata"]
    assert metadata["environment"]["torch"]
    assert metadata["environment"]["backend"] == "gloo"
    assert metadata["config"]["name"] == "tiny"
    assert metadata["workload"]["seed"] == 0
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".csv", ".json"]


def test_compare_table_tiny(tmp_path):
    completed = run_cli("compare", "--preset", "tiny", "--repeats", "1", "--out", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    for name in ("allreduce", "broadcast", "allgather_reducescatter", "alltoall"):
        assert name in completed.stdout
    assert "FAIL" not in completed.stdout


def test_compare_routing_file(tmp_path):
    case = CASES_DIR / "uneven_batches_three_ranks.json"
    completed = run_cli("compare", "--routing-file", str(case), "--json", "--repeats", "1", "--out", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert document["metadata"]["workload"]["tokens_per_rank"] == [7, 1, 4]
    assert all(path["passed"] for path in document["paths"])


def test_compare_under_torchrun(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moe_lab", "compare", "--preset", "tiny", "--json", "--repeats", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)  # only rank 0 prints
    assert document["metadata"]["workload"]["world_size"] == 2
    assert all(path["passed"] for path in document["paths"])


@pytest.mark.parametrize("args,message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "tiny", "--paths", "allreduce,teleport"], "unknown path 'teleport'"),
    (["--preset", "tiny", "--routing", "random"], "unknown routing 'random'"),
    (["--preset", "tiny", "--backend", "mpi"], "unknown backend 'mpi'"),
    (["--preset", "tiny", "--placement", "striped"], "unknown placement 'striped'"),
    (["--preset", "tiny", "--dtype", "float64"], "unknown dtype 'float64'"),
    (["--preset", "tiny", "--world-size", "9", "--placement", "round_robin"], "8 experts cannot be spread over 9 ranks"),
    (["--preset", "tiny", "--world-size", "3"], "contiguous placement needs n_experts divisible by world_size"),
    (["--preset", "tiny", "--world-size", "0"], "world_size must be an integer >= 1, got 0"),
    (["--preset", "tiny", "--tokens", "-3"], "token counts must be integers >= 0, got -3"),
    (["--preset", "missing/config.json"], "config file 'missing/config.json' not found"),
    (["--preset", "tiny", "--backend", "nccl"], "backend 'nccl' needs one GPU per rank"),
    (["--preset", "tiny", "--dtype", "float8_e4m3fn"], "dtype 'float8_e4m3fn' cannot be the layer dtype"),
    (["--preset", "tiny", "--dtype", "float8_e5m2"], "sends float8 as raw bytes where nothing is summed"),
    (["--preset", "tiny", "--repeats", "0"], "repeats must be an integer >= 1, got 0"),
    (["--preset", "tiny", "--warmup", "-1"], "warmup must be an integer >= 0, got -1"),
    (["--preset", "tiny", "--paths", ","], "no path to run; choose from allreduce, broadcast"),
    (["--preset", "tiny", "--routing", "local", "--locality", "1.5"], "locality must be a number from 0 to 1, got 1.5"),
    (["--preset", "tiny", "--locality", "-0.1"], "locality must be a number from 0 to 1, got -0.1"),
    (["--preset", "tiny", "--routing", "skewed", "--zipf-exponent", "nan"], "zipf_exponent must be a finite number >= 0, got nan"),
    (["--preset", "tiny", "--timeout", "0"], "timeout must be a finite number of seconds > 0, got 0.0"),
    (["--preset", "tiny", "--timeout", "inf"], "timeout must be a finite number of seconds > 0, got inf"),
    (["--preset", "tiny", "--tokens", "4,4,4"], "3 token counts given for 2 ranks"),
])
def test_bad_input_message(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("moe_lab.compare.run_ranks", refuse_to_start)
    code = main(["compare", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def refuse_to_start(*args, **kwargs):
    raise AssertionError("ranks were started for bad input")


@pytest.mark.parametrize("fault,message", [
    ("rank=1,phase=dispatch,kind=melt", "MOE_LAB_FAULT: unknown kind 'melt'"),
    ("rank=2,phase=dispatch,kind=raise", "rank=2 does not exist in a run of 2 ranks"),
])
def test_bad_fault_message(fault, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LAB_FAULT", fault)
    monkeypatch.setattr("moe_lab.compare.run_ranks", refuse_to_start)
    assert main(["compare", "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_out_is_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("moe_lab.compare.run_ranks", refuse_to_start)
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    assert main(["compare", "--preset", "tiny", "--out", str(taken)]) == 2
    assert f"--out {str(taken)!r} is a file, not a folder" in capsys.readouterr().err


def test_config_file_errors(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["compare", "--preset", str(broken)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"hidden_size": 64, "n_routed_experts": 8}))
    assert main(["compare", "--preset", str(partial)]) == 2
    assert "missing required keys ['moe_intermediate_size', 'num_experts_per_tok']" in capsys.readouterr().err

    too_many = tmp_path / "too_many.json"
    too_many.write_text(json.dumps({"hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 6}))
    assert main(["compare", "--preset", str(too_many)]) == 2
    assert "top_k=6 is larger than n_experts=4" in capsys.readouterr().err


def test_routing_file_conflicting_option(tmp_path, capsys):
    case = str(CASES_DIR / "idle_rank.json")
    assert main(["compare", "--routing-file", case, "--world-size", "4", "--out", str(tmp_path)]) == 2
    assert "--routing-file sets the shape" in capsys.readouterr().err


def test_routing_file_bad_shape(tmp_path, capsys):
    case = json.loads((CASES_DIR / "idle_rank.json").read_text())
    case["topk_ids"][0] = case["topk_ids"][0][:-1]  # one token short
    path = tmp_path / "short.json"
    path.write_text(json.dumps(case))
    assert main(["compare", "--routing-file", str(path), "--out", str(tmp_path)]) == 2
    assert "rank 0: topk_ids has shape (4, 2) but tokens_per_rank[0]=5" in capsys.readouterr().err


def _set(path, value):
    """Return an edit of a routing case that sets case[path[0]][path[1]]... to `value`."""
    def edit(case):
        target = case
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _delete(key):
    return lambda case: case.pop(key)


def _flatten_rank0(case):
    """Rank 0's five (token, top-2) rows as two rows of five: same count of ids, wrong shape."""
    ids = sum(case["topk_ids"][0], [])
    case["topk_ids"][0] = [ids[:5], ids[5:]]


# idle_rank.json: 2 ranks, 8 experts, top-2, tokens_per_rank [5, 0].
@pytest.mark.parametrize("edit,message", [
    (_delete("top_k"), "is missing key 'top_k'; required keys: world_size"),
    (_set(["top_k"], 0), "top_k must be a positive integer, got 0"),
    (_set(["topk_ids", 0, 0, 0], -1), "rank 0: token 0 has expert id -1, outside 0..7"),
    (_set(["topk_ids", 0, 1, 1], 8), "rank 0: token 1 has expert id 8, outside 0..7"),
    (_set(["topk_ids", 0, 0, 0], 2**32 + 1), "has expert id 4294967297, outside 0..7"),
    (_set(["topk_ids", 0, 0, 0], 1.5), "rank 0: topk_ids must hold integer expert ids, got float32 values"),
    (_set(["topk_ids", 0, 1], [3]), "rank 0: topk_ids must be a list of 5 lists of 2 numbers"),
    (_flatten_rank0, "rank 0: topk_ids has shape (2, 5) but tokens_per_rank[0]=5 and top_k=2 need (5, 2)"),
    (_set(["topk_ids"], [[]]), "topk_ids must hold one table per rank, 2 in all, got 1"),
    (_set(["topk_weights", 0, 0, 0], -0.5), "rank 0: token 0 has negative weights"),
    (_set(["topk_weights", 0, 0, 0], float("nan")), "weights must be finite numbers >= 0"),
    (_set(["tokens_per_rank"], [5, 1]), "rank 1: topk_ids has shape (0,) but tokens_per_rank[1]=1 and top_k=2 need (1, 2)"),
    (_set(["tokens_per_rank"], [5, -1]), "token counts must be integers >= 0, got -1"),
    (_set(["world_size"], 0), "world_size must be an integer >= 1, got 0"),
    (_set(["dtype"], "float64"), "unknown dtype 'float64'"),
    (_set(["ids_dtype"], "uint8"), "ids_dtype 'uint8' is not one of int64, int32"),
    (_set(["seed"], "zero"), "seed must be an integer, got 'zero'"),
])
def test_routing_file_rejected(edit, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("moe_lab.compare.run_ranks", refuse_to_start)
    case = json.loads((CASES_DIR / "idle_rank.json").read_text())
    edit(case)
    path = tmp_path / "case.json"
    path.write_text(json.dumps(case))
    assert main(["compare", "--routing-file", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_routing_file_repeated_expert(tmp_path, capsys):
    case = json.loads((CASES_DIR / "idle_rank.json").read_text())
    first = case["topk_ids"][0][0][0]
    case["topk_ids"][0][0] = [first, first]
    path = tmp_path / "case.json"
    path.write_text(json.dumps(case))
    assert main(["compare", "--routing-file", str(path), "--out", str(tmp_path)]) == 2
    assert f"rank 0: token 0 picks the same expert twice in [{first}, {first}]" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_routing_file_not_an_object(text, message, tmp_path, capsys):
    path = tmp_path / "case.json"
    path.write_text(text)
    assert main(["compare", "--routing-file", str(path), "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_routing_file_missing(tmp_path, capsys):
    assert main(["compare", "--routing-file", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert f"routing file {str(tmp_path / 'nope.json')!r} not found" in capsys.readouterr().err


def test_two_runs_at_once(tmp_path):
    """Both runs succeed and keep their own files, though they start in the same second in the same folder."""
    command = [sys.executable, "-m", "moe_lab", "compare", "--preset", "tiny", "--json", "--repeats", "1", "--out", str(tmp_path)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment),
        subprocess.Popen(command + ["--no-p2p"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment),
    ]
    outputs = [run.communicate(timeout=180) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    documents = [json.loads(out) for out, _ in outputs]
    files = {document["files"]["csv"] for document in documents} | {document["files"]["metadata"] for document in documents}
    assert len(files) == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(Path(name).name for name in files)
    assert documents[0]["metadata"]["rank_env"] == {}
    assert documents[0]["metadata"]["environment"]["nccl_p2p_disable"] is None
    assert documents[1]["metadata"]["rank_env"] == {"NCCL_P2P_DISABLE": "1"}
    assert documents[1]["metadata"]["environment"]["nccl_p2p_disable"] == "1"


def test_env_command(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "CPU:" in out
    assert "torch " in out
    assert "backend for 2 ranks (--backend auto):" in out
    assert "advice:" in out
    assert main(["env", "--json", "--world-size", "3"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["world_size"] == 3
    assert document["backend"] in ("gloo", "nccl")
    assert isinstance(document["p2p"], list)
    assert document["advice"]
