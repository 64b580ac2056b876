"""What tests and benchmarks need, instead of reaching into the internals: pure-torch replays
of a recorded discrete solve (for reverse-accuracy checks to round-off), the step times a solve
takes, and a few facts about the build.

Given the tableau and the exact step times that a pnode_dist forward solve took (recorded by the
solver), these functions redo the same discrete computation with plain torch ops, so that
torch.autograd can backpropagate through it. That is the reference the discrete adjoint must
match to round-off.
"""
import torch

from ._distributed.layout import BatchLayout
from ._distributed.startup import PETSc
from ._solve.device import SOLVER_DTYPE, petsc_has_cuda  # noqa: F401 - for the tests
from ._reversal import torch_replay
from ._solve.integrator import Integrator
from ._solve.stepping import StepControl
from ._solve.rk_register import ensure_registered, petsc_tableau
from ._solve.tableaus import ARK_TABLEAUS, ButcherTableau  # noqa: F401
from .methods import METHODS, SetupConfig


def _float_time(func):
    """func(t: tensor, y) as func(t: float, y)."""
    return lambda t, y: func(torch.tensor(t, dtype=y.dtype), y)


def rk_step(func, t, y, h, tableau: ButcherTableau):
    """One explicit RK step from (t, y) with step h."""
    return torch_replay.rk_step(_float_time(func), t, y, h, tableau)


def _replay(step, y0, times, output_steps):
    """Apply y <- step(t, h, y) through the step times `times` (times[0] is the start); return
    the states at the step indices `output_steps`, stacked as [len(output_steps), *y0.shape]."""
    outs = {0: y0}
    y = y0
    for n in range(1, len(times)):
        y = step(times[n - 1], times[n] - times[n - 1], y)
        outs[n] = y
    return torch.stack([outs[k] for k in output_steps])


def rk_replay(func, y0, times, output_steps, tableau: ButcherTableau):
    """Explicit RK through the recorded step times (see _replay)."""
    return _replay(lambda t, h, y: rk_step(func, t, y, h, tableau), y0, times, output_steps)


def rk_record_replay(func, y0, record, method):
    """Explicit RK through a recorded solve's steps, its outputs as the solve made them: the
    state where an output ended a step, the method's dense output where it lies inside one
    (record.dense_times). [len(outputs), *y0.shape]."""
    m = METHODS[method]
    ensure_registered(m)
    tableau, dense = petsc_tableau(m.subtype, dense=True)
    return torch_replay.record_outputs(_float_time(func), y0, record, tableau, dense)


def _implicit_solve(residual, z0, iters=50):
    """Solve residual(z) = 0 by Newton to round-off, then re-attach the graph through one
    implicit-function step z - J^{-1} residual(z) (J detached): the value is the converged root
    and its derivative with respect to everything residual depends on is exact."""
    z = z0.detach().clone()
    shape = z.shape
    eps = torch.finfo(z.dtype).eps

    def jacobian(at):    # vectorize: one batched backward pass, not one per row (4x faster)
        return torch.autograd.functional.jacobian(lambda u: residual(u.view(shape)).reshape(-1),
                                                  at.reshape(-1), vectorize=True)

    for _ in range(iters):
        jac = jacobian(z)
        with torch.no_grad():
            step = torch.linalg.solve(jac, residual(z).reshape(-1)).view(shape)
        z = z - step
        if step.abs().max() <= 4 * eps * max(1.0, z.abs().max().item()):
            break          # the update is at round-off: converged
    jac = jacobian(z).detach()
    return z - torch.linalg.solve(jac, residual(z).reshape(-1)).view(shape)


