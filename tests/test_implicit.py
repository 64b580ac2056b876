"""Implicit methods (beuler, cn, theta) and ARKIMEX: reverse accuracy against a pure-torch
replay of the same implicit scheme with Newton converged to round-off, convergence orders,
finite differences, the exact per-sample Newton, mass matrices and Newton failures."""
import math

import pytest
import torch
from torch import nn

from conftest import TimeMLP, central_difference, recorded_steps
from pnode_dist import IMEX, InputError, SolverError, odeint
from pnode_dist.testing import theta_replay

T_OUT = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
THETA = {"beuler": (1.0, False), "cn": (0.5, True), "theta": (0.7, False)}


def _loss(ys):
    w = torch.arange(1, ys.shape[0] + 1, dtype=ys.dtype).view(-1, *[1] * (ys.dim() - 1))
    return (w * ys.sin()).sum() + (ys[-1] ** 2).sum()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _options(method, solver, adaptive=False, **extra):
    opts = {"linear_solver": solver, **extra}
    if not adaptive:
        opts["step_size"] = 0.1
    if method == "theta":
        opts["theta"] = THETA["theta"][0]
    return opts


@pytest.mark.parametrize("method", sorted(THETA))
@pytest.mark.parametrize("solver,adaptive", [("gmres", False), ("exact", False), ("exact", True)])
def test_gradients_equal_backprop_of_converged_implicit_scheme(mlp, y0, method, solver,
                                                               adaptive):
    opts = _options(method, solver, adaptive)
    tol = {"rtol": 1e-4, "atol": 1e-6}
    y0a = y0.clone().requires_grad_(True)
    ys = odeint(mlp, y0a, T_OUT, method=method, options=opts, **tol)
    grads = torch.autograd.grad(_loss(ys), [y0a] + list(mlp.parameters()))

    setup = {k: opts[k] for k in ("theta", "linear_solver") if k in opts}
    record, _ = recorded_steps(mlp, y0, T_OUT, method,
                               {k: v for k, v in opts.items() if k == "step_size"}, **tol, **setup)
    if adaptive:
        steps = [b - a for a, b in zip(record.times, record.times[1:])]
        assert len(set(round(s, 12) for s in steps)) > 2, "adaptive solve took uniform steps"
    theta, endpoint = THETA[method]
    y0b = y0.clone().requires_grad_(True)
    ref = theta_replay(mlp, y0b, record.times, record.output_steps, theta, endpoint)
    grads_ref = torch.autograd.grad(_loss(ref), [y0b] + list(mlp.parameters()))
    assert _rel(ys.detach(), ref.detach()) < 1e-10
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        assert _rel(g, gr) < 1e-9, f"gradient {k}: {_rel(g, gr):.2e}"


def test_mass_matrix(mlp, y0):
    mass = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    mass[0, 1] = 0.3
    y0a = y0.clone().requires_grad_(True)
    ys = odeint(mlp, y0a, T_OUT, method="cn", options={"step_size": 0.1, "mass": mass})
    grads = torch.autograd.grad(_loss(ys), [y0a] + list(mlp.parameters()))
    record, _ = recorded_steps(mlp, y0, T_OUT, "cn", {"step_size": 0.1}, mass=mass)
    y0b = y0.clone().requires_grad_(True)
    ref = theta_replay(mlp, y0b, record.times, record.output_steps, 0.5, True, mass=mass)
    grads_ref = torch.autograd.grad(_loss(ref), [y0b] + list(mlp.parameters()))
    assert _rel(ys.detach(), ref.detach()) < 1e-10
    for g, gr in zip(grads, grads_ref):
        assert _rel(g, gr) < 1e-9


class Linear(nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, t, y):
        return y @ self.A.T


A_STIFF = torch.tensor([[-20.0, 1.0], [0.5, -8.0]], dtype=torch.float64)
A_SOFT = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)


def _slope(hs, errors):
    xs, ys = [math.log(h) for h in hs], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@pytest.mark.parametrize("method,order,extra", [
    ("beuler", 1, {}), ("cn", 2, {}), ("theta", 2, {"theta": 0.5}), ("theta", 1, {"theta": 0.8}),
    ("arkimex", 2, {"tableau": "a2"}), ("arkimex", 2, {"tableau": "l2"}),
    ("arkimex", 3, {"tableau": "3"}), ("arkimex", 4, {"tableau": "4"}),
    ("sdirk2", 2, {}), ("trbdf2", 2, {}), ("kencarp3", 3, {}), ("kencarp4", 4, {}),
    ("kencarp5", 5, {}), ("kvaerno3", 3, {}), ("kvaerno4", 4, {}), ("kvaerno5", 5, {})])
