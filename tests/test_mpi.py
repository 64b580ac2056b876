"""MPI tests, each launched with mpiexec as a subprocess with a timeout (a hang fails)."""
from pathlib import Path

import pytest

from conftest import run_mpi

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("nranks", [2, pytest.param(3, marks=pytest.mark.long)])
def test_n_ranks_equal_one_rank(nranks):
    proc = run_mpi(nranks, HERE / "mpi" / "equivalence.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worst relative difference" in proc.stdout


@pytest.mark.parametrize("case,words", [
    ("nan", "NaN"), ("shape", "leading (batch) dimension"), ("times", "t differs between ranks"),
    ("method", "valid methods are"), ("blowup", "non-finite"),
    ("disk", "choose another Checkpointing(disk_dir")])
def test_bad_input_on_one_rank_raises_on_every_rank(case, words):
    proc = run_mpi(2, HERE / "mpi" / "bad_input.py", case, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "raised:" in ln]
    assert sorted(ln.split()[1] for ln in lines) == ["0", "1"], proc.stdout + proc.stderr
    assert all(words in ln for ln in lines), proc.stdout


def test_fixed_step_explicit_solve_does_not_communicate():
    proc = run_mpi(2, HERE / "mpi" / "no_communication.py", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no communication in the solve" in proc.stdout, proc.stdout


@pytest.mark.long
def test_checkpointed_gradients_on_three_ranks():
    proc = run_mpi(3, HERE / "mpi" / "checkpointing.py", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "files left 0" in proc.stdout, proc.stdout


def test_torchdiffeq_style_calls_on_several_ranks():
    proc = run_mpi(3, HERE / "mpi" / "compat.py", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worst relative difference" in proc.stdout
    assert "second derivatives refused on every rank" in proc.stdout, proc.stdout


@pytest.mark.parametrize("nranks, method", [(2, "dopri5"), (2, "rk4"), (2, "cn"),
                                            *(pytest.param(3, m, marks=pytest.mark.long)
                                              for m in ("dopri5", "cn"))])
def test_events_on_several_ranks_equal_one_rank(nranks, method):
    proc = run_mpi(nranks, HERE / "mpi" / "events.py", method, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worst relative difference" in proc.stdout, proc.stdout
    for case in ("event_fn failure", "event_fn failure in the retaken step",
                 "event_fn NaN in the retaken step", "tangential crossing",
                 "loss without the event"):
        assert f"{case} raised on every rank" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("nranks", [2, pytest.param(3, marks=pytest.mark.long)])
def test_events_on_a_grid_equal_the_whole_field(nranks):
    proc = run_mpi(nranks, HERE / "mpi" / "grid_events.py", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"grid events on {nranks} ranks" in proc.stdout, proc.stdout
