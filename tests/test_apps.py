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


def test_classify_with_disk_checkpoints_trains_identically(tmp_path):
    """Binomial checkpoints on disk change memory, not the numbers: the losses equal those of
    the default run; --verbose reports the schedule; kept files are readable by pnode-inspect."""
    import subprocess
    import sys
    runs = {}
    for name, extra in (("default", []),
                        ("binomial", ["--checkpoint", "binomial", "--slots", "3",
                                      "--host-bytes", "0", "--disk-dir", tmp_path / "ckpt",
                                      "--keep-checkpoints", "--verbose"])):
        out = tmp_path / name
        proc = run_mpi(2, ROOT / "apps" / "classify.py", "--quick", "--no-progress",
                       "--epochs", "1", "--out", out, *extra, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[name] = json.loads((out / "metrics.json").read_text())["history"][-1]
    assert "recomputed_steps=" in proc.stdout and "checkpoint_schedule=binomial" in proc.stdout
    for key in ("train_loss", "test_loss"):
        assert abs(runs["binomial"][key] - runs["default"][key]) <= 1e-12 * runs["default"][key]
    files = sorted((tmp_path / "ckpt").iterdir())
    assert files and any("rank0001-of-0002" in f.name for f in files)
    inspect = subprocess.run([sys.executable, "-m", "pnode_dist.inspect", str(files[-1])],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert inspect.returncode == 0 and "method rk4" in inspect.stdout, inspect.stderr
