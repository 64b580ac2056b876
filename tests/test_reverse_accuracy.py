"""Gradients of odeint equal backprop through a pure-torch replay of the same discrete solve
(same tableau, same accepted steps) to round-off, for every method, fixed and adaptive."""
import pytest
import torch

from pnode_dist import METHODS, odeint
from pnode_dist.testing import rk_record_replay
from conftest import recorded_steps

T_OUT = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)


def _loss(ys):
    # Every output time enters the loss, with different weights.
    w = torch.arange(1, ys.shape[0] + 1, dtype=ys.dtype).view(-1, *[1] * (ys.dim() - 1))
    return (w * ys.sin()).sum() + (ys[-1] ** 2).sum()


def _pnode_and_replay(mlp, y0, method, options, store_graphs, rtol=1e-6, atol=1e-8):
    y0a = y0.clone().requires_grad_(True)
    ys = odeint(mlp, y0a, T_OUT, method=method, options=options, rtol=rtol, atol=atol,
                store_graphs=store_graphs)
    params = list(mlp.parameters())
    grads = torch.autograd.grad(_loss(ys), [y0a] + params)

    # The steps PETSc took, recorded by a forward solve with the same settings.
    record = _last_record(mlp, y0, method, options, rtol, atol)
    y0b = y0.clone().requires_grad_(True)
    ys_ref = rk_record_replay(mlp, y0b, record, method)
    grads_ref = torch.autograd.grad(_loss(ys_ref), [y0b] + params)
    return ys, grads, ys_ref, grads_ref, record


def _last_record(mlp, y0, method, options, rtol, atol):
    return recorded_steps(mlp, y0, T_OUT, method, options, rtol, atol)[0]


def _assert_close(a, b, tol, what):
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-300)
    assert err <= tol * scale, f"{what}: relative error {err / scale:.2e} > {tol:g}"


EXPLICIT = sorted(m for m in METHODS if METHODS[m].kind == "explicit")


@pytest.mark.parametrize("method", EXPLICIT)
@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
@pytest.mark.parametrize("store_graphs", [False, True])
def test_gradients_equal_backprop_of_same_discrete_solve(mlp, y0, method, mode, store_graphs):
    if mode == "adaptive" and not METHODS[method].adaptive:
        options = None              # fixed-order methods: one step per output interval
    else:
        options = {"step_size": 0.05} if mode == "fixed" else None
    ys, grads, ys_ref, grads_ref, record = _pnode_and_replay(mlp, y0, method, options,
                                                             store_graphs)
    if mode == "adaptive" and METHODS[method].adaptive:
        steps = [b - a for a, b in zip(record.times, record.times[1:])]
        assert len(set(round(s, 12) for s in steps)) > 2, "adaptive solve took uniform steps"
    _assert_close(ys.detach(), ys_ref.detach(), 1e-12, "outputs")
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        _assert_close(g, gr, 1e-12, f"gradient {k}")


def test_fixed_steps_land_on_output_times(mlp, y0):
    record = _last_record(mlp, y0, "rk4", {"step_size": 0.1}, 1e-7, 1e-9)
    # 0.3 -> 3 steps, 0.4 -> 4 steps, 0.3 -> 3 steps
    assert record.output_steps == [0, 3, 7, 10]
    for k, t in zip(record.output_steps, T_OUT.tolist()):
        assert abs(record.times[k] - t) < 1e-14


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.05}), ("dopri5", None),
                                            ("bosh3", None), ("euler", {"step_size": 0.1})])
def test_store_graphs_reuses_every_forward_graph(mlp, y0, method, options):
    stats = {}
    y = y0.clone().requires_grad_(True)
    ys = odeint(mlp, y, T_OUT, method=method, options=options, rtol=1e-6, atol=1e-8,
                store_graphs=True, stats=stats)
    _loss(ys).backward()
    # The adjoint reused the forward's graphs. FSAL methods (bosh3, dopri5) linearise the first
    # stage of a step at the step's solution, which may differ from the previous step's last
    # stage in the last bit: those few are re-evaluated.
    counts = {"linearize": stats["adjoint_linearizations"],
              "reused": stats["adjoint_graphs_reused"]}
    wanted = counts["linearize"] if method in ("rk4", "euler") else 0.8 * counts["linearize"]
    assert counts["linearize"] > 0 and counts["reused"] >= wanted, counts
