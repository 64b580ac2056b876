"""Bounded-memory backward passes: every schedule and tier mix gives the store-everything
gradients, the binomial schedule re-runs exactly revolve's optimum, budgets hold, tiers spill,
and the disk files hold what the forward computed."""
import os

import pytest
import torch

from conftest import TimeMLP
from pnode_dist import Checkpointing, InputError, SolverError, odeint
from pnode_dist.inspect import describe
from pnode_dist._reversal.schedule import revolve_cost

T = torch.tensor([0.0, 0.35, 1.0], dtype=torch.float64)
STATE_BYTES = 4 * 3 * 8


def _gradients(func, y0, method, options, policy, rtol=1e-6, t=T):
    y = y0.clone().requires_grad_(True)
    stats = {}
    ys = odeint(func, y, t, method=method, options=options, rtol=rtol, atol=rtol * 1e-2,
                checkpointing=policy, stats=stats)
    weights = torch.linspace(-1, 1, ys.numel(), dtype=ys.dtype).view_as(ys)
    for p in func.parameters():
        p.grad = None
    (ys.sin() * weights).sum().backward()
    grads = torch.cat([y.grad.reshape(-1)] + [p.grad.reshape(-1) for p in func.parameters()])
    return ys.detach(), grads, stats


def _policies(tmp_path):
    disk = str(tmp_path)
    return {
        "uniform": Checkpointing(schedule="uniform", slots=4),
        "binomial": Checkpointing(schedule="binomial", slots=3),
        "binomial host+disk": Checkpointing(schedule="binomial", slots=3,
                                            host_bytes=2 * STATE_BYTES, disk_dir=disk),
        "binomial disk": Checkpointing(schedule="binomial", slots=3, host_bytes=0,
                                       disk_dir=disk),
        "binomial one slot": Checkpointing(schedule="binomial", slots=1),
        "uniform disk": Checkpointing(schedule="uniform", slots=4, host_bytes=0, disk_dir=disk),
    }


CASES = [("rk4", {"step_size": 0.05}, 1e-6), ("dopri5", None, 1e-6),
         ("cn", {"step_size": 0.1}, 1e-6), ("cn", None, 1e-3),
         ("beuler", {"step_size": 0.1, "linear_solver": "exact"}, 1e-6)]


@pytest.mark.parametrize("method,options,rtol", CASES)
def test_every_schedule_and_tier_gives_the_same_gradients(tmp_path, y0, method, options, rtol):
    func = TimeMLP()
    ys_ref, ref, _ = _gradients(func, y0, method, options, None, rtol)
    results = {}
    for name, policy in _policies(tmp_path).items():
        for attempt in ("first", "again"):        # again: placed with the known step count
            ys, g, stats = _gradients(func, y0, method, options, policy, rtol)
            assert torch.equal(ys, ys_ref), name
            err = float((g - ref).abs().max() / ref.abs().max())
            assert err <= 1e-14, f"{name} ({attempt}): {err:.2e} from store-all"
            results[name, attempt] = g
            assert stats["recorded_steps"] == stats["steps"]
    # the same schedule on other tiers: bitwise the same numbers
    for attempt in ("first", "again"):
        b = results["binomial", attempt]
        assert torch.equal(b, results["binomial host+disk", attempt])
        assert torch.equal(b, results["binomial disk", attempt])
        assert torch.equal(results["uniform", attempt], results["uniform disk", attempt])
    assert os.listdir(tmp_path) == []                # files removed after each backward pass


@pytest.mark.parametrize("n,slots", [(10, 2), (20, 3), (30, 4), (25, 1), (12, 12), (40, 6)])
def test_binomial_recomputation_is_revolve_optimal(y0, n, slots):
    func = TimeMLP()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    _, _, stats = _gradients(func, y0, "rk4", {"step_size": 1.0 / n},
                             Checkpointing(schedule="binomial", slots=slots), t=t)
    assert stats["steps"] == n
    assert stats["recomputed_steps"] == revolve_cost(n, slots - 1) - (n - 1)
    assert stats["host_bytes_peak"] <= slots * STATE_BYTES


def test_byte_budget_bounds_the_store_and_spills_to_disk(tmp_path, y0):
    func = TimeMLP()
    budget = 3 * STATE_BYTES + 10
    policy = Checkpointing(schedule="binomial", host_bytes=budget, disk_dir=str(tmp_path),
                           disk_bytes=2 * STATE_BYTES)
    _, g, stats = _gradients(func, y0, "rk4", {"step_size": 0.02}, policy)
    _, ref, _ = _gradients(func, y0, "rk4", {"step_size": 0.02}, None)
    assert stats["checkpoint_slots"] == 5                  # 3 in memory + 2 on disk
    assert stats["host_bytes_peak"] == 3 * STATE_BYTES     # filled, never above the budget
    assert 0 < stats["disk_bytes_peak"] <= 2 * STATE_BYTES
    assert stats["disk_checkpoints"] > 0 and stats["disk_write_seconds"] > 0
    assert stats["disk_prefetch_hits"] + stats["disk_prefetch_misses"] > 0
    assert float((g - ref).abs().max() / ref.abs().max()) <= 1e-14


