"""Output times by dense output: adaptive explicit methods step by their error control alone and
evaluate outputs inside steps by their interpolant, whose order is the method's; the gradients
are backprop's through the same steps and the same interpolation, under every checkpointing
plan; 'land' keeps stepping onto every output time."""
import math

import pytest
import torch

from conftest import TimeMLP
from pnode_dist import METHODS, Checkpointing, InputError, odeint
from pnode_dist.testing import recorded_steps, rk_record_replay
from test_convergence import Linear

F64 = torch.float64
INTERPOLATING = sorted(m for m in METHODS if METHODS[m].interpolates)


def test_the_adaptive_methods_with_a_dense_output_interpolate():
    assert INTERPOLATING == ["adaptive_heun", "bosh3", "dopri5", "fehlberg2", "tsit5"]


def test_output_times_add_no_steps(y0):
    func = TimeMLP()
    few, many = {}, {}
    with torch.no_grad():
        ys_few = odeint(func, y0, torch.tensor([0.0, 2.0], dtype=F64), stats=few)
        ys = odeint(func, y0, torch.linspace(0, 2, 101, dtype=F64), stats=many)
    assert many["steps"] == few["steps"] and many["f_evaluations"] == few["f_evaluations"]
    assert many["interpolated_outputs"] > 90 and few["interpolated_outputs"] == 0
    assert torch.equal(ys[-1], ys_few[-1])        # the same steps to the same end
    landed = {}
    with torch.no_grad():
        ys_land = odeint(func, y0, torch.linspace(0, 2, 101, dtype=F64),
                         options={"outputs": "land"}, stats=landed)
    assert landed["steps"] >= 100 and landed["interpolated_outputs"] == 0
    assert float((ys - ys_land).abs().max()) < 1e-6     # both within the tolerance


@pytest.mark.parametrize("method", INTERPOLATING)
def test_interpolated_outputs_converge_at_the_method_order(method):
    """Steps held at h by max_step (a loose rtol asks for more); outputs inside steps: the
    error of the interpolated outputs falls like h^order."""
    order = METHODS[method].order
    f = Linear()
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=F64)
    t = torch.tensor([0.0, 0.333, 0.715, 1.137, 1.571, 2.0], dtype=F64)
    hs = {2: (0.04, 0.02, 0.01), 3: (0.08, 0.04, 0.02), 5: (0.2, 0.1, 0.05)}[order]
    errors = []
    with torch.no_grad():
        exact = torch.stack([y0 @ torch.linalg.matrix_exp(float(s) * f.A).T for s in t])
        for h in hs:
            stats = {}
            ys = odeint(f, y0, t, method=method, rtol=0.5, atol=0.5,
                        options={"max_step": h, "first_step": h}, stats=stats)
            assert stats["interpolated_outputs"] == 4, stats
            errors.append((ys[1:-1] - exact[1:-1]).abs().max().item())
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (math.log(hs[-1]) - math.log(hs[0]))
    assert slope >= order - 0.25, f"{method}: slope {slope:.2f}, errors {errors}"


def _loss(ys):
    w = torch.arange(1, ys.shape[0] + 1, dtype=ys.dtype).view(-1, *[1] * (ys.dim() - 1))
    return (w * ys.sin()).sum()


T_MANY = torch.linspace(0.0, 1.5, 17, dtype=F64)


@pytest.mark.parametrize("policy", ["graphs", "all", "binomial", "uniform"])
def test_gradients_equal_backprop_through_steps_and_interpolant(y0, policy):
    """(A solve that outgrows its plan, with an interpolated output: test_checkpointing.)"""
    func = TimeMLP()
    checkpointing = {"graphs": None, "all": Checkpointing(schedule="all"),
                     "binomial": Checkpointing(schedule="binomial", slots=2),
                     "uniform": Checkpointing(schedule="uniform", slots=3)}[policy]
    kw = dict(rtol=1e-6, atol=1e-8)
    y = y0.clone().requires_grad_(True)
    stats = {}
    ys = odeint(func, y, T_MANY, checkpointing=checkpointing, stats=stats,
                store_graphs=True if policy == "graphs" else None, **kw)
    params = list(func.parameters())
    grads = torch.autograd.grad(_loss(ys), [y] + params)
    assert stats["interpolated_outputs"] >= 10
    # Stored stage graphs serve the interpolated outputs' cotangents; else one replay a step.
    assert (stats["adjoint_step_replays"] == 0) == (policy == "graphs"), stats
    record, _ = recorded_steps(func, y0, T_MANY, "dopri5", **kw)
    y_ref = y0.clone().requires_grad_(True)
    ys_ref = rk_record_replay(func, y_ref, record, "dopri5")
    grads_ref = torch.autograd.grad(_loss(ys_ref), [y_ref] + params)
    assert float((ys.detach() - ys_ref.detach()).abs().max()) <= 1e-13
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        err = float((g - gr).abs().max() / gr.abs().max())
        assert err <= 1e-12, f"gradient {k}: {err:.2e}"


@pytest.mark.parametrize("options,method,words", [
    ({"outputs": "interpolate"}, "rk4", "dense output"),
    ({"outputs": "interpolate", "step_size": 0.1}, "dopri5", "adaptive steps"),
    ({"outputs": "dense"}, "dopri5", "must be one of"),
])
def test_output_modes_that_cannot_be_honoured_are_refused(y0, options, method, words):
    with pytest.raises(InputError, match=words):
        odeint(TimeMLP(), y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), method=method,
               options=options)


def test_step_control_as_economical_as_torchdiffeq_and_as_accurate():
    """DETEST-like problems at rtol 1e-7: f calls within 1.1x of torchdiffeq's dopri5 in all,
    and in each case an error (against a tight reference) no worse than twice torchdiffeq's."""
    torchdiffeq = pytest.importorskip("torchdiffeq")

    def orbit(t, y):
        x, z, vx, vz = y.unbind(-1)
        r3 = (x * x + z * z) ** 1.5
        return torch.stack([vx, vz, -x / r3, -z / r3], -1)

    problems = [(lambda t, y: -y, [1.0]),
                (lambda t, y: torch.stack([2 * (y[..., 0] - y[..., 0] * y[..., 1]),
                                           -(y[..., 1] - y[..., 0] * y[..., 1])], -1),
                 [1.0, 3.0]),
                (orbit, [0.1, 0.0, 0.0, math.sqrt(1.9 / 0.1)])]
    calls = {"tdq": 0, "ours": 0}
    t = torch.linspace(0, 20, 21, dtype=F64)
    for rhs, y0 in problems:
        y0 = torch.tensor([y0], dtype=F64)
        counter = {"n": 0}

        def f(t, y):
            counter["n"] += 1
            return rhs(t, y)

        with torch.no_grad():
            ref = odeint(f, y0, t, method="verner8", rtol=1e-13, atol=1e-15,
                         options={"outputs": "land"})
            counter["n"] = 0
            theirs = torchdiffeq.odeint(f, y0, t, rtol=1e-7, atol=1e-9)
            calls["tdq"] += counter["n"]
            counter["n"] = 0
            ours = odeint(f, y0, t, rtol=1e-7, atol=1e-9)
            calls["ours"] += counter["n"]
        assert (ours - ref).abs().max() <= 2 * (theirs - ref).abs().max()
    assert calls["ours"] <= 1.1 * calls["tdq"], calls
