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


@pytest.mark.parametrize("preprocess", ["whiten", "standardise"])
def test_digits_log_jacobians_equal_autograd(preprocess):
    """The log-Jacobian of y -> v (logit, then the fitted affine map) that turns the flow's
    density into one of the dequantised pixels equals log|det| of autograd's full 64 x 64
    Jacobian, per image."""
    data = densities.DequantizedImages("digits", whiten=preprocess == "whiten")
    y = data.held_out(1, seed=5)[:3, 0]
    v, logdet = data.flow_input(y)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda row: data.flow_input(row[None])[0][0],
                                                 y[b])
        sign, expected = torch.linalg.slogdet(jac)
        assert sign > 0 and abs(float(logdet[b] - expected)) < 1e-9 * abs(float(expected))
    z, logit_logdet = densities.logit_transform(y, 0.05)
    s = 0.05 + 0.9 * y
    assert torch.allclose(z, torch.logit(s), rtol=1e-12, atol=1e-12)
    assert torch.allclose(logit_logdet, torch.log(0.9 / (s * (1 - s))).sum(1), rtol=1e-12)


def test_digits_gaussian_baseline_bits_per_dim_by_hand():
    """The baseline's bits/dim on a few held-out images, recomputed directly with numpy from
    the data (the split, the fixed-seed dequantisation, the logit, a maximum-likelihood
    Gaussian of the training images' logits) equals the app's; and the held-out draws are
    dequantisations of the held-out pixels."""
    import numpy as np
    from sklearn.datasets import load_digits
    data = densities.DequantizedImages("digits", seed=0, alpha=0.05)
    pixels = load_digits().data
    perm = np.random.default_rng(0).permutation(len(pixels))
    n_test = int(round(0.2 * len(pixels)))
    assert np.array_equal(data.test.numpy(), pixels[perm[:n_test]])
    assert np.array_equal(data.train.numpy(), pixels[perm[n_test:]])
    y = data.held_out(3, seed=7)[:4]                                   # [4 images, 3 draws, 64]
    assert ((y * 17).floor() == data.test[:4, None, :]).all()
    ours = data.bits_per_dim(data.gaussian_log_prob(y)).numpy()

    def logit(p):
        s = 0.05 + 0.9 * p
        return np.log(s / (1 - s)), np.log(0.9 / (s * (1 - s))).sum(-1)

    gen = torch.Generator().manual_seed(20_000)                    # the fit's dequantisation
    fit = (np.tile(pixels[perm[n_test:]], (8, 1))
           + torch.rand(8 * (len(pixels) - n_test), 64, generator=gen, dtype=torch.float64).numpy())
    z_fit, _ = logit(fit / 17)
    mean = z_fit.mean(0)
    cov = np.cov(z_fit, rowvar=False, bias=True)
    z, log_jac = logit(y.numpy())
    d = z - mean
    maha = np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d)
    log_p = -0.5 * maha - 0.5 * np.linalg.slogdet(cov)[1] - 32 * math.log(2 * math.pi) + log_jac
    expected = (-log_p + 64 * math.log(17)) / (64 * math.log(2))
    assert np.allclose(ours, expected, rtol=1e-10, atol=0)


def test_untrained_digits_flow_is_the_gaussian_baseline():
    """With whitening and a zero last layer the untrained flow is the identity: its held-out
    bits/dim through the whole flow bookkeeping (ODE solve, exact trace, base density, affine
    and logit Jacobians) equal the Gaussian baseline's per image."""
    data = densities.DequantizedImages("digits")
    y = data.held_out(2, seed=3)[:6]
    model = cnf.CNF(64, 16, 2, "hutchinson", dict(method="rk4", comm="self",
                                                   options={"step_size": 0.25}),
                    zero_init=True).double()
    from pnode_dist.parallel import MPI
    flow, gauss = cnf.image_bits(model, data, y, MPI.COMM_SELF)
    assert flow.shape == gauss.shape == (6,)
    assert torch.allclose(flow, gauss, rtol=1e-12, atol=0)
    assert 1.0 < float(gauss.mean()) < math.log2(17)         # better than uniform pixels


def test_rnode_regularisers_are_the_kinetic_energy_and_frobenius_norm():
    """The two extra components integrate |g|^2 and |dg/dz|_F^2: their rates equal those of
    the full Jacobian (exact), and Hutchinson's |e^T J|^2 for the drawn noise; without
    regularisation the state is [z, dlogp] as before."""
    t = torch.tensor(0.4, dtype=torch.float64)
    z = torch.randn(4, 3, dtype=torch.float64)
    for trace in ("exact", "hutchinson"):
        torch.manual_seed(2)
        dyn = cnf.CNFDynamics(3, 16, 2, trace, regularise=True).double()
        dyn.set_noise(4, torch.float64)
        out = dyn(t, torch.cat([z, torch.zeros(4, 3, dtype=torch.float64)], 1))
        assert out.shape == (4, 6)
        for b in range(4):
            jac = torch.autograd.functional.jacobian(
                lambda v: dyn.net(torch.cat([v, t.expand(1)])), z[b])
            g = dyn.net(torch.cat([z[b], t.expand(1)])).detach()
            e = dyn.noise[b]
            trace_b = torch.trace(jac) if trace == "exact" else e @ jac @ e
            frob = (jac ** 2).sum() if trace == "exact" else ((e @ jac) ** 2).sum()
            assert torch.allclose(out[b, 3:], torch.stack([-trace_b, (g ** 2).sum(), frob]),
                                  rtol=1e-12, atol=1e-14)
    plain = cnf.CNFDynamics(3, 16, 2, "exact").double()
    assert plain(t, torch.cat([z, torch.zeros(4, 1, dtype=torch.float64)], 1)).shape == (4, 4)


@pytest.mark.long
def test_cnf_learns_digits_beyond_the_gaussian(tmp_path):
    """A small budget on the 64-D digits (2 ranks, Hutchinson's trace in training, the exact
    trace held out): the untrained flow's held-out bound equals the Gaussian baseline's (the
    app's own bookkeeping), and training lowers it by at least DROP bits/dim; the metrics'
    bits/dim and nats agree."""
    from conftest import run_mpi
    import json
    DROP = 0.01
    proc = run_mpi(2, ROOT / "apps" / "cnf.py", "--data", "digits", "--quick", "--no-progress",
                   "--out", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["trace"] == "hutchinson" and m["eval_trace"] == "exact" and m["dim"] == 64
    assert m["held_out_images"] == 359 and m["training_images"] == 1438
    assert m["initial_held_out_bits_per_dim"] == pytest.approx(
        m["gaussian_held_out_bits_per_dim"], rel=1e-9)
    assert m["held_out_bits_per_dim"] < m["initial_held_out_bits_per_dim"] - DROP, m["history"]
    assert m["flow_minus_gaussian_bits_per_dim"] == pytest.approx(
        m["held_out_bits_per_dim"] - m["gaussian_held_out_bits_per_dim"])
    assert m["test_nll_nats"] == pytest.approx(m["held_out_bits_per_dim"] * 64 * math.log(2))
    assert m["history"][-1]["test_bits_per_dim"] == pytest.approx(m["held_out_bits_per_dim"])
    assert "flow - Gaussian" in proc.stdout