def test_auto_keeps_everything_when_it_fits(y0):
    func = TimeMLP()
    opts = {"step_size": 0.1}
    _, _, small = _gradients(func, y0, "rk4", opts, Checkpointing(host_bytes=10 ** 9))
    _, _, tight = _gradients(func, y0, "rk4", opts, Checkpointing(host_bytes=4 * STATE_BYTES))
    assert small["checkpoint_schedule"] == "all"
    assert tight["checkpoint_schedule"] == "binomial" and tight["checkpoint_slots"] == 4


def test_kept_files_hold_the_forward_states(tmp_path, y0):
    """With an output at every step, each checkpoint in the file is an output of the solve."""
    func = TimeMLP()
    t = torch.linspace(0, 1, 13, dtype=torch.float64)
    policy = Checkpointing(schedule="binomial", slots=4, host_bytes=0, disk_dir=str(tmp_path),
                           keep_files=True)
    ys, _, stats = _gradients(func, y0, "rk4", None, policy, t=t)
    (path,) = tmp_path.iterdir()
    info = describe(str(path))
    assert info["format"] == "pnode_dist.checkpoints" and info["steps"] == 12
    assert info["attributes"]["method"] == "rk4" and info["attributes"]["nranks"] == 1
    steps = [c["step"] for c in info["checkpoints"]]
    assert len(steps) == stats["disk_checkpoints"] and 0 in steps
    for c in info["checkpoints"]:
        k = c["step"]
        assert c["time"] == pytest.approx(float(t[k]), abs=1e-14)
        assert c["shape"] == [4, 3]
        assert c["norm"] == pytest.approx(float(ys[k].norm()), rel=1e-13)


def test_graph_dropped_without_backward_removes_files(tmp_path, y0):
    func = TimeMLP()
    y = y0.clone().requires_grad_(True)
    ys = odeint(func, y, T, method="rk4", options={"step_size": 0.1},
                checkpointing=Checkpointing(schedule="binomial", slots=2, host_bytes=0,
                                            disk_dir=str(tmp_path)))
    assert len(list(tmp_path.iterdir())) == 1
    del ys
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,words", [
    (dict(schedule="revolve"), "choose one of"),
    (dict(slots=0), "integer >= 1"),
    (dict(host_bytes=-1), "number of bytes"),
    (dict(disk_bytes=100), "needs disk_dir"),
    (dict(schedule="all", slots=3), "slots applies"),
    (dict(schedule="binomial"), "needs slots"),
    (dict(schedule="uniform", host_bytes=100, disk_dir="/tmp"), "needs slots"),
])
def test_bad_policies_say_what_to_do(kwargs, words):
    with pytest.raises(InputError, match=words):
        Checkpointing(**kwargs)


@pytest.mark.parametrize("policy,words", [
    (Checkpointing(schedule="binomial", slots=5, host_bytes=2 * STATE_BYTES), "do not fit"),
    (Checkpointing(schedule="uniform", host_bytes=10), "hold no checkpoint"),
    ("binomial", "Checkpointing"),
])
def test_policies_the_budgets_cannot_hold_are_refused(y0, policy, words):
    y = y0.clone().requires_grad_(True)
    with pytest.raises(InputError, match=words):
        odeint(TimeMLP(), y, T, method="rk4", options={"step_size": 0.1},
               checkpointing=policy).sum().backward()


def test_adaptive_solves_without_or_beyond_a_step_prediction(y0):
    """The first adaptive solve of a problem places checkpoints online; a later, longer solve
    outgrows the prediction from the first. Both keep the store-all gradients."""
    policy = Checkpointing(schedule="binomial", slots=4)
    func, twin = TimeMLP(), TimeMLP()                # same weights, separate solver caches
    for t_end in (1.0, 2.5):
        t = torch.tensor([0.0, 0.5 * t_end, t_end], dtype=torch.float64)
        _, g, stats = _gradients(func, y0, "dopri5", None, policy, rtol=1e-9, t=t)
        _, ref, ref_stats = _gradients(twin, y0, "dopri5", None, None, rtol=1e-9, t=t)
        assert stats["steps"] == ref_stats["steps"] > 5
        assert stats["host_bytes_peak"] <= 4 * STATE_BYTES
        assert float((g - ref).abs().max() / ref.abs().max()) <= 1e-14


def test_unusable_disk_directory_fails_clearly(tmp_path, y0):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    y = y0.clone().requires_grad_(True)
    policy = Checkpointing(schedule="binomial", slots=3, host_bytes=0,
                           disk_dir=str(not_a_dir / "ckpt"))
    with pytest.raises(SolverError, match="choose another Checkpointing"):
        odeint(TimeMLP(), y, T, method="rk4", options={"step_size": 0.1}, checkpointing=policy)