def test_convergence_order(method, order, extra):
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    exact = y0 @ torch.linalg.matrix_exp(A_STIFF + A_SOFT).T
    if method == "arkimex":
        func = IMEX(Linear(A_STIFF.clone()), Linear(A_SOFT.clone()))
    else:
        func = Linear(A_STIFF + A_SOFT)
    hs = {1: (0.02, 0.01, 0.005), 2: (0.04, 0.02, 0.01), 3: (0.04, 0.02, 0.01),
          4: (0.04, 0.02, 0.01), 5: (0.05, 0.025, 0.0125)}[order]
    if method == "kvaerno4":     # its larger error constant: the asymptotic range starts later
        hs = (0.01, 0.005, 0.0025)
    errors = []
    with torch.no_grad():
        for h in hs:
            ys = odeint(func, y0, t, method=method, options={"step_size": h, **extra})
            errors.append((ys[-1] - exact).abs().max().item())
    slope = _slope(hs, errors)
    assert abs(slope - order) <= 0.15, f"{method} {extra}: slope {slope:.3f}, errors {errors}"


def test_finite_differences_beuler(mlp, y0):
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def loss():
        ys = odeint(mlp, y0, t, method="beuler", options={"step_size": 0.1})
        return (ys[1] ** 2).sum() + ys[-1].sum()

    loss().backward()
    for p, idx in [(mlp.l1.weight, (0, 1)), (mlp.l2.bias, (2,)), (mlp.c, (3,))]:
        fd = central_difference(loss, p, idx)
        assert abs(p.grad[idx].item() - fd) <= 1e-6 * max(1.0, abs(fd))


def test_exact_newton_converges_in_one_iteration_on_linear_problem():
    func = Linear(A_STIFF.clone())
    y0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, stats = recorded_steps(func, y0, [0.0, 1.0], "beuler", {"step_size": 0.1},
                              linear_solver="exact")
    assert stats["steps"] == 10 and stats["newton_iterations"] == 10, stats
    _, gmres = recorded_steps(func, y0, [0.0, 1.0], "beuler", {"step_size": 0.1},
                              linear_solver="gmres")
    assert gmres["linear_iterations"] > gmres["newton_iterations"]   # Krylov: several per Newton


def test_exact_newton_uses_every_samples_own_jacobian():
    """A per-sample nonlinearity: one shared block (the seed code's shortcut) would be wrong and
    Newton would need more iterations; exact blocks give quadratic convergence."""
    class Cubic(nn.Module):
        def forward(self, t, y):
            return -y ** 3 - 5.0 * y

    y0 = torch.linspace(-2, 2, 12, dtype=torch.float64).view(6, 2)
    exact_ys = odeint(Cubic(), y0, [0.0, 1.0], method="beuler",
                      options={"step_size": 0.1, "linear_solver": "exact"})
    gmres_ys = odeint(Cubic(), y0, [0.0, 1.0], method="beuler", options={"step_size": 0.1})
    assert _rel(exact_ys, gmres_ys) < 1e-10


