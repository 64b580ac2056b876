"""Faults injected on one rank (tests/mpi/faults.py): every case ends promptly, as an error on
every rank or an aborted job naming the cause; never a hang or a wrong gradient."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_mpi

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "mpi" / "faults.py"


@pytest.fixture
def full_disk(small_tmpfs):
    """A tmpfs with less free space than one checkpoint write needs."""
    with open(small_tmpfs / "filler", "wb") as f:             # leave about 512 KiB free
        f.write(bytes((2 << 20) - (512 << 10)))
    return small_tmpfs


# make test: one explicit and one implicit method; the long tests: every method, and 3 ranks
# on this machine's 2 cores with explicit methods only (implicit ones communicate in every
# Newton iteration, and oversubscribed ranks take turns: minutes).
@pytest.mark.parametrize("nranks,methods,cases", [
    (2, "dopri5,cn", 60), pytest.param(2, "", 150, marks=pytest.mark.long),
    pytest.param(3, "rk4,dopri5", 60, marks=pytest.mark.long)])
def test_faults_on_one_rank_raise_on_every_rank(full_disk, nranks, methods, cases):
    proc = run_mpi(nranks, SCRIPT, "collective", timeout=300,
                   env={"PNODE_TEST_FULL_DIR": str(full_disk), "PNODE_TEST_METHODS": methods})
    assert proc.returncode == 0 and "all cases passed" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("case ") >= cases, proc.stdout
    assert os.listdir(full_disk) == ["filler"]


@pytest.mark.parametrize("case,words", [
    ("keyboard", ["pnode_dist: rank 1 of 2 was interrupted (KeyboardInterrupt",
                  "ending the MPI job"]),
    ("uncaught", ["a bug in the user's script", "rank 1 of 2", "aborting the MPI job"]),
    ("lone-backward", ["different points", "backward of odeint call 1", "exiting"]),
])
def test_failure_on_one_rank_ends_the_job(case, words):
    start = time.perf_counter()
    proc = run_mpi(2, SCRIPT, case, timeout=60)
    seconds = time.perf_counter() - start
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert all(w in proc.stderr for w in words), proc.stdout + proc.stderr
    assert "was not interrupted" not in proc.stdout
    assert seconds < 30, seconds


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_signal_to_one_rank_ends_the_job_and_leaves_no_files(tmp_path, name):
    """A signal to rank 1 of 2 mid-training, with disk checkpoints open on both ranks: the job
    ends within seconds, with one line naming the signal (SIGKILL: the launcher's report), no
    PETSc crash banner or MPI assertion, and no checkpoint file left in the disk folder (the
    launcher kills the other rank: its files have no name to leave)."""
    disk, pidfile = tmp_path / "disk", tmp_path / "pid"
    disk.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PNODE_TEST_DISK=str(disk), PNODE_TEST_PIDFILE=str(pidfile))
    proc = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, str(SCRIPT), "signalled"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not pidfile.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        os.kill(int(pidfile.read_text()), getattr(signal, name))
        start = time.perf_counter()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert time.perf_counter() - start < 15
    assert proc.returncode != 0 and "was not interrupted" not in out, out + err
    ours = [line for line in err.splitlines() if "pnode_dist" in line]
    expected = {"SIGTERM": ["pnode_dist: rank 1 of 2 received SIGTERM; ending the MPI job"],
                "SIGINT": ["pnode_dist: rank 1 of 2 was interrupted (KeyboardInterrupt: SIGINT "
                           "or Ctrl-C); ending the MPI job"], "SIGKILL": []}[name]
    assert ours == expected, err
    assert "PETSC ERROR" not in err and "Assertion" not in err and "Traceback" not in err, err
    assert list(disk.iterdir()) == []
