"""The main job's --quick mode under mpiexec -n 2 trains, evaluates and writes its metrics."""
import json

from conftest import ROOT, run_mpi


def test_classify_quick_two_ranks(tmp_path):
    proc = run_mpi(2, ROOT / "apps" / "classify.py", "--quick", "--no-progress",
                   "--out", tmp_path, "--epochs", "2", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and len(metrics["history"]) == 2
    first, last = metrics["history"][0], metrics["history"][-1]
    assert last["test_loss"] < first["test_loss"] < 2.5      # it learns (chance is ln 10 = 2.30)
    assert proc.stdout.count("epoch ") >= 2


def test_classify_reports_missing_dataset(tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, FASHION_MNIST_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "apps/classify.py", "--dataset", "fashion-mnist",
                           "--quick"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in proc.stderr


def test_stiff_quick_two_ranks(tmp_path):
    proc = run_mpi(2, ROOT / "apps" / "stiff.py", "--quick", "--out", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["final_loss"] < metrics["first_loss"]
    cmp = metrics["stiffness"]
    assert cmp["dopri5"]["steps"] > 50 * cmp["cn"]["steps"]          # stiffness shows
    assert cmp["dopri5"]["max_scaled_error"] <= cmp["cn"]["max_scaled_error"]
    assert (tmp_path / "fit.png").exists()
