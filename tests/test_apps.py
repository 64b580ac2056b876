"""The apps under mpiexec -n 2: --quick modes train, evaluate and write their metrics and
plots; a killed or signalled run resumes to the uninterrupted run's state, bit for bit."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RESUME_ARGS, ROOT, assert_same_state, run_mpi
from pnode_dist.training import state as training_state


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


def test_classify_learns_on_a_small_budget(tmp_path):
    """Learning happens: 640 digits, 6 epochs (seconds): the test loss falls at least 3-fold
    from the first epoch's and the accuracy passes 60% (chance: 10%)."""
    proc = run_mpi(2, ROOT / "apps" / "classify.py", "--limit", "640", "--epochs", "6",
                   "--no-progress", "--out", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert history[-1]["test_loss"] < history[0]["test_loss"] / 3, history
    assert history[-1]["test_accuracy"] > 0.6, history


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


@pytest.mark.long
def test_stiff_quick_two_ranks_learns_the_rate_constants(tmp_path):
    """Learning happens on the quick budget: L-BFGS cuts the log-species loss at least
    100-fold in 7 iterations and brings every log rate constant at least 4x closer to the
    truth than its start (7-12x off); the stiffness report shows explicit dopri5 failing."""
    proc = run_mpi(2, ROOT / "apps" / "stiff.py", "--quick", "--out", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["final_loss"] < metrics["first_loss"] / 100, metrics["history"]
    for learned, start, true in zip(metrics["rate_constants"], metrics["initial_rate_constants"],
                                    metrics["true_rate_constants"]):
        assert abs(math.log(learned / true)) < abs(math.log(start / true)) / 4
    assert len(metrics["held_out_relative_error"]) == 3
    cmp = metrics["stiffness"]
    assert cmp["dopri5"]["steps"] > 50 * cmp["cn"]["steps"]          # stiffness shows
    assert cmp["dopri5"]["max_scaled_error"] <= cmp["cn"]["max_scaled_error"]
    assert "max_num_steps" in metrics["explicit_on_learned_model"]["failed"]
    assert (tmp_path / "fit.png").exists()


@pytest.mark.long
def test_stiff_mlp_model_learns(tmp_path):
    """The black-box model trains too (Adam): its loss falls at least 2-fold in 12 iterations."""
    proc = run_mpi(2, ROOT / "apps" / "stiff.py", "--quick", "--model", "mlp", "--out", tmp_path,
                   timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "mlp" and "rate_constants" not in metrics
    assert metrics["final_loss"] < metrics["first_loss"] / 2, metrics["history"]


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


def _start_classify(out):
    """classify.py with RESUME_ARGS under mpiexec -n 2, in its own process group."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(["mpiexec", "-n", "2", sys.executable,
                             str(ROOT / "apps" / "classify.py"), *RESUME_ARGS, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_state(out, iteration, proc, timeout=240):
    path = out / "state" / f"state-{iteration:010d}.h5"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no state file appeared"
        time.sleep(0.005)


def test_classify_killed_and_resumed_ends_bitwise_equal(tmp_path, classify_reference):
    """SIGKILL in the middle of training, damage the newest state file, resume with 'auto':
    the run falls back to the previous good state and ends with the parameters and optimizer
    state of an uninterrupted run, bit for bit."""
    out = tmp_path / "killed"
    proc = _start_classify(out)
    _wait_for_state(out, 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (out / "metrics.json").exists(), "the run finished before it was killed"
    newest = sorted((out / "state").glob("state-*.h5"))[-1]
    newest.write_bytes(newest.read_bytes()[:2000])            # truncated, e.g. a full disk

    resumed = run_mpi(2, ROOT / "apps" / "classify.py", *RESUME_ARGS, "--out", out,
                      "--resume", "auto", timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"skipping {newest}" in resumed.stdout and "resumed from" in resumed.stdout
    assert_same_state(classify_reference,
                      json.loads((out / "metrics.json").read_text())["training_state"])


def test_classify_killed_before_its_first_save_runs_again(tmp_path, classify_reference):
    """SIGKILL as soon as the run has claimed OUT (it holds only .pnode-run and state/.lock):
    the same command runs again, takes OUT over and ends as an uninterrupted run, bit for bit."""
    out = tmp_path / "early"
    proc = _start_classify(out)
    deadline = time.monotonic() + 120
    while not (out / ".pnode-run").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "OUT was never claimed"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not list((out / "state").glob("state-*.h5")), "the run saved a state first"

    again = run_mpi(2, ROOT / "apps" / "classify.py", *RESUME_ARGS, "--out", out, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "left no results there; this run takes it over" in again.stdout, again.stdout
    assert_same_state(classify_reference,
                      json.loads((out / "metrics.json").read_text())["training_state"])


@pytest.mark.parametrize("name", [pytest.param("SIGTERM", marks=pytest.mark.long), "SIGUSR1"])
def test_stop_signal_saves_state_and_resume_ends_bitwise_equal(tmp_path, classify_reference,
                                                               name):
    """SIGTERM/SIGUSR1 to mpiexec (forwarded to every rank): the app saves its state at the next
    iteration, says so, exits without metrics; --resume auto then ends as the uninterrupted run."""
    out = tmp_path / "stopped"
    proc = _start_classify(out)
    _wait_for_state(out, 3, proc)
    os.kill(proc.pid, getattr(signal, name))
    log, _ = proc.communicate(timeout=120)
    match = re.search(r"stop signal \((\w+)\): state saved to (\S+) at iteration (\d+)", log)
    assert match and match.group(1) == name, log
    assert not (out / "metrics.json").exists()
    assert Path(match.group(2)).name == f"state-{int(match.group(3)):010d}.h5"
    assert training_state.verify(match.group(2)) is None

    resumed = run_mpi(2, ROOT / "apps" / "classify.py", *RESUME_ARGS, "--out", out,
                      "--resume", "auto", timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {match.group(2)}" in resumed.stdout
    assert_same_state(classify_reference,
                      json.loads((out / "metrics.json").read_text())["training_state"])


@pytest.mark.parametrize("data,trace", [("8gaussians", "exact"), ("breast-cancer", "hutchinson")])
def test_cnf_quick_two_ranks(tmp_path, data, trace):
    proc = run_mpi(2, ROOT / "apps" / "cnf.py", "--quick", "--no-progress", "--data", data,
                   "--out", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and metrics["trace"] == trace
    history = metrics["history"]
    assert len(history) == 2 and history[-1]["test_nll"] < history[0]["test_nll"]
    dim = metrics["dim"]
    assert metrics["test_bits_per_dim"] == pytest.approx(
        metrics["test_nll_nats"] / (dim * math.log(2)))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "density.png").exists() == (dim == 2)
    assert training_state.verify(metrics["training_state"]) is None


@pytest.mark.long
def test_cnf_learns_8gaussians_toward_the_true_density(tmp_path):
    """Learning happens on a small budget: in 250 iterations the held-out gap to the true
    density's NLL (on the same points) falls at least 4-fold from the first evaluation's. The
    true density's entropy by Monte Carlo agrees with that of eight separated Gaussians of std
    0.2, log 8 + 1 + log(2 pi 0.04)."""
    proc = run_mpi(2, ROOT / "apps" / "cnf.py", "--iterations", "250", "--eval-every", "25",
                   "--no-progress", "--out", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    true_nll = metrics["true_nll_nats"]
    gaps = [h["test_nll"] - true_nll for h in metrics["history"]]
    assert gaps[-1] < gaps[0] / 4, gaps
    assert metrics["nll_gap_nats"] == pytest.approx(metrics["test_nll_nats"] - true_nll)
    separated = math.log(8) + 1 + math.log(2 * math.pi * 0.04)
    assert abs(metrics["true_entropy_nats"] - separated) < 5 * metrics["true_entropy_stderr"]


def test_classify_two_blocks_take_their_own_method_and_options(tmp_path):
    """--blocks 2: block 1 fixed-step rk4, block 2 adaptive dopri5; a PETSc option with block
    2's prefix (a maximum step of 0.05) changes block 2's solve only."""
    args = ["--quick", "--no-progress", "--epochs", "1", "--blocks", "2", "--method", "rk4",
            "dopri5", "--steps", "4", "0", "--verbose"]
    steps = {}
    for name, extra in (("free", []), ("limited", ["-ode2_ts_adapt_dt_max", "0.05"])):
        proc = run_mpi(2, ROOT / "apps" / "classify.py", *args, "--out", tmp_path / name, *extra,
                       timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        steps[name] = [int(n) for n in re.findall(r"ODE block \d: steps=(\d+) ", proc.stdout)]
    assert steps["free"][0] == steps["limited"][0] == 4
    assert steps["free"][1] < 20 <= steps["limited"][1]
    metrics = json.loads((tmp_path / "free" / "metrics.json").read_text())
    assert metrics["method"] == ["rk4", "dopri5"] and metrics["steps"] == [4, 0]
    bad = run_mpi(1, ROOT / "apps" / "classify.py", "--blocks", "2", "--steps", "1", "2", "3",
                  timeout=60)
    assert bad.returncode == 2 and "one per block" in bad.stderr


@pytest.mark.long
def test_cnf_stopped_and_resumed_ends_bitwise_equal(tmp_path):
    """The CNF draws its batches and Hutchinson noise on each rank from that rank's generator:
    a run stopped by SIGUSR1 and resumed restores every rank's RNG and ends bit-identical."""
    args = ["--iterations", "40", "--eval-every", "15", "--test-size", "500", "--hidden", "32",
            "--no-progress", "--data", "pinwheel", "--trace", "hutchinson", "--save-every", "1"]
    whole = run_mpi(2, ROOT / "apps" / "cnf.py", *args, "--out", tmp_path / "whole", timeout=300)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    out = tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, str(ROOT / "apps" / "cnf.py"),
                             *args, "--out", str(out)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    _wait_for_state(out, 5, proc)
    os.kill(proc.pid, signal.SIGUSR1)
    log, _ = proc.communicate(timeout=120)
    assert "stop signal (SIGUSR1)" in log and not (out / "metrics.json").exists(), log
    resumed = run_mpi(2, ROOT / "apps" / "cnf.py", *args, "--out", out, "--resume", "auto",
                      timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    final = [json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", out)]
    assert_same_state(final[0]["training_state"], final[1]["training_state"])
    assert final[0]["history"] == [{**h, "seconds": final[0]["history"][i]["seconds"]}
                                   for i, h in enumerate(final[1]["history"])]


@pytest.mark.parametrize("dataset", [pytest.param("fashion-mnist", marks=pytest.mark.long),
                                     "mnist5k"])
def test_classify_real_datasets_quick(tmp_path, dataset):
    proc = run_mpi(2, ROOT / "apps" / "classify.py", "--quick", "--no-progress", "--dataset",
                   dataset, "--epochs", "1", "--out", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dataset"] == dataset and 0.0 <= metrics["final_test_accuracy"] <= 1.0
    assert "train=256" in proc.stdout and ("test=10000" in proc.stdout) == (dataset == "fashion-mnist")


def test_resume_from_a_damaged_file_is_a_clear_error(tmp_path):
    damaged = tmp_path / "state-0000000003.h5"
    damaged.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    for path, why in ((damaged, "truncated"), (tmp_path / "missing.h5", "no such file")):
        proc = run_mpi(2, ROOT / "apps" / "stiff.py", "--quick", "--out", tmp_path,
                       "--resume", path, timeout=120)
        assert proc.returncode == 2 and f"{path}: " in proc.stderr and why in proc.stderr, \
            proc.stderr
        assert proc.stderr.count("error:") == 1            # reported once, by rank 0


def test_pde_quick_two_ranks_learns(tmp_path):
    """20 iterations: the held-out error falls 4x below the untrained model's (measured 6.3x)
    and u's stencil, learned from zero, closes 40% of its gap to D/dx^2 Laplacian (measured
    64%)."""
    proc = run_mpi(2, ROOT / "apps" / "pde.py", "--quick", "--no-progress", "--out", tmp_path,
                   timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and metrics["local_shape"] == [2, 32, 64]
    assert metrics["stencil"] == "cross" and metrics["reaction"] == "equivariant"
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["held_out_relative_error"] < metrics["initial_held_out_relative_error"] / 4
    assert metrics["stencil_relative_error"] < 0.6, metrics["learned_stencil_u"]
    assert (tmp_path / "fields.png").exists() and (tmp_path / "curves.png").exists()


def test_pde_field_over_one_ranks_budget_runs_on_two(tmp_path):
    """A 128^2 field (256 KiB per state) against a 200 kB per-rank budget: refused on one rank
    with an error that says what to do, trained on two (128 KiB patches)."""
    args = ["--grid", "128", "--host-bytes", "200000", "--quick", "--iterations", "2",
            "--window", "1", "--snapshots", "5", "--no-progress"]
    one = run_mpi(1, ROOT / "apps" / "pde.py", *args, "--out", tmp_path / "one", timeout=120)
    assert one.returncode == 2 and "needs more ranks for this budget" in one.stderr, one.stderr
    two = run_mpi(2, ROOT / "apps" / "pde.py", *args, "--out", tmp_path / "two", "--verbose",
                  timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["state_bytes_per_rank"] == 131072 < 200000
    assert "checkpoint_schedule=binomial  checkpoint_slots=1" in two.stdout, two.stdout
