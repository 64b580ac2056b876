"""What a problem holds between calls and what its trajectory reserves (_solve/integrator.py's
IntegratorPool and reserve, _reversal/strategies.py's StoreAll/Spill), and the float32 note."""
import warnings

import pytest
import torch

from conftest import TimeMLP
from pnode_dist import Checkpointing, odeint
from pnode_dist._solve import integrator as integrator_module
from pnode_dist._solve import pool as pool_module

F64 = torch.float64
T = torch.tensor([0.0, 1.0], dtype=F64)


def _gradient(func, y0, method, options=None, policy=None, stats=None, rtol=1e-6):
    y = y0.clone().requires_grad_(True)
    ys = odeint(func, y, T, method=method, options=options, rtol=rtol, atol=rtol * 1e-2,
                checkpointing=policy, stats=stats)
    ys[-1].square().sum().backward()
    return ys.detach(), y.grad


def _idle(func):
    """The idle Integrators of func's pools."""
    from pnode_dist import _pipeline
    return [i for key, pool in _pipeline._pools.items() if key[0] == id(func)
            for kind in pool._idle.values() for i in kind]


@pytest.mark.parametrize("policy", [None, Checkpointing(schedule="binomial", slots=2)])
def test_a_large_problem_holds_no_solver_between_calls(policy):
    """A state of 1 MiB: its Integrators (work Vecs, trajectory) are freed when the call
    ends; a small problem keeps its own for the next call (they cost less than re-creating
    them)."""
    large, stats = TimeMLP(dim=64, hidden=16), {}
    _gradient(large, torch.randn(2048, 64, dtype=F64) * 0.1, "rk4", {"step_size": 0.25}, policy,
              stats)
    assert _idle(large) == [] and stats["memory_held"] == 0
    small, stats = TimeMLP(), {}
    _gradient(small, torch.randn(4, 3, dtype=F64), "rk4", {"step_size": 0.25}, policy, stats)
    idle = _idle(small)
    assert idle and all(i.held_bytes() <= pool_module.KEEP_IDLE_BYTES for i in idle)
    assert stats["memory_held"] == sum(i.held_bytes() for i in idle)


@pytest.mark.parametrize("policy", [Checkpointing(schedule="all"), None])
def test_a_solve_longer_than_its_trajectory_continues_in_another(monkeypatch, policy):
    """An adaptive solve reserves a trajectory of about twice the previous solve's steps (here
    8 before the first): a longer one stops when it is full and continues in a StoreAll that
    reserves every step left. The same steps, outputs and gradients as with a trajectory
    large enough from the start."""
    func = TimeMLP()
    y0 = torch.randn(4, 3, dtype=F64)
    ys_ref, g_ref = _gradient(func, y0, "dopri5", policy=Checkpointing(schedule="all"),
                             rtol=1e-10)
    monkeypatch.setattr(integrator_module, "_MIN_CAPACITY", 8)
    fresh = TimeMLP()                    # a new problem: no step count known yet
    stats = {}
    ys, g = _gradient(fresh, y0, "dopri5", policy=policy, stats=stats, rtol=1e-10)
    assert stats["steps"] > 8 and stats["spilled_at_step"] == 8
    assert torch.equal(ys, ys_ref)
    assert float((g - g_ref).abs().max() / g_ref.abs().max()) <= 1e-14
    stats = {}                           # the next solve reserves for the steps now known
    ys, g = _gradient(fresh, y0, "dopri5", policy=policy, stats=stats, rtol=1e-10)
    assert "spilled_at_step" not in stats and torch.equal(ys, ys_ref)


def test_a_float32_state_on_the_float64_build_is_noted_once(monkeypatch):
    from pnode_dist import _pipeline
    from pnode_dist._solve.device import SOLVER_DTYPE
    monkeypatch.setattr(_pipeline, "_warned_float32", [])
    func = TimeMLP(dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _gradient(func, torch.randn(4, 3), "rk4", {"step_size": 0.25})
    notes = [w for w in caught if "PNODE_PRECISION=single" in str(w.message)]
    assert len(notes) == (1 if SOLVER_DTYPE == torch.float64 else 0)


@pytest.mark.parametrize("method,policy", [
    ("rk4", None), ("dopri5", None), ("rk4", Checkpointing(schedule="binomial", slots=2))])
def test_stored_graphs_are_freed_after_the_backward_pass(method, policy):
    """Stored graphs (with their stage inputs) die with the backward pass: none is left after
    repeated calls (a saved tensor kept with its grad_fn made each graph a cycle Python's
    collector cannot see)."""
    import gc
    from pnode_dist._solve.explicit import StageInput
    func = TimeMLP()
    y0 = torch.randn(4, 3, dtype=F64)
    opts = {"step_size": 0.1} if method == "rk4" else None
    for _ in range(3):
        stats = {}
        _gradient(func, y0, method, opts, policy, stats)
        assert stats["adjoint_graphs_reused"] > 0
    gc.collect()
    assert sum(type(o) is StageInput for o in gc.get_objects()) == 0
