"""Time limits and preemption on a real SLURM cluster (tests/slurm_cluster.py): ``slurm/train.sbatch`` runs the
quick start (tests/resume_harness.py: 8 steps, a checkpoint every 3), which is preempted twice and requeued:

1. in step 2, ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1@120`` does before a time limit): the
   batch script passes the signal to the tasks, the ranks finish step 2, checkpoint it, exit 75, and the
   script runs ``scontrol requeue``;
2. the requeued job resumes from step 2; in step 5, SIGTERM to the tasks (``scancel --signal=TERM``, what a
   preemption sends): the same again from step 5;
3. the job, requeued a second time, resumes from step 5 and finishes: COMPLETED, not requeued again.

A test-only hook (SEQPAR_FAULT_HOLD_AT_STEP, seqpar/train/faults.py) holds the ranks inside steps 2 and 5
until the signal arrives, so the signal lands mid-step at a known step. SLURM holds a requeued job for its
credential lifetime + 1 s before it may start again (BeginTime; 121 s by default): the test cluster sets
``cred_expire`` to 10 s (tests/slurm_cluster.py; 20 s before, which only made the suite wait longer) rather
than forcing an earlier start, which raced SLURM's credential revocation and killed the requeued job.

The job's losses and final weights equal the uninterrupted run's (tests/conftest.py), every step is in
metrics.jsonl and in the one offline wandb run exactly once, in order, and the log holds all three runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.resume_harness import (
    OVERRIDES,
    QUICK,
    ROOT,
    STEPS,
    adapter,
    clean_env,
    max_difference,
    metrics,
    wandb_history,
)
from tests.slurm_cluster import CRED_EXPIRE_S


def until(what: str, check, timeout: float = 300, show=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"waited {timeout:.0f}s for {what}" + (f"; last seen: {show()}" if show else ""))


def _running(state: dict) -> bool:
    """True once the requeued job runs (after SLURM's requeue hold: ``CRED_EXPIRE_S`` + 1 s here)."""
    if state.get("JobState") in ("FAILED", "CANCELLED", "COMPLETED", "NODE_FAIL"):
        raise AssertionError(f"the requeued job ended before it ran again: {state}")
    return state.get("JobState") == "RUNNING"


def test_preempted_job_is_requeued_and_resumes_without_losing_or_repeating_a_step(
        slurm_cluster, tmp_path, quickstart_reference):
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm_cluster.env, **clean_env(PYTHON=sys.executable, NPROC_PER_NODE="2", WANDB_MODE="offline",
                                            SEQPAR_FAULT_HOLD_AT_STEP="2,5")}
    cmd = ["sbatch", "--parsable", "--nodes=1", f"--cpus-per-task={os.cpu_count()}", "--time=10",
           "--gpus-per-node=0", f"--output={log}", f"--chdir={tmp_path}", str(ROOT / "slurm" / "train.sbatch"),
           str(QUICK), f"trainer.output_dir={out}", *OVERRIDES, "logging.wandb=true", "launch.device=cpu"]
    sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, f"sbatch refused the script: {sub.stderr}"
    job = int(sub.stdout.strip().split(";")[0])
    text = lambda: log.read_text() if log.exists() else ""  # noqa: E731
    figures = []
    try:
        for restart, (step, signal_args) in enumerate([(2, ["--signal=USR1", "--batch"]), (5, ["--signal=TERM"])]):
            until(f"the ranks to hold in step {step}", lambda s=step: f"holds in step {s} " in text(), timeout=600)
            t0 = time.monotonic()
            subprocess.run(["scancel", *signal_args, str(job)], env=env, check=True, timeout=30)
            state = until(f"requeue {restart + 1}", lambda r=restart: (lambda s: s if s.get("JobState") == "PENDING"
                          and s.get("Restarts") == str(r + 1) else None)(slurm_cluster.job_state(job)))
            t_requeued = time.monotonic()
            assert state.get("Reason") in ("BeginTime", "None"), state  # None: before SLURM sets the hold
            until(f"restart {restart + 1} to run", lambda: _running(slurm_cluster.job_state(job)),
                  timeout=CRED_EXPIRE_S + 120, show=lambda: slurm_cluster.job_state(job))
            figures.append((step, t_requeued - t0, time.monotonic() - t0))
        final = slurm_cluster.wait(job, timeout=400)
    finally:
        subprocess.run(["scancel", str(job)], env=env, timeout=30)
    log_text = text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", f"{final}\n{log_text[-6000:]}"
    assert final["Restarts"] == "2", final  # requeued twice, not a third time after finishing
    for step, restart in ((2, 1), (5, 2)):
        assert f"preempted after step {step}, checkpoint written: requeueing job {job}" in log_text, log_text[-6000:]
        assert f"requeued (restart {restart}): resuming" in log_text, log_text[-6000:]
        assert f"step-{step:08d} at step {step}" in log_text, log_text[-6000:]  # resumed right after it
    assert "SIGUSR1: passing it to the tasks" in log_text  # the batch script got USR1 and forwarded it
    for step, requeued, running in figures:
        print(f"signal in step {step} -> job requeued {requeued:.1f}s -> requeued job running {running:.1f}s "
              f"(SLURM's requeue hold: {CRED_EXPIRE_S + 1} s here, 121 s by default); steps lost: 0 (the step in "
              "flight is completed)")

    got, want = metrics(out), metrics(quickstart_reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # every step once, in order
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want))
    weights = max_difference(adapter(out), adapter(quickstart_reference))
    print(f"preempted twice under SLURM vs uninterrupted: max |loss diff| {worst:.2e}, max |weight diff| {weights:.2e}")
    assert worst <= 1e-6 and weights <= 1e-6
    rows = wandb_history(out)
    run_id = (out / "wandb" / "run_id").read_text().strip()
    assert [(r, s) for r, s, _ in rows] == [(run_id, s) for s in range(1, STEPS + 1)]  # one run, each step once
    assert [loss for *_, loss in rows] == [r["loss"] for r in got]


