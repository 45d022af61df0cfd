"""What each run of a sweep still needs (grow, train, eval) and running it: locally, one or N
runs at a time, or as a SLURM job array through submitit.

A run is `done` when its latest complete checkpoint is at train.steps and, if the sweep asks
for evaluation, RUN/eval/results.json exists. Anything else is `partial` or `new`, and running it
again re-issues only the missing steps: the trainer itself resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from launch.checkpoint.paths import list_checkpoints
from launch.report.runs import EVAL  # RUN/eval: launch.eval's results.json
from launch.runtime.errors import UserError
from launch.runtime.processes import child_pids
from launch.sweep.spec import Run, Sweep, override_args, run_config

GROWN = "grown"  # RUN/grown: the grown checkpoint a grow run starts from
STEPS_LOG = "sweep_steps.jsonl"  # RUN/sweep_steps.jsonl: wall time and peak RSS of each local step


@dataclass
class Step:
    kind: str  # grow | train | eval
    module: str
    args: list[str]
    distributed: bool  # train runs under torchrun when a run has several processes


def target_steps(sweep: Sweep, run: Run) -> int | None:
    """train.steps of the run: from the overrides, the resolved config, or the grown config."""
    if "train.steps" in run.overrides:
        return int(run.overrides["train.steps"])
    if run.grow is None:
        return run_config(sweep, run).train.steps
    for cfg in (sweep.run_dir(run) / "config.yaml", sweep.run_dir(run) / GROWN / "config.yaml"):
        if cfg.is_file():
            return int(OmegaConf.load(cfg).train.steps)
    return None


def trained_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir)
    return found[-1][0] if found else 0


def _evaluated(run_dir: Path, step: int) -> bool:
    path = run_dir / EVAL / "results.json"
    if not path.is_file():
        return False
    try:
        return int(json.loads(path.read_text()).get("step", step)) == step
    except (ValueError, json.JSONDecodeError):
        return False


def is_trained(sweep: Sweep, run: Run) -> bool:
    target = target_steps(sweep, run)
    return target is not None and trained_step(sweep.run_dir(run)) >= target


def state(sweep: Sweep, run: Run) -> str:
    """done | partial | new."""
    run_dir = sweep.run_dir(run)
    if is_trained(sweep, run) and (not sweep.eval.tasks or _evaluated(run_dir, trained_step(run_dir))):
        return "done"
    started = list_checkpoints(run_dir) or (run_dir / GROWN).is_dir() or (run_dir / "metrics.jsonl").is_file()
    return "partial" if started else "new"


def plan(sweep: Sweep, run: Run) -> list[Step]:
    """The steps this run still needs, in order."""
    run_dir = sweep.run_dir(run)
    steps: list[Step] = []
    train_args = [*override_args(run.overrides), f"run.dir={run_dir}"]
    if run.grow is not None:
        grown = run_dir / GROWN
        if not list_checkpoints(run_dir) and not (grown / "config.yaml").is_file():
            g = run.grow
            args = [f"checkpoint={sweep.run_dir(g.source)}", f"out={grown}", f"grow.strategy={g.strategy}"]
            if g.depth is not None:
                args.append(f"grow.depth={g.depth}")
            steps.append(Step("grow", "launch.grow", [*args, *override_args(g.args)], False))
        train_args = [f"config={grown / 'config.yaml'}", *train_args, f"train.init_from={grown}"]
    else:
        train_args = [f"config={sweep.base}", *train_args]
    if not is_trained(sweep, run):
        steps.append(Step("train", "launch.train", train_args, True))
    if sweep.eval.tasks and not (is_trained(sweep, run) and _evaluated(run_dir, trained_step(run_dir))):
        tasks = "[" + ",".join(sweep.eval.tasks) + "]"
        args = [
            f"checkpoint={run_dir}",
            f"tasks={tasks}",
            f"out={run_dir / EVAL}",
            "progress=false",
            "overwrite=true",
        ]
        steps.append(Step("eval", "launch.eval", [*args, *override_args(sweep.eval.args)], False))
    return steps


def check_trained_before_eval(sweep: Sweep, run: Run, step: Step) -> None:
    """Refuse to evaluate a run whose trainer exited 0 before train.steps.

    The trainer checkpoints and exits 0 on SIGTERM (pre-emption, a killed sweep), so a clean
    exit does not mean training finished; evaluating that checkpoint would spend an eval on a
    model nobody asked about. The run stays `partial` and the next sweep resumes it."""
    if step.kind == "eval" and not is_trained(sweep, run):
        at, target = trained_step(sweep.run_dir(run)), target_steps(sweep, run)
        raise UserError(
            f"run {run.name}: training stopped at step {at} of train.steps={target} (SIGTERM or pre-emption?); "
            "not evaluating a partial checkpoint. Run the sweep again to resume it"
        )


def command(step: Step, nproc: int = 1, torchrun: list[str] | None = None) -> list[str]:
    """The process to start for `step`: python -m, or torchrun for a distributed train step, through
    `launch.torchrun` (a SIGTERM, SLURM's pre-emption or scancel, reaches the workers, which checkpoint;
    a failed worker is one line in the run's log and the step's status is that rank's)."""
    if step.distributed and (nproc > 1 or torchrun):
        launcher = torchrun or ["--standalone", f"--nproc_per_node={nproc}"]
        return [
            sys.executable,
            "-m",
            "launch.torchrun",
            *launcher,
            "-m",
            step.module,
            *step.args,
        ]
    return [sys.executable, "-m", step.module, *step.args]


def waves(sweep: Sweep, runs: list[Run]) -> list[list[Run]]:
    """Runs grouped so that every run comes after the run it grows from."""
    depth: dict[str, int] = {}

    def d(run: Run, seen: tuple[str, ...] = ()) -> int:
        if run.name in seen:
            raise UserError(f"sweep {sweep.name}: grow dependencies form a cycle through {run.name}")
        if run.name not in depth:
            depth[run.name] = 0 if run.grow is None else 1 + d(sweep.get(run.grow.source), (*seen, run.name))
        return depth[run.name]

    for r in runs:
        d(r)
    top = max(depth[r.name] for r in runs) if runs else -1
    return [[r for r in runs if depth[r.name] == k] for k in range(top + 1)]


# ---------------------------------------------------------------------------------------------
# Local


def run_steps(sweep: Sweep, run: Run, nproc: int, env: dict[str, str], log: Path) -> None:
    """Run the missing steps of one run, appending their output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for step in plan(sweep, run):
        check_trained_before_eval(sweep, run, step)
        cmd = command(step, nproc)
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            t0 = time.time()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
            # wait4: this child's own peak RSS (RUSAGE_CHILDREN would be the max over all children)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = code = os.waitstatus_to_exitcode(status)
            wall = time.time() - t0
            f.write(f"[{step.kind} exited {code} after {wall:.0f}s]\n")
        record = {
            "kind": step.kind,
            "exit": code,
            "wall_s": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        }
        with open(log.parent / STEPS_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        if code != 0:
            raise UserError(f"run {run.name}: {step.kind} failed (exit {code}); see {log}")


def run_local(sweep: Sweep, runs: list[Run], parallel: int, nproc: int, env: dict[str, str]) -> list[str]:
    """Bring every run to `done`, `parallel` at a time; returns the names of failed runs."""
    failed: list[str] = []
    env = {**{str(k): str(v) for k, v in sweep.local.env.items()}, **env}
    for wave in waves(sweep, runs):
        todo = []
        for r in wave:
            if r.grow is not None and r.grow.source in failed:
                print(f"[skip] {r.name}: {r.grow.source} failed", flush=True)
                failed.append(r.name)
            elif state(sweep, r) == "done":
                print(f"[done] {r.name}", flush=True)
            else:
                todo.append(r)

        def one(r: Run) -> str | None:
            print(
                f"[{state(sweep, r)}] {r.name}: running {', '.join(s.kind for s in plan(sweep, r))}",
                flush=True,
            )
            t0 = time.time()
            try:
                run_steps(sweep, r, nproc, env, sweep.run_dir(r) / "sweep.log")
            except UserError as e:
                print(f"[failed] {e}", flush=True)
                return r.name
            print(f"[done] {r.name} ({time.time() - t0:.0f}s)", flush=True)
            return None

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            failed += [name for name in pool.map(one, todo) if name]
    return failed


# ---------------------------------------------------------------------------------------------
# SLURM (submitit)


def _ignore_submitit_signal() -> None:
    """In the step's process before exec (inherited by torchrun and its workers): SLURM sends the
    warning signal (submitit's USR2) to every process of the job step, and its default action would kill
    torchrun and the workers mid-step. Only submitit's handler in the job process acts on it
    (SlurmJob.checkpoint); the trainer installs its own handlers for its checkpoint signals."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def multinode_torchrun(nodes: int, nproc_per_node: int, env) -> list[str]:
    """torchrun's options on each node of a SLURM job (`env`: submitit's JobEnvironment): the c10d
    rendezvous hosted by the job's first node (docs/parallelism.md, "Several nodes"), on a port derived
    from the job id so the nodes agree on it without talking. SLURM_JOB_ID (`raw_job_id`), not the
    array's id: each array task is a job of its own, and two of them may share a first node."""
    job = str(env.raw_job_id)
    port = 20000 + int(job) % 20000 if job.isdigit() else 29500
    return [
        f"--nnodes={nodes}",
        f"--nproc_per_node={nproc_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={env.hostnames[0]}:{port}",
        f"--rdzv_id={job}",
    ]


class SlurmJob:
    """One array task: every missing step of one run, with torchrun across the job's nodes.
    Re-submitted on pre-emption or timeout; the trainer resumes from its last checkpoint.

    At the time-limit warning (`slurm.signal_delay_s` before the end) submitit calls `checkpoint` on
    the first node: it sends SIGUSR1 to the trainer's workers on this node, which makes every rank (on
    every node) checkpoint at the same step and exit 75; once torchrun has exited, submitit requeues the job."""

    def __init__(
        self,
        sweep_path: str,
        run_name: str,
        nproc_per_node: int,
        nodes: int,
        out: str,
        signal_delay_s: int = 120,
    ):
        self.sweep_path, self.run_name = sweep_path, run_name
        self.nproc_per_node, self.nodes, self.out = nproc_per_node, nodes, out
        self.signal_delay_s = signal_delay_s
        self._child: subprocess.Popen | None = None
        self._training = self._torchrun = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_child": None}  # pickled for the requeue: a live process is not state

    def __call__(self) -> str:
        import submitit

        from launch.sweep.spec import load_sweep

        sweep = load_sweep(self.sweep_path)
        sweep.out = Path(self.out)
        run = sweep.get(self.run_name)
        env = submitit.JobEnvironment()
        node = env.node if self.nodes > 1 else 0
        torchrun = multinode_torchrun(self.nodes, self.nproc_per_node, env) if self.nodes > 1 else None
        for step in plan(sweep, run):
            if step.kind != "train" and node != 0:
                continue  # grow and eval are single-process: the first node does them
            check_trained_before_eval(sweep, run, step)
            cmd = command(step, self.nproc_per_node, torchrun)
            print(f"$ {' '.join(cmd)}", flush=True)
            self._training, self._torchrun = step.kind == "train", "launch.torchrun" in cmd
            self._child = subprocess.Popen(cmd, preexec_fn=_ignore_submitit_signal)
            code = self._child.wait()
            self._child = None
            if code != 0:
                raise subprocess.CalledProcessError(code, cmd)
        return state(sweep, run)

    def checkpoint(self, *args, **kwargs):
        """submitit's handler for the warning signal, in this process's main thread: have the trainer
        checkpoint, wait for it (requeueing first would end the job mid-save), then requeue."""
        import submitit

        child = self._child
        if child is not None and child.poll() is None:
            # torchrun's workers, or a one-process trainer itself; grow and eval have nothing to save
            targets = (child_pids(child.pid) if self._torchrun else [child.pid]) if self._training else []
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
            try:
                child.wait(timeout=max(10, self.signal_delay_s - 15))
            except subprocess.TimeoutExpired:
                print(
                    "warning: the trainer did not stop before the time limit; requeueing anyway", flush=True
                )
        return submitit.helpers.DelayedSubmission(self)


def executor_parameters(sweep: Sweep) -> dict:
    """submitit parameters of every job of the sweep (generic names plus slurm_* ones)."""
    s = sweep.slurm
    params: dict = {
        "name": f"sweep-{sweep.name}",
        "nodes": s.nodes,
        "tasks_per_node": 1,  # one torchrun per node starts the GPU processes
        "cpus_per_task": max(1, s.cpus_per_gpu * max(1, s.gpus_per_node)),
        "timeout_min": s.time_min,
        "slurm_array_parallelism": s.array_parallelism,
        # --signal=USR2@N: submitit's handler turns it into SIGUSR1 for the trainer (SlurmJob.checkpoint)
        "slurm_signal_delay_s": s.signal_delay_s,
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.setup:
        params["slurm_setup"] = list(s.setup)
    if s.additional:
        params["slurm_additional_parameters"] = dict(s.additional)
    return params


def submit_slurm(sweep: Sweep, runs: list[Run], cluster: str | None = "slurm", wait: bool = False) -> list:
    """Submit the runs that are not done as job arrays (one per dependency wave); a wave waits
    for the jobs of the runs it grows from (afterok on SLURM; in order on the local executor)."""
    try:
        import submitit
    except ImportError:
        raise UserError(
            "mode=slurm needs submitit: pip install 'submitit>=1.5' (the [slurm] extra)"
        ) from None
    if cluster not in ("slurm", "local", None):
        raise UserError(f"cluster={cluster!r}: expected slurm or local")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "mode=slurm: no SLURM cluster here (sbatch is not on PATH); submit from a login node, or use mode=local "
            "(or cluster=local to try the job array on this machine)"
        )
    folder = Path(sweep.slurm.folder or sweep.out / "_slurm") / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = executor_parameters(sweep)
    executor.update_parameters(**params)
    nproc = max(1, sweep.slurm.gpus_per_node)
    submitted: dict[str, object] = {}
    all_jobs = []
    for wave in waves(sweep, runs):
        todo = [r for r in wave if state(sweep, r) != "done"]
        if not todo:
            continue
        deps = [submitted[r.grow.source] for r in todo if r.grow and r.grow.source in submitted]
        if deps and executor.cluster == "slurm":
            extra = {
                **params.get("slurm_additional_parameters", {}),
                "dependency": "afterok:" + ":".join(j.job_id for j in deps),
            }
            executor.update_parameters(slurm_additional_parameters=extra)
        elif deps:
            for j in deps:  # no scheduler to hold the jobs back: wait here
                j.result()
        jobs = executor.submit_array(
            [
                SlurmJob(
                    str(sweep.path),
                    r.name,
                    nproc,
                    sweep.slurm.nodes,
                    str(sweep.out),
                    sweep.slurm.signal_delay_s,
                )
                for r in todo
            ]
        )
        for r, j in zip(todo, jobs):
            submitted[r.name] = j
            print(f"submitted {r.name}: job {j.job_id}", flush=True)
        all_jobs += jobs
    if wait:
        for j in all_jobs:
            j.result()
    return all_jobs
