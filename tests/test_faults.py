"""Faults injected on one rank (tests/mpi/faults.py): every case ends promptly, as an error on
every rank or an aborted job naming the cause; never a hang or a wrong gradient."""
import os
import time
from pathlib import Path

import pytest

from conftest import run_mpi

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
    ("keyboard", ["KeyboardInterrupt", "rank 1 of 2", "aborting the MPI job"]),
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