class _BufferedBackward(torch.autograd.Function):
    """y -> 2 y whose backward writes into a fresh buffer: twice differentiable, but a graph
    that batched vjps (vmap) cannot run."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        buffer = torch.zeros(grad.shape, dtype=grad.dtype)
        buffer.copy_(2 * grad)
        return buffer


def test_exact_newton_blocks_without_batched_vjps(mlp, y0):
    """A func whose graph vmap cannot batch gets its blocks one vjp per row: the solve and its
    gradients equal those of the same func with a plain 2 y."""
    class Through(nn.Module):
        def __init__(self, buffered):
            super().__init__()
            self.mlp, self.buffered = mlp, buffered

        def forward(self, t, y):
            y2 = _BufferedBackward.apply(y) if self.buffered else 2 * y
            return self.mlp(t, 0.5 * y2)

    results = []
    for buffered in (False, True):
        y = y0.clone().requires_grad_(True)
        ys = odeint(Through(buffered), y, T_OUT, method="beuler",
                    options={"step_size": 0.1, "linear_solver": "exact"})
        grads = torch.autograd.grad(_loss(ys), [y] + list(mlp.parameters()))
        results.append((ys.detach(), grads))
    (ys_a, g_a), (ys_b, g_b) = results
    assert _rel(ys_b, ys_a) < 1e-12
    for a, b in zip(g_a, g_b):
        assert _rel(b, a) < 1e-12


def test_arkimex_adjoint_matches_finite_differences():
    func = IMEX(TimeMLP(seed=2), Linear(A_SOFT.clone()))
    y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    func.implicit = TimeMLP(dim=2, seed=2)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def loss(y_init):
        ys = odeint(func, y_init, t, method="arkimex", options={"step_size": 0.05})
        return (ys ** 2).sum()

    y = y0.clone().requires_grad_(True)
    loss(y).backward()
    eps = 1e-6
    for p, idx in [(func.implicit.l1.weight, (0, 1)), (func.explicit.A, (1, 0))]:
        fd = central_difference(lambda: loss(y0), p, idx, eps)
        assert abs(p.grad[idx].item() - fd) <= 1e-6 * max(1.0, abs(fd)), (p.grad[idx], fd)
    with torch.no_grad():
        e = torch.zeros_like(y0)
        e[1, 0] = eps
        fd = (loss(y0 + e).item() - loss(y0 - e).item()) / (2 * eps)
    assert abs(y.grad[1, 0].item() - fd) <= 1e-6 * max(1.0, abs(fd))


class VanDerPol(nn.Module):
    def __init__(self, mu):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))

    def forward(self, t, y):
        x, v = y[..., :1], y[..., 1:]
        return torch.cat([v, self.mu * (1 - x * x) * v - x], -1)


@pytest.mark.parametrize("method,split", [
    *((f"kencarp{k}", split) for k in "345" for split in ("plain", "imex")),
    *((f"kvaerno{k}", "plain") for k in "345")])
def test_adaptive_esdirk_gradients_equal_backprop_of_same_tableau(method, split):
    """kencarp3/4/5 and kvaerno3/4/5 adapt their steps; on a plain func the implicit half of the
    ARK pair (the ESDIRK) runs alone, on an IMEX func kencarp's whole pair: outputs and gradients
    equal the pure-torch replay of the same tableau through the same steps."""
    from pnode_dist.testing import ark_replay, ark_tableau
    torch.manual_seed(3)
    if split == "imex":
        func = IMEX(implicit=Linear(A_STIFF.clone()), explicit=TimeMLP(dim=2, seed=2))
        implicit, explicit = func.implicit, func.explicit
    else:
        func = implicit = TimeMLP(dim=2, seed=2)
        explicit = lambda t, y: torch.zeros_like(y)   # noqa: E731
    y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    tol = {"rtol": 1e-5, "atol": 1e-7}
    y0a = y0.clone().requires_grad_(True)
    stats = {}
    ys = odeint(func, y0a, T_OUT, method=method, options={"linear_solver": "exact"},
                stats=stats, **tol)
    grads = torch.autograd.grad(_loss(ys), [y0a] + list(func.parameters()))
    record, _ = recorded_steps(func, y0, T_OUT, method, {}, **tol, linear_solver="exact")
    steps = [b - a for a, b in zip(record.times, record.times[1:])]
    assert len(set(round(s, 12) for s in steps)) > 2, "adaptive solve took uniform steps"
    assert stats["steps"] == len(steps)
    y0b = y0.clone().requires_grad_(True)
    ref = ark_replay(implicit, explicit, y0b, record.times, record.output_steps,
                     ark_tableau(method))
    grads_ref = torch.autograd.grad(_loss(ref), [y0b] + list(func.parameters()))
    assert _rel(ys.detach(), ref.detach()) < 1e-10
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        assert _rel(g, gr) < 1e-9, f"gradient {k}: {_rel(g, gr):.2e}"


def test_kencarp_runs_an_imex_pair_only_as_given(y0):
    """An IMEX func is the whole ARK pair: it cannot be wrapped (decreasing t, tuples) without
    losing its split, so that is refused rather than solved fully implicitly."""
    func = IMEX(implicit=Linear(A_STIFF.clone()), explicit=Linear(A_SOFT.clone()))
    with pytest.raises(InputError, match="'kencarp4' with an IMEX func takes a tensor y0 and "
                                         "increasing t"):
        odeint(func, y0[:, :2], T_OUT.flip(0), method="kencarp4")


def test_a_failed_newton_solve_rejects_the_step_and_gradients_stay_exact():
    """van der Pol (mu = 5) with kencarp5 at rtol 1e-4, matrix-free GMRES Newton: Newton
    fails at one attempted step (the line search); the step is retried smaller and the solve
    completes, its gradients those of the accepted steps (the replay's)."""
    from pnode_dist.testing import ark_replay, ark_tableau
    func = VanDerPol(5.0)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 5.0], dtype=torch.float64)
    tol = {"rtol": 1e-4, "atol": 1e-6}
    stats = {}
    y0a = y0.clone().requires_grad_(True)
    ys = odeint(func, y0a, t, method="kencarp5", stats=stats,
                options={"linear_solver": "gmres"}, **tol)
    grads = torch.autograd.grad(ys[-1].sum(), [y0a, func.mu])
    assert stats["newton_failures"] >= 1 and stats["rejected_steps"] >= stats["newton_failures"]
    record, _ = recorded_steps(func, y0, t, "kencarp5", {}, **tol, linear_solver="gmres")
    assert len(record.times) - 1 == stats["steps"]
    y0b = y0.clone().requires_grad_(True)
    ref = ark_replay(func, lambda t, y: torch.zeros_like(y), y0b, record.times,
                     record.output_steps, ark_tableau("kencarp5"))
    grads_ref = torch.autograd.grad(ref[-1].sum(), [y0b, func.mu])
    assert _rel(ys.detach(), ref.detach()) < 1e-9
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        assert _rel(g, gr) < 1e-8, f"gradient {k}: {_rel(g, gr):.2e}"