def theta_replay(func, y0, times, output_steps, theta, endpoint, mass=None):
    """PETSc's TSTHETA scheme in pure torch, Newton converged to round-off:
    endpoint=False (beuler, theta): M (X - y_n) = theta h f(t_n + theta h, X),
                                    y_{n+1} = y_n + (X - y_n) / theta;
    endpoint=True (cn):             M (y_{n+1} - y_n) = h [(1-theta) f(t_n, y_n)
                                                           + theta f(t_{n+1}, y_{n+1})]."""
    def apply_mass(v):
        return v if mass is None else v @ mass.to(v.dtype).T

    def tt(t):
        return torch.tensor(t, dtype=y0.dtype)

    def step(t, h, y):
        if endpoint:
            f_n = func(tt(t), y)
            return _implicit_solve(
                lambda z: apply_mass(z - y) - h * ((1 - theta) * f_n + theta * func(tt(t + h), z)),
                y)
        x = _implicit_solve(lambda z: apply_mass(z - y) - theta * h * func(tt(t + theta * h), z),
                            y)
        return y + (x - y) / theta

    return _replay(step, y0, times, output_steps)


def ark_tableau(method):
    """The replay tableau (A, b, At, bt) of a method PETSc's ARKIMEX runs (kencarp3/4/5,
    kvaerno3/4/5, sdirk2, trbdf2), by its ``method=`` name."""
    return ARK_TABLEAUS[METHODS[method].subtype]


def ark_replay(implicit, explicit, y0, times, output_steps, tableau):
    """PETSc's ARKIMEX scheme y' = g(t, y) + h(t, y) (g implicit, h explicit) in pure torch, every
    implicit stage solved to round-off. `tableau` = (A, b, At, bt) (tableaus.ARK_TABLEAUS):
    Y_i = y_n + h sum_{j<i} A_ij h(t_n + c_j h, Y_j) + h sum_{j<=i} At_ij g(t_n + ct_j h, Y_j),
    y_{n+1} = y_n + h sum_j (b_j h(.., Y_j) + bt_j g(.., Y_j))."""
    A, b, At, bt = tableau
    c = [sum(row) for row in A]
    ct = [sum(row) for row in At]

    def tt(t):
        return torch.tensor(t, dtype=y0.dtype)

    def step(t, h, y):
        ks, qs = [], []
        for i in range(len(b)):
            base = y
            for j in range(i):
                base = base + h * A[i][j] * ks[j] + h * At[i][j] * qs[j]
            stage = base
            if At[i][i] != 0.0:
                time_i, a = tt(t + ct[i] * h), At[i][i]
                stage = _implicit_solve(lambda z: z - base - h * a * implicit(time_i, z), base)
            ks.append(explicit(tt(t + c[i] * h), stage))
            qs.append(implicit(tt(t + ct[i] * h), stage))
        for j in range(len(b)):
            y = y + h * b[j] * ks[j] + h * bt[j] * qs[j]
        return y

    return _replay(step, y0, times, output_steps)


def recorded_steps(func, y0, t, method, options=None, rtol=1e-7, atol=1e-9, **setup):
    """Run a forward solve on a fresh rank-local Integrator; returns (record, stats): the step
    times PETSc accepted (for the replays above) and its Newton/Krylov iteration counts."""
    options = dict(options or {})
    m = METHODS[method]
    adaptive = m.adaptive and "step_size" not in options
    layout = BatchLayout(PETSc.COMM_SELF, y0.shape, [tuple(y0.shape)], device=y0.device)
    from ._pipeline import resolve_setup     # linear_solver 'auto' as odeint resolves it
    config = resolve_setup(SetupConfig(**setup), m, func, y0, float(t[0]), layout)
    integrator = Integrator(layout, m, func, list(func.parameters()), y0.dtype, None, (),
                            adaptive, adjoint=False, setup=config)
    interpolate = options.get("outputs", "interpolate" if m.interpolates else "land")
    control = StepControl(step_size=options.get("step_size"), rtol=rtol, atol=atol,
                          first_step=options.get("first_step"),
                          interpolate=adaptive and interpolate == "interpolate")
    try:
        _, record = integrator.forward(y0, [float(v) for v in t], control)
        return record, integrator.stats
    finally:
        integrator.destroy()
