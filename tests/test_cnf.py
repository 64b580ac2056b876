"""The CNF app's mathematics: divergences against full Jacobians, gradients against backprop
through the same RK scheme (the adjoint differentiates through the trace), a learned density
that integrates to one, and the data sets."""
import math
import sys

import pytest
import torch

from conftest import ROOT
from pnode_dist import METHODS, odeint
from pnode_dist.testing import rk_replay

sys.path.insert(0, str(ROOT / "apps"))
import cnf  # noqa: E402
import densities  # noqa: E402


def _dynamics(dim, trace, seed=0):
    torch.manual_seed(seed)
    return cnf.CNFDynamics(dim, hidden=16, layers=2, trace=trace).double()


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_divergence_matches_the_full_jacobian(trace):
    dyn = _dynamics(3, trace)
    z = torch.randn(5, 3, dtype=torch.float64)
    dyn.set_noise(5, torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    out = dyn(t, torch.cat([z, torch.zeros(5, 1, dtype=torch.float64)], 1))
    for b in range(5):
        jac = torch.autograd.functional.jacobian(
            lambda v: dyn.net(torch.cat([v, t.expand(1)])), z[b])
        e = dyn.noise[b]
        expected = torch.trace(jac) if trace == "exact" else e @ jac @ e
        assert abs(-out[b, 3] - expected) <= 1e-12 * max(1.0, abs(expected))
    assert torch.equal(out[:, :3], dyn.net(torch.cat([z, t.expand(5, 1)], 1)).detach())


def test_hutchinson_is_unbiased():
    dyn = _dynamics(4, "hutchinson")
    z = torch.randn(1, 4, dtype=torch.float64).expand(20000, 4)
    state = torch.cat([z, torch.zeros(20000, 1, dtype=torch.float64)], 1)
    t = torch.tensor(0.5, dtype=torch.float64)
    dyn.set_noise(20000, torch.float64)
    estimate = -dyn(t, state)[:, 4]
    dyn.trace = "exact"
    exact = -dyn(t, state[:1])[0, 4]
    spread = estimate.std() / math.sqrt(len(estimate))
    assert abs(estimate.mean() - exact) <= 5 * spread and spread > 0


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_gradients_equal_backprop_through_the_same_scheme(trace):
    """The adjoint's gradient of the NLL equals backprop through a torch RK4 replay, so the
    second derivatives through the trace are exact too."""
    dyn = _dynamics(3, trace, seed=1)
    x = torch.randn(6, 3, dtype=torch.float64)
    dyn.set_noise(6, torch.float64)
    state0 = torch.cat([x, torch.zeros(6, 1, dtype=torch.float64)], 1)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def nll(out):
        return (0.5 * (out[:, :3] ** 2).sum(1) + out[:, 3]).mean()

    params = list(dyn.parameters())
    ours = torch.autograd.grad(nll(odeint(dyn, state0, t, method="rk4", comm="self",
                                          options={"step_size": 0.125})[-1]), params)
    times = [k * 0.125 for k in range(9)]
    ref = torch.autograd.grad(nll(rk_replay(dyn, state0, times, [8], METHODS["rk4"].tableau)[0]),
                              params)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13), (a - b).abs().max()


def test_learned_density_integrates_to_one():
    """exp(log p) of an untrained flow over a fine grid sums to 1: the change of variables
    (sign of the trace, base density) is right."""
    torch.manual_seed(3)
    model = cnf.CNF(2, 16, 2, "exact", dict(method="rk4", comm="self",
                                             options={"step_size": 0.1})).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)                                    # a visibly non-Gaussian flow
    n, extent = 161, 8.0
    axis = torch.linspace(-extent, extent, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = model.log_prob(grid).exp()
    cell = (2 * extent / (n - 1)) ** 2
    assert abs(float(density.sum()) * cell - 1.0) < 5e-3
    gaussian = torch.exp(-0.5 * (grid ** 2).sum(1)) / (2 * math.pi)
    assert (density - gaussian).abs().max() > 1e-2         # and it is not the base density


@pytest.mark.parametrize("name", densities.TOY)
def test_toy_densities_are_reproducible_and_bounded(name):
    a = densities.sample_toy(name, 1000, torch.Generator().manual_seed(0))
    b = densities.sample_toy(name, 1000, torch.Generator().manual_seed(0))
    assert a.shape == (1000, 2) and torch.equal(a, b)
    assert a.abs().max() < 4.0 and a.std(0).min() > 0.5


def test_tabular_stand_in_is_standardised():
    train, test = densities.load_tabular("breast-cancer")
    assert train.shape[1] == test.shape[1] == 30 and len(train) + len(test) == 569
    assert train.mean(0).abs().max() < 1e-12 and (train.std(0, unbiased=False) - 1).abs().max() < 1e-12


def test_ffjord_style_example_equals_the_app(tmp_path):
    """examples/ffjord_style.py (tuple state (z, logp), torchdiffeq's way) gives the app's
    log-likelihood and gradients (one concatenated state) to round-off, and samples by
    integrating from t=1 back to t=0 under mpiexec."""
    sys.path.insert(0, str(ROOT / "examples"))
    import ffjord_style
    torch.manual_seed(3)
    tuple_form = ffjord_style.ODEfunc(dim=2, hidden=16, layers=2).double()
    cat_form = cnf.CNFDynamics(2, hidden=16, layers=2, trace="exact").double()
    cat_form.load_state_dict(tuple_form.state_dict())
    x = densities.sample_toy("8gaussians", 6, torch.Generator().manual_seed(4))
    ours = ffjord_style.log_prob(tuple_form, x)
    ours.sum().backward()
    out = odeint(cat_form, torch.cat([x, torch.zeros(6, 1, dtype=torch.float64)], 1),
                 torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 1 / 8})[-1]
    app = ffjord_style.log_normal(out[:, :2]) - out[:, 2]
    app.sum().backward()
    assert float((ours - app).detach().abs().max()) <= 1e-12 * float(app.detach().abs().max())
    for a, b in zip(tuple_form.parameters(), cat_form.parameters()):
        assert float((a.grad - b.grad).abs().max()) <= 1e-12 * float(b.grad.abs().max())
    from conftest import run_mpi
    proc = run_mpi(2, ROOT / "examples" / "ffjord_style.py", "--quick", "--out", tmp_path,
                   timeout=120)
    assert proc.returncode == 0 and "held-out NLL" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "samples.png").is_file()