def test_newton_failing_at_every_step_size_names_newton(y0):
    """Adaptive steps: each failed Newton solve cuts the step (4x) until PETSc's limit of
    rejections in a row; the SolverError names the non-finite f and Newton's failure."""
    def func(t, y):                    # NaN after t = 0: every implicit stage fails
        return torch.where(t > 0, torch.full_like(y, float("nan")), -y)

    with pytest.raises(SolverError, match=r"(?s)non-finite.*rejected too often; the last "
                                          r"attempt's Newton solve failed "
                                          r"\(DIVERGED_FUNCTION_NANORINF"):
        odeint(func, y0, T_OUT, method="kencarp4")


class FreeFall(nn.Module):
    def forward(self, t, y):
        return torch.stack([y[..., 1], -9.81 * torch.ones_like(y[..., 1])], -1)


def test_cn_takes_the_trapezoidal_rules_own_error_estimate():
    """cn is exact on free fall (zero third derivative): with its own local error estimate
    (h^3 y'''/12, not PETSc's second difference, backward Euler's h^2 y''/2) a handful of steps
    at any rtol; PETSc's estimate, chosen with -ts_adapt_type basic, needs beuler's counts."""
    y0 = torch.tensor([[10.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.6], dtype=torch.float64)
    exact = torch.tensor([10.0 - 0.5 * 9.81 * 0.36, -9.81 * 0.6], dtype=torch.float64)
    steps = {}
    for name, method, petsc in [("cn", "cn", None), ("basic", "cn", {"ts_adapt_type": "basic"}),
                                ("beuler", "beuler", None)]:
        stats = {}
        ys = odeint(FreeFall(), y0, t, method=method, rtol=1e-7, atol=1e-9, stats=stats,
                    petsc_options=petsc)
        steps[name] = stats["steps"]
        if method == "cn":
            assert (ys[-1, 0] - exact).abs().max() < 1e-12
    assert steps["cn"] <= 10 and steps["basic"] > 100 and steps["beuler"] > 100, steps


def test_cn_steps_scale_as_a_second_order_method():
    """Local error ~ h^3: 1000x tighter rtol takes about 1000^(1/3) = 10x the steps (PETSc's
    second-difference estimate, of backward Euler's local error, gave 1000^(1/2) = 32x); the
    rejected steps are rolled back and the gradients are those of the accepted steps."""
    func = VanDerPol(2.0)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 3.0], dtype=torch.float64)
    counts = {}
    for rtol in (1e-4, 1e-7):
        stats = {}
        with torch.no_grad():
            odeint(func, y0, t, method="cn", rtol=rtol, atol=rtol, stats=stats)
        counts[rtol] = stats["steps"]
    assert 6 < counts[1e-7] / counts[1e-4] < 16, counts
    func, t = VanDerPol(5.0), torch.tensor([0.0, 5.0], dtype=torch.float64)
    tol = {"rtol": 1e-5, "atol": 1e-7}
    stats = {}
    y0a = y0.clone().requires_grad_(True)
    options = {"linear_solver": "exact", "first_step": 0.5}      # too long: rejected
    ys = odeint(func, y0a, t, method="cn", options=options, stats=stats, **tol)
    assert stats["rejected_steps"] > 0, stats
    grads = torch.autograd.grad(_loss(ys), [y0a, func.mu])
    record, _ = recorded_steps(func, y0, t, "cn", {"first_step": 0.5}, **tol,
                               linear_solver="exact")
    y0b = y0.clone().requires_grad_(True)
    ref = theta_replay(func, y0b, record.times, record.output_steps, 0.5, True)
    grads_ref = torch.autograd.grad(_loss(ref), [y0b, func.mu])
    assert _rel(ys.detach(), ref.detach()) < 1e-10
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        assert _rel(g, gr) < 1e-9, f"gradient {k}: {_rel(g, gr):.2e}"


