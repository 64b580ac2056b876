"""odeint/ODEBlock behaviour: output shape, reuse of solver objects, several graphs in flight,
float32 modules, PETSc options (dict, prefix, command line)."""
import subprocess
import sys

import torch

from conftest import ROOT, TimeMLP
from pnode_dist import METHODS, ODEBlock, odeint
from pnode_dist.testing import rk_replay

T3 = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
RK4 = {"method": "rk4", "options": {"step_size": 0.1}}


def test_output_shape_and_initial_value(mlp, y0):
    ys = odeint(mlp, y0, T3, **RK4)
    assert ys.shape == (3, *y0.shape)
    assert torch.equal(ys[0], y0)


def test_repeated_calls_are_identical_and_match_replay(mlp, y0):
    first = odeint(mlp, y0, T3, **RK4)
    second = odeint(mlp, y0, T3, **RK4)
    assert torch.equal(first, second)
    times = [i / 10 for i in range(11)]
    with torch.no_grad():
        ref = rk_replay(mlp, y0, times, [0, 5, 10], METHODS["rk4"].tableau)
    assert (first - ref).abs().max() < 1e-13


def test_two_forwards_in_flight_then_backward(mlp, y0):
    """Two graphs await their backward at once (an ODE block used twice)."""
    y0a = y0.clone().requires_grad_(True)
    mid = odeint(mlp, y0a, T3, **RK4)[-1]
    out = odeint(mlp, mid, T3, **RK4)[-1]
    out.pow(2).sum().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    gy = y0a.grad.clone()
    mlp.zero_grad()
    y0b = y0.clone().requires_grad_(True)
    times = [i / 10 for i in range(11)]
    tab = METHODS["rk4"].tableau
    ref = rk_replay(mlp, rk_replay(mlp, y0b, times, [10], tab)[0], times, [10], tab)[0]
    ref.pow(2).sum().backward()
    assert (y0b.grad - gy).abs().max() <= 1e-12 * gy.abs().max()
    for g, p in zip(grads, mlp.parameters()):
        assert (g - p.grad).abs().max() <= 1e-12 * p.grad.abs().max()


def test_forward_without_backward_does_not_break_next_solve(mlp, y0):
    y0a = y0.clone().requires_grad_(True)
    odeint(mlp, y0a, T3, **RK4)            # graph dropped without backward
    ys = odeint(mlp, y0a, T3, **RK4)
    ys.sum().backward()
    assert y0a.grad is not None and torch.isfinite(y0a.grad).all()


def test_odeblock_in_a_network(y0):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3, dtype=torch.float64),
                              ODEBlock(TimeMLP(), method="rk4", options={"step_size": 0.25}),
                              torch.nn.Linear(3, 1, dtype=torch.float64))
    out = net(y0)
    assert out.shape == (4, 1)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_float32_module_matches_float64_closely(y0):
    f64 = TimeMLP()
    f32 = TimeMLP(dtype=torch.float32)
    f32.load_state_dict({k: v.float() for k, v in f64.state_dict().items()})
    y32 = y0.float().requires_grad_(True)
    ys32 = odeint(f32, y32, T3, **RK4)
    assert ys32.dtype == torch.float32
    ys32.sum().backward()
    y64 = y0.clone().requires_grad_(True)
    ys64 = odeint(f64, y64, T3, **RK4)
    ys64.sum().backward()
    assert (ys32.double() - ys64).abs().max() < 1e-5
    assert (y32.grad.double() - y64.grad).abs().max() < 1e-4
    assert f32.l1.weight.grad.dtype == torch.float32


def test_petsc_options_dict_selects_tableau(mlp, y0):
    """petsc_options={'ts_rk_type': '4'} turns method='euler' into classical RK4."""
    ys = odeint(mlp, y0, T3, method="euler", options={"step_size": 0.1},
                petsc_options={"ts_rk_type": "4"})
    assert torch.equal(ys, odeint(mlp, y0, T3, **RK4))


def test_command_line_overrides_defaults_and_prefix_selects_block():
    script = """
import sys, torch
sys.path.insert(0, 'tests')
from conftest import TimeMLP
from pnode_dist import odeint
f, y0 = TimeMLP(), torch.ones(2, 3, dtype=torch.float64)
t = torch.tensor([0.0, 1.0], dtype=torch.float64)
kw = dict(options={"step_size": 0.1})
a = odeint(f, y0, t, method="rk4", prefix="blk_", **kw)        # -blk_ts_rk_type 1fe: Euler
b = odeint(f, y0, t, method="euler", **kw)
c = odeint(f, y0, t, method="rk4", **kw)                        # no prefix: stays RK4
d = odeint(f, y0, t, method="rk4", prefix="blk_", petsc_options={"ts_rk_type": "3"}, **kw)
print(torch.equal(a, b), torch.equal(c, b), torch.equal(d, b))
"""
    proc = subprocess.run([sys.executable, "-c", script, "-blk_ts_rk_type", "1fe"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.split() == ["True", "False", "True"], proc.stdout + proc.stderr


def test_a_longer_solve_after_a_shorter_one_reuses_the_solver_safely(mlp, y0):
    """PETSc sizes a trajectory once; a later solve with more steps on the same cached solver
    must not overflow it (it used to crash) and gives a fresh solver's gradients."""
    for t_end in (1.0, 3.0):
        t = torch.tensor([0.0, t_end], dtype=torch.float64)
        y = y0.clone().requires_grad_(True)
        odeint(mlp, y, t, method="rk4", options={"step_size": 0.1}).sum().backward()
    fresh = TimeMLP()
    y_fresh = y0.clone().requires_grad_(True)
    odeint(fresh, y_fresh, t, method="rk4", options={"step_size": 0.1}).sum().backward()
    assert torch.equal(y.grad, y_fresh.grad)
