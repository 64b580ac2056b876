"""apps/pde.py's model and loss: the default model family holds the true lambda-omega system
exactly (so a recovered stencil is meaningful), its stencils are conservative, the equivariant
reaction commutes with rotations of (u, v), and the cell-difference loss term reads across
patch edges as a periodic roll of the whole field does. The app's runs are in test_apps.py."""
import importlib.util
import math

import pytest
import torch

from conftest import ROOT
from pnode_dist import Grid, InputError

spec = importlib.util.spec_from_file_location("pde_app", ROOT / "apps" / "pde.py")
pde = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pde)


def field(n=12, seed=0):
    return torch.randn(2, n, n, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def test_default_model_holds_the_true_system():
    n = 12
    dx = 2 * pde.EXTENT / n
    model = pde.LearnedRD("cross", "equivariant", hidden=8).double()
    with torch.no_grad():
        model.stencil.arms.fill_(pde.DIFFUSION / dx ** 2)
        model.reaction.net[-1].weight.zero_()
        model.reaction.net[-1].bias.zero_()
        # g(A^2) = (1 - A^2) - i beta A^2
        model.reaction.linear.copy_(torch.tensor([[1.0, -1.0], [0.0, -pde.BETA]]))
    y, t = field(n), torch.zeros((), dtype=torch.float64)
    true = pde.LambdaOmega(dx)(t, y)
    assert torch.allclose(model(t, y), true, rtol=0, atol=1e-13 * float(true.abs().max()))
    assert torch.allclose(model.stencil.kernel()[0, 0], pde.LAPLACIAN * pde.DIFFUSION / dx ** 2)


@pytest.mark.parametrize("kind", ["cross", "full"])
def test_constrained_stencils_are_conservative(kind):
    stencil = pde.Stencil(kind).double()
    with torch.no_grad():
        stencil.arms.copy_(torch.randn(stencil.arms.shape, dtype=torch.float64))
    kernel = stencil.kernel()
    assert kernel.shape == (2, 1, 3, 3)
    assert torch.allclose(kernel.sum(dim=(2, 3)), torch.zeros(2, 1, dtype=torch.float64),
                          atol=1e-14)
    assert int((kernel[0, 0] != 0).sum()) == (5 if kind == "cross" else 9)
    constant = torch.full((2, 6, 6), 0.7, dtype=torch.float64)
    assert stencil(constant).abs().max() < 1e-14           # a constant field does not diffuse


def test_equivariant_reaction_commutes_with_rotations():
    reaction = pde.Reaction("equivariant", hidden=8).double()
    with torch.no_grad():
        reaction.linear.copy_(torch.randn(2, 2, dtype=torch.float64))
    y, phi = field(), 0.9
    rotate = torch.tensor([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]],
                          dtype=torch.float64)
    turned = torch.einsum("ij,jhw->ihw", rotate, y)
    assert torch.allclose(reaction(turned), torch.einsum("ij,jhw->ihw", rotate, reaction(y)),
                          atol=1e-13)


def test_gradient_term_reads_across_edges_like_a_periodic_roll():
    n = 10
    grid = Grid((n, n), channels=2, periodic=True, halo=1, comm="self")
    error = torch.stack([field(n, 1), field(n, 2)]).requires_grad_(True)
    got = pde.difference_error(grid, error)
    want = sum(((torch.roll(error, -1, dims=d) - error) ** 2).sum() for d in (2, 3))
    assert torch.allclose(got, want, rtol=1e-14)
    g_got, = torch.autograd.grad(got, error)
    g_want, = torch.autograd.grad(want, error)
    assert torch.allclose(g_got, g_want, rtol=1e-13, atol=1e-13)
    with pytest.raises(InputError, match="this rank's shape"):
        grid.with_halo(error[0, :, 1:])
    grid.destroy()


def test_warmup_then_cosine():
    factor = pde.warmup_cosine(100, 10)
    assert [factor(i) for i in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert factor(10) == 1.0 and abs(factor(55) - 0.5) < 1e-12 and factor(100) < 1e-12