def test_newton_failure_is_reported(mlp, y0):
    with pytest.raises(SolverError, match="Newton's method failed in step 1 from t=0"):
        odeint(mlp, y0 * 10, T_OUT, method="beuler", options={"step_size": 0.3},
               petsc_options={"snes_max_it": 1, "snes_rtol": 1e-14, "snes_atol": 1e-30})


@pytest.mark.parametrize("tableau", ["a2", "l2"])
@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_arkimex_gradients_equal_backprop_of_same_tableau(tableau, mode):
    from pnode_dist.testing import ARK_TABLEAUS
    from pnode_dist.testing import ark_replay
    func = IMEX(TimeMLP(dim=2, seed=2), Linear(A_STIFF.clone()))
    y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    options = {"tableau": tableau, "linear_solver": "exact"}
    if mode == "fixed":
        options["step_size"] = 0.05
    tol = {"rtol": 1e-3, "atol": 1e-4}   # loose: the 2nd-order pairs take ~150 steps even so
    y0a = y0.clone().requires_grad_(True)
    ys = odeint(func, y0a, T_OUT, method="arkimex", options=options, **tol)
    grads = torch.autograd.grad(_loss(ys), [y0a] + list(func.parameters()))
    record, _ = recorded_steps(func, y0, T_OUT, "arkimex",
                               {k: v for k, v in options.items() if k == "step_size"},
                               **tol, tableau=tableau, linear_solver="exact")
    if mode == "adaptive":
        steps = [b - a for a, b in zip(record.times, record.times[1:])]
        assert len(set(round(s, 12) for s in steps)) > 2, "adaptive solve took uniform steps"
    y0b = y0.clone().requires_grad_(True)
    ref = ark_replay(func.implicit, func.explicit, y0b, record.times, record.output_steps,
                     ARK_TABLEAUS[tableau])
    grads_ref = torch.autograd.grad(_loss(ref), [y0b] + list(func.parameters()))
    assert _rel(ys.detach(), ref.detach()) < 1e-10
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        assert _rel(g, gr) < 1e-9, f"gradient {k}: {_rel(g, gr):.2e}"


@pytest.mark.parametrize("method", ["sdirk2", "trbdf2"])
@pytest.mark.parametrize("solver", ["gmres", "exact"])
def test_dirk_gradients_equal_backprop_of_same_tableau(method, solver):
    """torchdiffeq's sdirk2 and trbdf2, run by ARKIMEX with a zero explicit part: outputs and
    gradients equal the pure-torch replay of the same tableau (Newton to round-off)."""
    from pnode_dist.testing import ark_replay, ark_tableau
    func = TimeMLP(dim=2, seed=2)
    y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y0a = y0.clone().requires_grad_(True)
    options = {"step_size": 0.05, "linear_solver": solver}
    ys = odeint(func, y0a, T_OUT, method=method, options=options)
    grads = torch.autograd.grad(_loss(ys), [y0a] + list(func.parameters()))
    record, _ = recorded_steps(func, y0, T_OUT, method, {"step_size": 0.05},
                               linear_solver=solver)
    y0b = y0.clone().requires_grad_(True)
    ref = ark_replay(func, lambda t, y: torch.zeros_like(y), y0b, record.times,
                     record.output_steps, ark_tableau(method))
    grads_ref = torch.autograd.grad(_loss(ref), [y0b] + list(func.parameters()))
    assert _rel(ys.detach(), ref.detach()) < 1e-10
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        assert _rel(g, gr) < 1e-9, f"gradient {k}: {_rel(g, gr):.2e}"


