"""Second derivatives (backward with create_graph=True, _reversal/torch_replay.py): the
gradients are differentiable again and equal torchdiffeq's backprop double-backward through the
same fixed steps; gradgradcheck against central differences; with adaptive steps and
interpolated outputs, the differentiable gradient equals the discrete adjoint's; a gradient
penalty trains; implicit methods refuse with the reason."""
import pytest
import torch
import torchdiffeq

import pnode_dist
from conftest import TimeMLP
from pnode_dist import InputError

F64 = torch.float64
T = torch.linspace(0.0, 1.0, 5, dtype=F64)


def _penalty_gradients(odeint, func, y0, **kwargs):
    """d/d(y0, params) of |dL/d(y0, params)|^2, L = sum(sin(y) * w) over the outputs."""
    y0 = y0.clone().requires_grad_(True)
    params = list(func.parameters())
    ys = odeint(func, y0, T, **kwargs)
    weights = torch.linspace(-1, 1, ys.numel(), dtype=F64).view_as(ys)
    first = torch.autograd.grad((ys.sin() * weights).sum(), [y0] + params, create_graph=True)
    penalty = sum((g ** 2).sum() for g in first)
    second = torch.autograd.grad(penalty, [y0] + params)
    return torch.cat([g.reshape(-1) for g in first]).detach(), \
        torch.cat([g.reshape(-1) for g in second])


@pytest.mark.parametrize("ours, theirs", [("euler", "euler"), ("midpoint", "midpoint"),
                                          ("rk4_38", "rk4")])
def test_double_backward_equals_torchdiffeqs_backprop(ours, theirs):
    func, y0 = TimeMLP(), torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    opts = {"step_size": 0.05}
    first, second = _penalty_gradients(pnode_dist.odeint, func, y0, method=ours, options=opts)
    ref_first, ref_second = _penalty_gradients(torchdiffeq.odeint, func, y0, method=theirs,
                                               options=opts)
    assert float((first - ref_first).abs().max()) <= 1e-13 * float(ref_first.abs().max())
    assert float((second - ref_second).abs().max()) <= 1e-12 * float(ref_second.abs().max())


def test_gradgradcheck_fixed_step_dopri5():
    """Second derivatives against central differences of the first (torch's gradgradcheck)."""
    func = TimeMLP(dim=2, hidden=4)
    y0 = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    w = tuple(func.parameters())

    def solve(y, *params):
        return pnode_dist.odeint(func, y, T, method="dopri5", options={"step_size": 0.1})

    assert torch.autograd.gradgradcheck(solve, (y0.requires_grad_(True),) + w,
                                        atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_adaptive_interpolated_first_derivative_is_the_adjoints(method):
    """With adaptive steps and outputs by dense output, the differentiable gradient (torch
    through the recorded steps and interpolant) equals the discrete adjoint's to round-off, and
    its own derivative exists (a finite Hessian-vector product)."""
    func, y0 = TimeMLP(), torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    t = torch.linspace(0.0, 2.0, 9, dtype=F64)
    params = list(func.parameters())

    def loss(create_graph):
        y = y0.clone().requires_grad_(True)
        ys = pnode_dist.odeint(func, y, t, method=method, rtol=1e-6, atol=1e-8)
        return y, torch.autograd.grad((ys ** 2).sum(), [y] + params, create_graph=create_graph)

    _, adjoint = loss(False)
    y, graph = loss(True)
    for a, b in zip(adjoint, graph):
        assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float(a.abs().max()))
    hvp = torch.autograd.grad(sum((g * torch.ones_like(g)).sum() for g in graph), [y] + params)
    assert all(torch.isfinite(h).all() and h.abs().max() > 0 for h in hvp)


def test_time_gradient_is_differentiable():
    """dL/dt under create_graph: the first-order value equals the adjoint path's, and it can be
    differentiated again."""
    func, y0 = TimeMLP(), torch.randn(2, 3, dtype=F64)

    def grad_t(create_graph):
        t = T.clone().requires_grad_(True)
        ys = pnode_dist.odeint(func, y0, t, method="rk4", options={"step_size": 0.05})
        return torch.autograd.grad(ys.square().sum(), t, create_graph=create_graph)[0]

    plain, graph = grad_t(False), grad_t(True)
    assert float((plain - graph).abs().max()) <= 1e-12 * float(plain.abs().max())
    assert graph.requires_grad
    second = torch.autograd.grad(graph.sum(), list(func.parameters()))
    assert all(torch.isfinite(s).all() for s in second)


def test_gradient_penalty_training_step_lowers_the_loss():
    torch.manual_seed(0)
    func = TimeMLP(dim=2, hidden=8)
    y0 = torch.randn(8, 2, dtype=F64, requires_grad=True)
    target = torch.zeros(8, 2, dtype=F64)
    opt = torch.optim.SGD(func.parameters(), lr=0.05)

    def objective():
        ys = pnode_dist.odeint(func, y0, T, method="dopri5", rtol=1e-6, atol=1e-8)
        fit = (ys[-1] - target).square().mean()
        g, = torch.autograd.grad(fit, y0, create_graph=True)
        return fit + 0.1 * g.square().sum()

    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = objective()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_implicit_methods_refuse_second_derivatives():
    func, y0 = TimeMLP(), torch.randn(2, 3, dtype=F64, requires_grad=True)
    ys = pnode_dist.odeint(func, y0, T, method="cn", options={"step_size": 0.1})
    with pytest.raises(InputError, match="needs an explicit method; cn"):
        torch.autograd.grad(ys.sum(), y0, create_graph=True)
