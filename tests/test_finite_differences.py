"""Finite-difference check of the parameter and initial-state gradients (adaptive dopri5 with
tight tolerances, and fixed-step rk4)."""
import pytest
import torch

from conftest import central_difference
from pnode_dist import odeint


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.05}), ("dopri5", None)])
def test_gradient_matches_central_differences(mlp, y0, method, options):
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def loss(y_init):
        ys = odeint(mlp, y_init, t, method=method, options=options, rtol=1e-12, atol=1e-12)
        return (ys[1] ** 2).sum() + ys[-1].sum()

    y0a = y0.clone().requires_grad_(True)
    loss(y0a).backward()
    # eps well above round-off and above the jumps of an adaptive solve whose step sequence
    # changes with the perturbation (at eps=1e-6 one such jump, 4e-12 in the loss, made a
    # difference of 2e-6 with interpolated outputs; the gradient agrees to 3e-10 at 1e-5).
    eps = 1e-5
    checks = [(mlp.l1.weight, (0, 1)), (mlp.l2.bias, (2,)), (mlp.c, (3,))]
    for p, idx in checks:
        fd = central_difference(lambda: loss(y0), p, idx, eps)
        assert abs(p.grad[idx].item() - fd) <= 1e-6 * max(1.0, abs(fd)), (p.grad[idx], fd)
    with torch.no_grad():
        e = torch.zeros_like(y0)
        e[1, 2] = eps
        fd = (loss(y0 + e).item() - loss(y0 - e).item()) / (2 * eps)
    assert abs(y0a.grad[1, 2].item() - fd) <= 1e-6 * max(1.0, abs(fd))
