"""The extension points take one piece each: a method is one registry entry (here a tableau
PETSc does not ship, registered with it at first use) and a checkpoint tier is one Tier
subclass that a policy lists. Both run and give exact gradients."""
from fractions import Fraction as F

import torch

from conftest import TimeMLP
from pnode_dist import METHODS, Checkpointing, odeint
from pnode_dist.methods import ExplicitRK
from pnode_dist.testing import rk_replay
from pnode_dist.checkpointing import Tier
from pnode_dist.methods import from_fractions

T = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)


def _gradients(func, y0, **kw):
    y = y0.clone().requires_grad_(True)
    ys = odeint(func, y, T, **kw)
    grads = torch.autograd.grad((ys.sin() * torch.arange(1, 4).view(3, 1, 1)).sum(),
                                [y] + list(func.parameters()))
    return ys.detach(), grads


def test_a_method_is_one_registry_entry(monkeypatch):
    ralston = from_fractions([[], [F(2, 3)]], [F(1, 4), F(3, 4)])
    monkeypatch.setitem(METHODS, "ralston", ExplicitRK("ralston", "pnode_test_ralston", 2, False,
                                                       ralston, register=True))
    func, y0 = TimeMLP(), torch.randn(4, 3, dtype=torch.float64)
    ys, grads = _gradients(func, y0, method="ralston", options={"step_size": 0.1})
    y = y0.clone().requires_grad_(True)
    ref = rk_replay(func, y, [0.1 * k for k in range(11)], [0, 4, 10], ralston)
    ref_grads = torch.autograd.grad((ref.sin() * torch.arange(1, 4).view(3, 1, 1)).sum(),
                                    [y] + list(func.parameters()))
    assert (ys - ref.detach()).abs().max() < 1e-13
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


class BytesTier(Tier):
    """Checkpoints as raw bytes (what a compressing or remote tier would do)."""
    name = "bytes"

    def __init__(self):
        super().__init__(capacity=None)
        self.data = {}

    def put(self, pos, state, meta):
        self.data[pos] = (state.cpu().numpy().tobytes(), state.shape, state.dtype)

    def get(self, pos):
        raw, shape, dtype = self.data[pos]
        return torch.frombuffer(bytearray(raw), dtype=dtype).view(shape)

    def drop(self, pos):
        del self.data[pos]


class BytesPolicy(Checkpointing):
    def tiers(self, pool):
        return [BytesTier()]


def test_a_tier_is_one_class():
    # A fixed y0 (7 steps, 9 checkpoints written): with whatever the global RNG held, a start
    # needing 4 steps left nothing to recompute.
    func = TimeMLP()
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ys, grads = _gradients(func, y0, method="dopri5")
    stats = {}
    ys_b, grads_b = _gradients(func, y0, method="dopri5", stats=stats,
                               checkpointing=BytesPolicy(schedule="binomial", slots=3))
    assert stats["bytes_checkpoints"] > 3 and stats["recomputed_steps"] > 0
    assert torch.equal(ys, ys_b)
    for a, b in zip(grads, grads_b):
        assert (a - b).abs().max() <= 1e-13 * b.abs().max()
