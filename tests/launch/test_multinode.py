"""Several nodes through torchrun's own c10d rendezvous, on one machine (gloo on CPU): two agents with
`--nnodes=2 --nproc_per_node=1` train the tiny dense and memory models and log what one process logs,
as the single-agent tests check (test_train.py, test_memory_parallel.py). And launch.sweep's SLURM job,
started on two fake nodes the way srun starts it, runs that same torchrun command across them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.sweep.spec import load_sweep
from launch.train.metrics import read_metrics

from ..conftest import REPO, TINY, run_module  # noqa: TID252
from ._agents import ENV, checkpoint_worlds, free_port, start_agents, wait_all

pytestmark = pytest.mark.slow
TINY_MEMORY = str(REPO / "configs" / "memory" / "tiny_memory.yaml")
STEPS = ["train.steps=4", "train.log_every=1", "train.val_every=2", "train.ckpt_every=2"]
CASES = {
    "dense-fsdp": (TINY, ["parallel.data=fsdp"]),
    "memory-p2": (TINY_MEMORY, ["parallel.memory=2"]),
    "memory-p2-fsdp": (TINY_MEMORY, ["parallel.memory=2", "parallel.data=fsdp"]),
}


def multinode_flags(port: int, nnodes: str = "2") -> list[str]:
    return [f"--nnodes={nnodes}", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=multinode{port}"]  # fmt: skip


def records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r or "val_loss" in r or "final_val_loss" in r]


def assert_same_run(ours: Path, one: Path, n: int, tol: float = 1e-4) -> None:
    a, b = records(ours), records(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == n, (a, b)
    kinds = {"loss", "val_loss", "final_val_loss"}
    for x, y in zip(a, b):
        assert x.keys() & kinds == y.keys() & kinds, (x, y)
        for key in ("loss", "val_loss", "grad_norm", "final_val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=tol, abs=tol), (key, x, y)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """config -> its one-process run (trained on first use)."""
    runs: dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in runs:
            runs[config] = tmp_path_factory.mktemp("one_process")
            run_module("launch.train", f"config={config}", f"run.dir={runs[config]}", *STEPS)
        return runs[config]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_two_agents_through_c10d_rendezvous_match_one_process(tmp_path, case, one_process):
    config, layout = CASES[case]
    run = tmp_path / "run"
    args = [f"config={config}", f"run.dir={run}", *STEPS, *layout]
    agents = start_agents(2, multinode_flags(free_port()), args, tmp_path)
    codes = wait_all(agents, timeout=240)
    assert codes == [0, 0], "\n".join(a.tail() for a in agents)
    banner = [line for a in agents for line in a.out.splitlines() if line.startswith("model:")]
    assert len(banner) == 1 and "| world 2 |" in banner[0], banner  # one rank 0, two ranks in all
    assert set(checkpoint_worlds(run).values()) == {2}
    assert_same_run(run, one_process(config), n=4 + 2 + 1)  # 4 steps, 2 validations, the final one


def fake_srun(nodes: int, job_id: int, code: str, args: list[str], env: dict) -> list[subprocess.Popen]:
    """What `srun` does for one task per node: the same command on every node, told its place by
    SLURM_* variables (all "nodes" are this machine: localhost)."""
    return [
        subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
            env={**env, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NUM_NODES": str(nodes),
                 "SLURM_JOB_NODELIST": ",".join(["localhost"] * nodes), "SLURM_NODEID": str(node),
                 "SLURM_PROCID": str(node), "SLURM_NTASKS": str(nodes), "SLURM_LOCALID": "0"},
        )
        for node in range(nodes)
    ]  # fmt: skip


def test_sweep_slurm_job_runs_torchrun_across_two_fake_nodes(tmp_path, one_process):
    """launch.sweep's array task (SlurmJob) on a 2-node allocation: each node starts torchrun with the
    c10d rendezvous on the first node, and the two nodes train the run one process would."""
    pytest.importorskip("submitit")
    out = tmp_path / "runs"
    sweep_file = tmp_path / "s.yaml"
    body = {"base": TINY, "out": str(out), "overrides": dict(a.split("=", 1) for a in STEPS),
            "slurm": {"nodes": 2, "gpus_per_node": 1}}  # fmt: skip
    sweep_file.write_text(json.dumps(body))
    sweep = load_sweep(sweep_file)
    run = sweep.runs[0]
    port = free_port()
    while not 20000 <= port < 40000:  # the job's port is 20000 + job id % 20000
        port = free_port()
    job_id = 100000 + port - 20000
    code = ("import sys; from launch.sweep.runner import SlurmJob; "
            "print('state:', SlurmJob(sys.argv[1], sys.argv[2], 1, 2, sys.argv[3])())")  # fmt: skip
    env = {**ENV, "PATH": os.environ.get("PATH", "")}
    nodes = fake_srun(2, job_id, code, [str(sweep_file), run.name, str(out)], env)
    try:
        results = [p.communicate(timeout=240) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    for p, (stdout, stderr) in zip(nodes, results):
        assert p.returncode == 0, f"{stdout[-2000:]}\n{stderr[-4000:]}"
        assert "state: done" in stdout, stdout[-2000:]
        started = [line for line in stdout.splitlines() if line.startswith("$ ")]
        assert len(started) == 1 and "-m launch.train" in started[0], stdout[-2000:]
        assert (f"--nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=localhost:{port} "
                f"--rdzv_id={job_id}") in started[0]  # fmt: skip
    run_dir = sweep.run_dir(run)
    assert set(checkpoint_worlds(run_dir).values()) == {2}
    # the sweep's run is `config=BASE overrides run.dir=...`: the same training as one process's
    assert_same_run(run_dir, one_process(TINY), n=4 + 2 + 1)
