"""Failed solves release what they held (lifetime.py): after solves in which func raises, in the
forward or in the backward pass, followed by good solves, no Integrator, tensor or memory is
left behind, under every checkpointing plan and for each method family."""
import ctypes
import gc
import os

import pytest
import torch

from conftest import ROOT, TimeMLP, run_mpi
from pnode_dist import IMEX, Checkpointing, SolverError, odeint
from pnode_dist._solve.integrator import Integrator


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward raises (func's graph failing in a vector-Jacobian product)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("injected failure in func's backward")


class Flaky(TimeMLP):
    """TimeMLP that raises on its `fail_at`-th call once armed, and whose graph raises in
    the backward pass when `fail_backward`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls, self.fail_at, self.fail_backward = 0, None, False

    def forward(self, t, y):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("injected failure in func")
        out = super().forward(t, y)
        return _FailingBackward.apply(out) if self.fail_backward else out


class FlakyIMEX(IMEX):
    """A split right-hand side (arkimex) whose implicit part is Flaky, steered like one."""

    def __init__(self, **kwargs):
        super().__init__(implicit=Flaky(**kwargs), explicit=TimeMLP(seed=1, **kwargs))

    calls = property(lambda self: self.implicit.calls,
                     lambda self, v: setattr(self.implicit, "calls", v))
    fail_at = property(lambda self: self.implicit.fail_at,
                       lambda self, v: setattr(self.implicit, "fail_at", v))
    fail_backward = property(lambda self: self.implicit.fail_backward,
                             lambda self, v: setattr(self.implicit, "fail_backward", v))


def _rss_mib():
    """This process's resident memory, after the C heap gave back what is free (fragments
    left by earlier tests in the same process would otherwise count as growth)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _live(kind):
    """Live objects of `kind` (type() only: isinstance would touch deprecated torch proxies)."""
    return sum(1 for o in gc.get_objects() if issubclass(type(o), kind))


def _solve(func, y0, method, policy, fail_in=None, fails_here=True):
    """One differentiable solve (forward + backward); func raises in the forward or the
    backward pass when `fail_in` says so (on this rank if `fails_here`). Returns whether it
    failed (with a SolverError)."""
    func.calls, func.fail_at = 0, None
    fail_in = fail_in if fails_here else None
    func.fail_backward = fail_in == "backward"
    # 50 explicit steps; 20 implicit ones (each a Newton solve; 25 func calls are reached)
    options = {"rk4": {"step_size": 0.02}, "cn": {"step_size": 0.05},
               "arkimex": {"step_size": 0.05}}.get(method, {})
    y = y0.clone().requires_grad_(True)
    if fail_in == "forward":
        func.fail_at = 25
    try:
        ys = odeint(func, y, torch.tensor([0.0, 1.0], dtype=torch.float64), method=method,
                    options=options, checkpointing=policy, rtol=1e-6, atol=1e-8)
        ys.pow(2).sum().backward()
    except SolverError:
        return True
    return False


PLANS = {"graphs": dict(), "all": dict(schedule="all"), "uniform": dict(schedule="uniform",
                                                                       slots=4),
         "states": dict(schedule="binomial", slots=1000),   # every state: auto's "states" plan
         "binomial": dict(schedule="binomial", slots=4),
         "disk": dict(schedule="binomial", slots=4, host_bytes=0)}


@pytest.mark.parametrize("method, plan", [("dopri5", p) for p in PLANS] + [
    ("rk4", "graphs"), ("cn", "graphs"), ("cn", "binomial"), ("arkimex", "graphs"),
    pytest.param("arkimex", "binomial", marks=pytest.mark.long)])
def test_failed_solves_release_everything(tmp_path, method, plan):
    kwargs = dict(PLANS[plan])
    if plan == "disk":
        kwargs["disk_dir"] = str(tmp_path)
    assert soak(method, Checkpointing(**kwargs)) is None
    assert list(tmp_path.iterdir()) == []


def soak(method, policy, fails_here=True):
    """Rounds of (a solve failing in the forward pass, one failing in the backward pass, a
    good one): None when, after 2 rounds, 3 more leave no more Integrators, tensors or
    memory (within 100 MiB; one lost trajectory here is about 600; the counts catch smaller
    losses), else what grew."""
    torch.manual_seed(0)
    func = FlakyIMEX(hidden=64) if method == "arkimex" else Flaky(hidden=64)
    y0 = torch.randn(2048, 3, dtype=torch.float64)            # 48 KiB

    def rounds(n):
        for _ in range(n):
            assert _solve(func, y0, method, policy, "forward", fails_here)
            assert _solve(func, y0, method, policy, "backward", fails_here)
            assert not _solve(func, y0, method, policy)
        gc.collect()

    rounds(2)
    integrators, tensors, rss = _live(Integrator), _live(torch.Tensor), _rss_mib()
    rounds(3)
    grew = {"Integrators": _live(Integrator) - integrators,
            "tensors": _live(torch.Tensor) - tensors}
    grown = [f"{n} {what}" for what, n in grew.items() if n > 0]
    if _rss_mib() - rss >= 100:
        grown.append(f"{_rss_mib() - rss:.0f} MiB of RSS")
    return ", ".join(grown) or None


@pytest.mark.parametrize("plan", ["graphs", "binomial"])
def test_failures_on_one_of_two_ranks_release_everything(plan):
    """The same soak under mpiexec -n 2, func failing on rank 1 only (both ranks raise), and
    nothing left in PETSc's garbage on either rank (what a failure leaves there on one rank
    only is never freed) nor a hang at exit."""
    proc = run_mpi(2, ROOT / "tests" / "mpi" / "lifetime.py", plan, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0: flat", "rank 1: flat"], proc.stdout
    assert _garbage_tallies(proc.stdout) == [0, 0], proc.stdout


def test_destroyed_integrators_leave_no_petsc_garbage_on_two_ranks():
    """Integrators too large to pool are destroyed after every backward pass: their Vecs are
    destroyed with them, not dropped into PETSc's garbage (on several ranks, freed only by a
    collective clean-up: a leak of a state per solve). garbage.py's tally, per rank."""
    proc = run_mpi(2, ROOT / "tests" / "mpi" / "garbage.py", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _garbage_tallies(proc.stdout) == [0, 0], proc.stdout


def _garbage_tallies(stdout):
    """The entries in PETSc's garbage per rank, from PETSc.garbage_view's lines."""
    lines = sorted(line for line in stdout.splitlines() if ":: Total entries:" in line)
    return [int(line.rsplit(":", 1)[1]) for line in lines]
