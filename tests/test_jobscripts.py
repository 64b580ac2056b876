"""The SLURM job scripts, submitted to a real single-node SLURM started for these tests: every
app's quick job completes with both launchers, writes its outputs under a per-job directory,
and a job told to stop before its time limit saves, requeues itself and resumes exactly."""
import json
import shutil
import time

import pytest

from conftest import RESUME_ARGS, ROOT, assert_same_state
from pnode_dist.training import state as training_state
from slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.long        # minutes: SLURM daemons and an app per job (make test-long)

JOBS = ROOT / "jobscripts"


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = SlurmCluster()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    cluster.start()
    yield cluster
    cluster.stop()


def _submit(slurm, tmp_path, script, *args, launcher="srun", options=()):
    env = {"PNODE_RUNS": str(tmp_path), "PNODE_LAUNCHER": launcher}
    return slurm.sbatch(JOBS / script, *args, cwd=ROOT, env=env,
                        options=("--ntasks=2", f"--output={tmp_path}/slurm-%j.out", *options))


def _log(tmp_path, job_id):
    return (tmp_path / f"slurm-{job_id}.out").read_text()


@pytest.mark.parametrize("script,app,launcher,options", [
    ("classify.sbatch", "classify", "srun", ()),
    ("cnf.sbatch", "cnf", "mpiexec", ()),
    ("stiff.sbatch", "stiff", "srun", ()),
    ("pendulum.sbatch", "pendulum", "mpiexec", ()),
    ("pde.sbatch", "pde", "srun", ("--nodes=1", "--ntasks-per-node=2")),
    # The two-node script on this one node: its launch and requeue logic, not two nodes.
    ("classify-multinode.sbatch", "classify", "mpiexec", ("--nodes=1", "--ntasks-per-node=2")),
])
def test_quick_job_completes(slurm, tmp_path, script, app, launcher, options):
    job = _submit(slurm, tmp_path, script, "--quick", launcher=launcher, options=options)
    info = slurm.wait(job, timeout=240)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    out = tmp_path / f"{app}-{job}"
    assert f"with 2 ranks via {launcher}" in log and f"{app} finished" in log, log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and metrics["args"]["quick"] is True
    assert (out / "curves.png").exists()
    assert training_state.verify(metrics["training_state"]) is None
    assert "no training state" in log                  # --resume auto on a first start


def test_stopped_job_requeues_and_resumes_exactly(slurm, tmp_path, classify_reference):
    """SIGUSR1 to the batch script (what --signal=B:USR1@90 sends before the time limit): the
    app saves its state, the job requeues itself, its second start resumes, and the final
    parameters and optimizer state equal an uninterrupted run's bit for bit."""
    job = _submit(slurm, tmp_path, "classify.sbatch", *RESUME_ARGS)
    state_dir = tmp_path / f"classify-{job}" / "state"
    deadline = time.monotonic() + 240
    while not list(state_dir.glob("state-*.h5")):
        assert time.monotonic() < deadline, slurm.job(job)
        time.sleep(0.05)
    slurm.signal_batch_script(job, "USR1")
    info = slurm.wait(job, timeout=300)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "requeueing job" in log and "resumed from" in log and "stop signal" in log, log
    metrics = json.loads((tmp_path / f"classify-{job}" / "metrics.json").read_text())
    assert_same_state(classify_reference, metrics["training_state"])


FAIL_FIRST = """\
import os, sys, time
if os.environ["SLURM_PROCID"] == "1":
    sys.exit(3)
time.sleep(120)                     # rank 0 would go on: srun ends it when rank 1 fails
"""


def test_failed_task_gives_the_job_its_status(slurm, tmp_path):
    """One task fails (status 3) while the other runs on: srun ends that one with SIGTERM and
    itself reports 143, the highest status. run_app.sh gives the job the failure's own status."""
    submit = tmp_path / "submit"
    (submit / "apps").mkdir(parents=True)
    (submit / "jobscripts").mkdir()
    (submit / "apps" / "fail_first.py").write_text(FAIL_FIRST)
    shutil.copy(JOBS / "run_app.sh", submit / "jobscripts")
    (submit / "job.sbatch").write_text('#!/bin/bash\nexec jobscripts/run_app.sh fail_first\n')
    env = {"PNODE_RUNS": str(tmp_path), "PNODE_VENV": str(ROOT / ".venv")}
    job = slurm.sbatch(submit / "job.sbatch", cwd=submit, env=env,
                       options=("--ntasks=2", f"--output={tmp_path}/slurm-%j.out"))
    info = slurm.wait(job, timeout=120)
    log = _log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", log
    assert "failed with status 3" in log and "(status 143)" in log, log
    assert not (tmp_path / f"fail_first-{job}" / ".exit-codes").exists()
