"""apps/pendulum.py (a DAE: singular mass matrix) under mpiexec: the quick run writes its
outputs and learns (the loss falls, g and c move toward the truth), and two ranks train exactly
as one does (the lam0 path's gradient is summed over the ranks too)."""
import json

import pytest

from conftest import ROOT, run_mpi

APP = ROOT / "apps" / "pendulum.py"
TRUE_G, TRUE_C = 9.81, 0.25
INITIAL_G, INITIAL_C = 6.0, 0.0          # the app's defaults


@pytest.mark.long
def test_pendulum_quick_two_ranks_learns(tmp_path):
    proc = run_mpi(2, APP, "--quick", "--no-progress", "--out", tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and metrics["args"]["quick"] is True
    assert metrics["true_g"] == TRUE_G and metrics["true_c"] == TRUE_C
    assert metrics["args"]["initial_g"] == INITIAL_G and metrics["args"]["initial_c"] == INITIAL_C
    assert metrics["first_loss"] > 20 * metrics["final_loss"], metrics["history"]
    # g closes at least three quarters of its gap, c half of its gap.
    assert abs(metrics["learned_g"] - TRUE_G) < abs(INITIAL_G - TRUE_G) / 4, metrics["learned_g"]
    assert abs(metrics["learned_c"] - TRUE_C) < abs(INITIAL_C - TRUE_C) / 2, metrics["learned_c"]
    # The learned model's held-out solve: on the algebraic row to Newton's tolerance, close to
    # the constraint x^2 + y^2 = L^2 (cn's O(h^2) drift) and to the data.
    assert metrics["held_out_max_algebraic_residual"] < 1e-10
    assert metrics["held_out_max_drift"] < 1e-2
    assert metrics["held_out_max_position_error"] < 0.1
    for name in ("trajectories.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.long
def test_pendulum_two_ranks_train_as_one(tmp_path):
    """The trajectories split over two ranks give the same iterates as all of them on one."""
    runs = {}
    for n in (1, 2):
        out = tmp_path / str(n)
        proc = run_mpi(n, APP, "--quick", "--iterations", "3", "--no-progress", "--out", out,
                       timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[n] = json.loads((out / "metrics.json").read_text())["history"]
    assert len(runs[1]) == len(runs[2]) == 3
    for one, two in zip(runs[1], runs[2]):
        for key in ("loss", "g", "c"):
            assert abs(one[key] - two[key]) <= 1e-12 * abs(one[key]), (key, one, two)
