"""A singular mass matrix (an index-1 DAE): the pendulum in Cartesian coordinates with an MLP
force, state [x, y, u, v, lam], M = diag(1, 1, 1, 1, 0), the last row the constraint
differentiated twice. Gradients through odeint equal backprop through the same discrete theta
scheme (pnode_dist.testing.theta_replay) and central differences of the discrete solve; the
outputs of beuler and cn satisfy the algebraic row to Newton tolerance."""
import functools

import pytest
import torch
from torch import nn

from conftest import central_difference, recorded_steps
from pnode_dist import odeint
from pnode_dist.testing import theta_replay

MASS = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
T_OUT = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
STEP = 0.02
# method: (theta, endpoint) as theta_replay takes them, and the odeint options.
METHODS = {"beuler": (1.0, False, {}), "cn": (0.5, True, {}),
           "theta": (0.7, False, {"theta": 0.7})}
# GMRES's transposed solves in the adjoint stop at ksp_rtol (default 1e-10, which leaves
# gradients 1e-9 off): tightened so that both solvers are compared at round-off.
TIGHT_GMRES = {"ksp_rtol": 1e-14, "ksp_atol": 1e-30}


class Pendulum(nn.Module):
    """x' = u, y' = v, u' = -lam x + Fx, v' = -lam y - g + Fy,
    0 = u^2 + v^2 - lam (x^2 + y^2) - g y + x Fx + y Fy, (Fx, Fy) = MLP(x, y, u, v)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.g = nn.Parameter(torch.tensor(9.0, dtype=torch.float64))
        self.force = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
        with torch.no_grad():
            for p in self.force.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)

    def forces(self, q):
        return self.force(q).unbind(-1)

    def forward(self, t, s):
        x, y, u, v, lam = s.unbind(-1)
        fx, fy = self.forces(s[..., :4])
        return torch.stack([u, v, -lam * x + fx, -lam * y - self.g + fy,
                            u * u + v * v - lam * (x * x + y * y) - self.g * y + x * fx + y * fy],
                           dim=-1)

    def algebraic_residual(self, s):
        with torch.no_grad():
            return self(0.0, s)[..., 4]


def initial_state(f):
    """Three pendulums on the unit circle, lam0 consistent with f (algebraic row = 0)."""
    angle = torch.tensor([0.4, 1.0, 1.6], dtype=torch.float64)
    omega = torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64)
    q = torch.stack([angle.sin(), -angle.cos(), omega * angle.cos(), omega * angle.sin()], -1)
    with torch.no_grad():
        x, y, u, v = q.unbind(-1)
        fx, fy = f.forces(q)
        lam = (u * u + v * v - f.g * y + x * fx + y * fy) / (x * x + y * y)
    return torch.cat([q, lam[:, None]], -1)


def _loss(ys):
    """Every output but y0 itself (so y0's gradient is the solve's), lam included."""
    w = torch.arange(1, ys.shape[0], dtype=ys.dtype).view(-1, 1, 1)
    return (w * ys[1:].sin()).sum() + (ys[-1] ** 2).sum()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _options(method, solver):
    return {"step_size": STEP, "mass": MASS, "linear_solver": solver, **METHODS[method][2]}


def _odeint_grads(method, solver):
    f = Pendulum()
    y0 = initial_state(f).requires_grad_(True)
    ys = odeint(f, y0, T_OUT, method=method, options=_options(method, solver),
                petsc_options=TIGHT_GMRES if solver == "gmres" else None)
    return ys.detach(), torch.autograd.grad(_loss(ys), [y0] + list(f.parameters()))


@functools.lru_cache(maxsize=None)
def _replay_grads(method):
    """Backprop through theta_replay of the steps PETSc took (cached per method)."""
    f = Pendulum()
    y0 = initial_state(f)
    theta, endpoint, extra = METHODS[method]
    record, _ = recorded_steps(f, y0, T_OUT, method, {"step_size": STEP}, mass=MASS, **extra)
    assert record.output_steps == [0, 15, 35, 50]
    y0 = y0.requires_grad_(True)
    ref = theta_replay(f, y0, record.times, record.output_steps, theta, endpoint, mass=MASS)
    return ref.detach(), torch.autograd.grad(_loss(ref), [y0] + list(f.parameters()))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("solver", ["exact", "gmres"])
def test_gradients_equal_backprop_of_discrete_scheme(method, solver):
    """Measured: 2e-14..3e-14 (exact), up to 3e-12 (gmres with ksp_rtol 1e-14). The forward
    matches to round-off because Newton converges quadratically far below snes_rtol, and the
    adjoint's transposed solves are exact (LU) or converged to 1e-14."""
    ys, grads = _odeint_grads(method, solver)
    ref, grads_ref = _replay_grads(method)
    assert _rel(ys, ref) < 1e-12
    tol = 1e-12 if solver == "exact" else 1e-10
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        assert _rel(g, gr) < tol, f"gradient {k}: {_rel(g, gr):.2e}"
    scale = grads[0].abs().max()
    lam0 = grads[0][:, 4].abs().max()
    if method == "beuler":
        # y_{n+1} solves M (y_{n+1} - y_n) = h f(y_{n+1}): lam_n enters only through M y_n,
        # whose lam row is 0, so dL/dlam0 is 0 (the replay's is exactly 0; PETSc's round-off).
        assert grads_ref[0][:, 4].abs().max() == 0.0
        assert lam0 <= 1e-13 * scale, lam0
    elif method == "cn":                         # f(y_n) enters every step, lam_n with it
        assert lam0 > 1e-2 * scale
    else:
        # theta's output y_n + (X - y_n) / theta carries lam_n with the factor 1 - 1/theta
        # per step: (-3/7)^15 ~ 3e-6 at the first output. Small, but the replay's.
        assert _rel(grads[0][:, 4], grads_ref[0][:, 4]) < 1e-6


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradients_match_central_differences(method):
    """The discrete solve's derivative (Newton to snes_rtol 1e-10, so eps = 1e-6 central
    differences hold to about 1e-8): g, a weight of the force MLP, a position and lam0."""
    f = Pendulum()
    y0 = initial_state(f)
    opts = _options(method, "exact")

    def loss(y_init=y0):
        return _loss(odeint(f, y_init, T_OUT, method=method, options=opts))

    y0a = y0.clone().requires_grad_(True)
    loss(y0a).backward()
    eps = 1e-6
    for p, idx in [(f.g, ()), (f.force[0].weight, (1, 2)), (f.force[2].bias, (1,))]:
        fd = central_difference(loss, p, idx, eps)
        assert abs(p.grad[idx].item() - fd) <= 1e-6 * max(1.0, abs(fd)), (p.grad[idx], fd)
    for idx in [(2, 1), (1, 4)]:                  # y of pendulum 2, lam0 of pendulum 1
        e = torch.zeros_like(y0)
        e[idx] = eps
        with torch.no_grad():
            fd = (loss(y0 + e).item() - loss(y0 - e).item()) / (2 * eps)
        assert abs(y0a.grad[idx].item() - fd) <= 1e-6 * max(1.0, abs(fd)), (idx, y0a.grad[idx], fd)