@pytest.mark.parametrize("method", ["kvaerno5", "kencarp4"])
def test_exact_newton_reuses_blocks_within_a_step_and_converges_as_far(method, monkeypatch):
    """The exact Newton's first iteration of each later stage reuses the step's last blocks:
    fewer blocks are built, the steps and outputs are those of fresh blocks at every iteration
    (to Newton's round-off), and the gradients equal the replay's."""
    from pnode_dist._solve.implicit import BlockJacobianPC
    from pnode_dist.testing import ark_replay, ark_tableau
    func, y0 = VanDerPol(5.0), torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    t, tol = torch.tensor([0.0, 5.0], dtype=torch.float64), {"rtol": 1e-5, "atol": 1e-7}
    runs = {}
    for fresh in (0, BlockJacobianPC.FRESH_FROM_ITERATION):
        monkeypatch.setattr(BlockJacobianPC, "FRESH_FROM_ITERATION", fresh)
        stats, y0a = {}, y0.clone().requires_grad_(True)
        ys = odeint(func, y0a, t, method=method, options={"linear_solver": "exact"},
                    stats=stats, **tol)
        runs[fresh] = ys, torch.autograd.grad(ys[-1].sum(), [y0a, func.mu]), stats
    (ys0, g0, s0), (ys1, g1, s1) = runs.values()
    assert s1["jacobian_blocks"] < 0.8 * s0["jacobian_blocks"], (s0, s1)
    assert s1["steps"] == s0["steps"] and _rel(ys1.detach(), ys0.detach()) < 1e-11
    record, _ = recorded_steps(func, y0, t, method, {}, **tol, linear_solver="exact")
    y0b = y0.clone().requires_grad_(True)
    ref = ark_replay(func, lambda t, y: torch.zeros_like(y), y0b, record.times,
                     record.output_steps, ark_tableau(method))
    g_ref = torch.autograd.grad(ref[-1].sum(), [y0b, func.mu])
    for g, gr in zip(g1, g_ref):
        assert _rel(g, gr) < 1e-9


def test_auto_linear_solver_takes_exact_blocks_where_they_apply():
    """linear_solver='auto' (the default): the exact per-sample Newton for small samples that
    func keeps independent; matrix-free GMRES for a func coupling the samples or for large
    samples. The same solution either way (Newton converged)."""
    class Coupled(nn.Module):
        def forward(self, t, y):
            return -(y - y.mean(0, keepdim=True)) - y

    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y_small = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_large = torch.randn(2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cases = [(Linear(torch.diag(torch.tensor([-50.0, -1.0, -0.1], dtype=torch.float64))),
              y_small, "exact"), (Coupled(), y_small, "gmres"),
             (Linear(-torch.eye(40, dtype=torch.float64)), y_large, "gmres")]
    for func, y0, expected in cases:
        stats, ref_stats = {}, {}
        ys = odeint(func, y0, t, method="kencarp4", rtol=1e-6, atol=1e-8, stats=stats)
        ref = odeint(func, y0, t, method="kencarp4", rtol=1e-6, atol=1e-8, stats=ref_stats,
                     options={"linear_solver": "gmres"})
        assert stats["linear_solver"] == expected, (type(func).__name__, stats)
        assert (ys - ref).abs().max() < 1e-8


def test_exact_newton_refuses_a_func_that_couples_samples(y0):
    class Coupled(nn.Module):
        def forward(self, t, y):
            return -(y - y.mean(0, keepdim=True)) - y

    with pytest.raises(SolverError, match="couples the samples"):
        odeint(Coupled(), y0, T_OUT, method="beuler",
               options={"step_size": 0.1, "linear_solver": "exact"})
    odeint(Coupled(), y0, T_OUT, method="beuler", options={"step_size": 0.1})   # gmres is fine
