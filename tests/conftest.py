"""Shared test helpers: small float64 right-hand sides and an mpiexec launcher with a timeout."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


class TimeMLP(nn.Module):
    """f(t, y) = W2 tanh(W1 y + t c + b1) + b2: non-linear, time-dependent, all parameters used."""

    def __init__(self, dim=3, hidden=8, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(dim, hidden, dtype=dtype)
        self.l2 = nn.Linear(hidden, dim, dtype=dtype)
        self.c = nn.Parameter(torch.randn(hidden, generator=g, dtype=dtype) * 0.3)
        with torch.no_grad():
            for p in (self.l1.weight, self.l1.bias, self.l2.weight, self.l2.bias):
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y) + t * self.c))


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped unless torch sees a GPU and PETSc is built with CUDA."""
    import torch
    from pnode_dist.testing import petsc_has_cuda
    if torch.cuda.is_available() and petsc_has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a PETSc built with CUDA "
                                   "(make setup GPU=1)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _same_random_numbers_in_any_order():
    """Every test starts from the same global RNG state, so that its random inputs do not
    depend on which tests ran before it (a test once passed or failed with the suite's order)."""
    torch.manual_seed(0)


@pytest.fixture
def mlp():
    return TimeMLP()


@pytest.fixture
def y0():
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs: a disk that fills up (needs root; skipped otherwise), unmounted after."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({proc.stderr.strip() or 'not root'})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def run_mpi(nranks, script, *args, timeout=240, env=None):
    """Run `python script args` under `mpiexec -n nranks` in its own process group (extra
    environment variables in `env`); a hang is killed (whole group) and becomes a test failure
    instead of a stuck CI."""
    cmd = ["mpiexec", "-n", str(nranks), sys.executable, str(script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {timeout}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def recorded_steps(*args, **kwargs):
    """pnode_dist.testing.recorded_steps (imported when first used: after the test session's
    PETSc set-up)."""
    from pnode_dist.testing import recorded_steps as record
    return record(*args, **kwargs)


def central_difference(loss, param, idx, eps=1e-6):
    """(loss(param[idx] + eps) - loss(param[idx] - eps)) / (2 eps), param restored after."""
    with torch.no_grad():
        param[idx] += eps
        up = loss().item()
        param[idx] -= 2 * eps
        down = loss().item()
        param[idx] += eps
    return (up - down) / (2 * eps)


def mpi_batch_problem(comm, batch=8):
    """The global problem the MPI scripts share: `batch` rows split unevenly over the ranks of
    comm. Returns (rows per rank, this rank's lo, hi, the whole batch y [batch, 3], times t)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    counts = [batch // size + (1 if r < batch % size else 0) for r in range(size)]
    lo = sum(counts[:rank])
    y_all = torch.randn(batch, 3, generator=torch.Generator().manual_seed(7),
                        dtype=torch.float64)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    return counts, lo, lo + counts[rank], y_all, t


def state_arrays(path):
    """Every dataset of a training-state file except the RNG states, as numpy arrays."""
    import h5py
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if hasattr(obj, "dtype") and not name.startswith("rng") else None)
    return out


def assert_same_state(path_a, path_b):
    """Model and optimizer datasets of two training states are equal bit for bit."""
    a, b = state_arrays(path_a), state_arrays(path_b)
    assert a.keys() == b.keys() and any(k.startswith("model/") for k in a)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


# A classifier run short enough for tests that stop and resume it (32 iterations).
RESUME_ARGS = ("--epochs", "2", "--limit", "512", "--batch-size", "32", "--no-progress",
               "--save-every", "1")


@pytest.fixture(scope="session")
def classify_reference(tmp_path_factory):
    """Final training state of an uninterrupted classify.py RESUME_ARGS run on 2 ranks."""
    import json
    out = tmp_path_factory.mktemp("classify-reference")
    proc = run_mpi(2, ROOT / "apps" / "classify.py", *RESUME_ARGS, "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "metrics.json").read_text())["training_state"]


class ConvField(nn.Module):
    """A field right-hand side dy/dt = conv(tanh(conv(y) + t)) on 1-D/2-D/3-D grids: 3-wide
    kernels twice, so a receptive-field radius of 2; zero or circular padding."""

    def __init__(self, ndim, channels, periodic, seed):
        super().__init__()
        torch.manual_seed(seed)
        mode = "circular" if periodic else "zeros"
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
        self.a = conv(channels, 4, 3, padding=1, padding_mode=mode, dtype=torch.float64)
        self.b = conv(4, channels, 3, padding=1, padding_mode=mode, dtype=torch.float64)

    def forward(self, t, y):
        return self.b(torch.tanh(self.a(y) + t))


class Extended(nn.Module):
    """The one-rank meaning of a grid solve: func on the field extended by `halo` cells (zeros,
    or the wrapped-around field when periodic), interior kept."""

    def __init__(self, func, ndim, halo, periodic):
        super().__init__()
        self.func, self.ndim, self.halo, self.periodic = func, ndim, halo, periodic

    def forward(self, t, y):
        h = self.halo
        padded = nn.functional.pad(y, (h, h) * self.ndim,
                                   mode="circular" if self.periodic else "constant")
        return self.func(t, padded)[(Ellipsis,) + (slice(h, -h),) * self.ndim]