FAKE_PYTHON = """#!/bin/bash
# Stands in for `python -m torch.distributed.run ... -m seqpar train`: FAKE_MODE says how the run ends.
case "$FAKE_MODE" in
  finish) exit 0 ;;
  fail) exit 1 ;;
  signal) trap 'echo 3 > "$SEQPAR_PREEMPTED_FILE"; exit 75' TERM USR1
          echo "fake: running"
          for _ in $(seq 600); do sleep 0.1; done ;;
esac
"""


def test_jobs_that_finish_fail_or_are_cancelled_are_not_requeued(slurm_cluster, tmp_path):
    """The requeue rule of slurm/train.sbatch, with a stand-in for the trainer (seconds, not minutes): only a
    run stopped by a signal is requeued, not one that finished or failed, nor a cancelled one (scancel's
    SIGTERM makes the trainer checkpoint and exit 75 too)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    jobs = {}
    for mode in ("finish", "fail", "signal"):
        env = {**slurm_cluster.env, **clean_env(PYTHON=str(fake), NPROC_PER_NODE="1", FAKE_MODE=mode)}
        sub = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--time=5", "--gpus-per-node=0",
                              f"--output={tmp_path / mode}.out", f"--chdir={tmp_path}",
                              str(ROOT / "slurm" / "train.sbatch"), str(QUICK)],
                             env=env, capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0, sub.stderr
        jobs[mode] = int(sub.stdout.strip().split(";")[0])
    log = tmp_path / "signal.out"
    until("the stand-in to run", lambda: log.exists() and "fake: running" in log.read_text(), timeout=120)
    subprocess.run(["scancel", str(jobs["signal"])], env=slurm_cluster.env, check=True, timeout=30)
    want = {"finish": ("COMPLETED", "0:0"), "fail": ("FAILED", "1:0"), "signal": ("CANCELLED", None)}
    for mode, job in jobs.items():
        state = slurm_cluster.wait(job, timeout=60)
        text = (tmp_path / f"{mode}.out").read_text()
        assert (state["JobState"], state["ExitCode"] if want[mode][1] else None) == want[mode], f"{state}\n{text}"
        assert state["Restarts"] == "0" and "requeueing" not in text, f"{state}\n{text}"
    assert "stopped after step 3 with a checkpoint; the job is ending (COMPLETING, e.g. scancel): not requeued" in \
        log.read_text()
