"""The step-size rule of adaptive explicit steps (controller.py): at the same rtol/atol,
dopri5 takes torchdiffeq's steps (not more, not fewer by loosening), with torchdiffeq's
accuracy, on a decaying solution, on a nonlinear oscillator and on a batch. (A solve continued
after a stop takes the steps of one solve: test_checkpointing's spill test.)"""
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import pnode_dist

F64 = torch.float64


class Counted(nn.Module):
    """f with counters of its calls and of torchdiffeq's accepted and rejected steps."""

    def __init__(self, rhs):
        super().__init__()
        self.rhs = rhs
        self.calls = self.accepted = self.rejected = 0

    def forward(self, t, y):
        self.calls += 1
        return self.rhs(t, y)

    def callback_accept_step(self, t, y, dt):
        self.accepted += 1

    def callback_reject_step(self, t, y, dt):
        self.rejected += 1


def _van_der_pol(t, y):
    x, v = y.unbind(-1)
    return torch.stack([v, (1 - x * x) * v - x], -1)


def _solve_both(rhs, y0, t, rtol, atol):
    ours, theirs = Counted(rhs), Counted(rhs)
    stats = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Counted.callback_reject_step")   # said: not called
        y_ours = pnode_dist.odeint(ours, y0, t, rtol=rtol, atol=atol, stats=stats)
        y_theirs = torchdiffeq.odeint(theirs, y0, t, rtol=rtol, atol=atol)
    return y_ours, y_theirs, stats, ours, theirs


@pytest.mark.parametrize("rtol", [1e-4, 1e-7, 1e-10])
def test_decay_takes_torchdiffeqs_steps_with_its_accuracy(rtol):
    """y' = -y over [0, 20] (error weights matter: |y| shrinks over every step)."""
    y0, t = torch.tensor([1.0], dtype=F64), torch.linspace(0, 20, 21, dtype=F64)
    y_ours, y_theirs, stats, ours, theirs = _solve_both(lambda t, y: -y, y0, t, rtol,
                                                        rtol * 1e-2)
    # The last step lands on t[-1] (torchdiffeq steps past it and interpolates): one more.
    assert theirs.accepted <= stats["steps"] <= theirs.accepted + 1, (stats, theirs.accepted)
    assert stats["rejected_steps"] <= theirs.rejected
    exact = torch.exp(-t)[:, None]
    err_ours = float((y_ours - exact).abs().max())
    err_theirs = float((y_theirs - exact).abs().max())
    assert err_ours <= 1.5 * err_theirs, (err_ours, err_theirs)


@pytest.mark.parametrize("rtol", [1e-4, 1e-7])
def test_van_der_pol_costs_what_torchdiffeq_costs(rtol):
    """A nonlinear oscillator with rejected steps: f calls within 5% of torchdiffeq's, and the
    error against a tight reference within 2x of torchdiffeq's."""
    y0, t = torch.tensor([[2.0, 0.0]], dtype=F64), torch.linspace(0, 10, 21, dtype=F64)
    y_ours, y_theirs, stats, ours, theirs = _solve_both(_van_der_pol, y0, t, rtol,
                                                        rtol * 1e-2)
    with torch.no_grad():
        ref = pnode_dist.odeint(_van_der_pol, y0, t, method="verner8", rtol=1e-13, atol=1e-15)
    assert ours.calls <= 1.05 * theirs.calls, (ours.calls, theirs.calls)
    assert stats["steps"] <= theirs.accepted + 2, (stats, theirs.accepted)
    err_ours = float((y_ours - ref).abs().max())
    err_theirs = float((y_theirs - ref).abs().max())
    assert err_ours <= 2 * err_theirs, (err_ours, err_theirs)


def test_each_batch_element_weighs_its_own_error():
    """A batch whose elements decay at rates 1 and 10: the error weights are per element (a
    batch-wide weight would give the fast element torchdiffeq's rule for the slow one)."""
    rates = torch.tensor([[1.0], [10.0]], dtype=F64)
    y0, t = torch.ones(2, 1, dtype=F64), torch.linspace(0, 3, 31, dtype=F64)
    _, _, stats, _, theirs = _solve_both(lambda t, y: -rates * y, y0, t, 1e-7, 1e-9)
    assert theirs.accepted <= stats["steps"] <= theirs.accepted + 1, (stats, theirs.accepted)