@pytest.mark.parametrize("method", ["beuler", "cn"])
def test_outputs_satisfy_the_algebraic_row(method):
    """beuler and cn (from a consistent lam0) end every step on the constraint, to Newton's
    tolerance (snes_atol 1e-12, snes_rtol 1e-10 of the first residual)."""
    f = Pendulum()
    with torch.no_grad():
        ys = odeint(f, initial_state(f), T_OUT, method=method, options=_options(method, "exact"))
    assert f.algebraic_residual(ys).abs().max() < 1e-10


def test_theta_outputs_leave_the_algebraic_row():
    """theta (endpoint=False) solves the constraint at its stage X and outputs the
    extrapolation y_n + (X - y_n) / theta, which is off it by O(h): not for DAE outputs."""
    f = Pendulum()
    with torch.no_grad():
        ys = odeint(f, initial_state(f), T_OUT, method="theta", options=_options("theta", "exact"))
    assert f.algebraic_residual(ys[1:]).abs().max() > 1e-4


def test_inconsistent_lam0_stays_with_cn_and_is_gone_after_one_beuler_step():
    """cn's algebraic row only holds on average over a step, (r_n + r_{n+1}) / 2 = 0: an
    inconsistent lam0 leaves residuals of its size at every step, alternating in sign. beuler
    solves the row at every step's end, whatever lam0."""
    f = Pendulum()
    y0 = initial_state(f)
    y0[1, 4] += 0.5
    r0 = f.algebraic_residual(y0)[1].item()
    assert abs(abs(r0) - 0.5) < 1e-12                   # x^2 + y^2 = 1
    t = torch.tensor([0.0, STEP, 2 * STEP, 3 * STEP], dtype=torch.float64)
    with torch.no_grad():
        cn = odeint(f, y0, t, method="cn", options=_options("cn", "exact"))
        be = odeint(f, y0, t, method="beuler", options=_options("beuler", "exact"))
    r_cn = f.algebraic_residual(cn)[:, 1]
    expected = torch.tensor([r0, -r0, r0, -r0], dtype=torch.float64)
    assert (r_cn - expected).abs().max() < 1e-10, r_cn
    assert f.algebraic_residual(be[1:]).abs().max() < 1e-10
