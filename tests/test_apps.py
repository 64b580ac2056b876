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
    assert (tmp_path / "curves.png").stat().st_size > 1000


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


def _final_arrays(path):
    """Every dataset of a training-state file except the RNG states, as numpy arrays."""
    import h5py
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if hasattr(obj, "dtype") and not name.startswith("rng") else None)
    return out


def test_classify_killed_and_resumed_ends_bitwise_equal(tmp_path):
    """SIGKILL in the middle of training, damage the newest state file, resume with 'auto':
    the run falls back to the previous good state and ends with the parameters and optimizer
    state of an uninterrupted run, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time
    args = ["--epochs", "2", "--limit", "512", "--batch-size", "32", "--no-progress",
            "--save-every", "1"]
    whole = run_mpi(2, ROOT / "apps" / "classify.py", *args, "--out", tmp_path / "whole",
                    timeout=300)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    reference = json.loads((tmp_path / "whole" / "metrics.json").read_text())["training_state"]

    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, str(ROOT / "apps" / "classify.py"),
                             *args, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out / "state" / "state-0000000005.h5").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no state file appeared"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it was killed"
    states = sorted((out / "state").glob("state-*.h5"))
    newest = states[-1]
    newest.write_bytes(newest.read_bytes()[:2000])            # truncated, e.g. a full disk

    resumed = run_mpi(2, ROOT / "apps" / "classify.py", *args, "--out", out, "--resume", "auto",
                      timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"skipping {newest}" in resumed.stdout and "resumed from" in resumed.stdout
    final = json.loads((out / "metrics.json").read_text())["training_state"]
    a, b = _final_arrays(reference), _final_arrays(final)
    assert a.keys() == b.keys() and any(k.startswith("model/") for k in a)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
