"""Bounded-memory backward passes: every schedule and tier mix gives the store-everything
gradients, the binomial schedule re-runs exactly revolve's optimum, budgets hold, tiers spill,
the memory-aware default plans within its budget from measured sizes (and spills a solve that
outgrows the plan), and the disk files hold what the forward computed."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TimeMLP
from pnode_dist import Checkpointing, InputError, SolverError, odeint
from pnode_dist.checkpointing import Tier
from pnode_dist.inspect import describe
from pnode_dist._reversal.schedule import revolve_cost

T = torch.tensor([0.0, 0.35, 1.0], dtype=torch.float64)
STATE_BYTES = 4 * 3 * 8


def _gradients(func, y0, method, options, policy, rtol=1e-6, t=T, store_graphs=None):
    y = y0.clone().requires_grad_(True)
    stats = {}
    ys = odeint(func, y, t, method=method, options=options, rtol=rtol, atol=rtol * 1e-2,
                checkpointing=policy, stats=stats, store_graphs=store_graphs)
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


def test_auto_with_a_host_budget_keeps_everything_when_it_fits(y0):
    func = TimeMLP()
    opts = {"step_size": 0.1}
    _, _, small = _gradients(func, y0, "rk4", opts, Checkpointing(host_bytes=10 ** 9))
    _, _, no_graphs = _gradients(func, y0, "rk4", opts, Checkpointing(schedule="all"))
    _, _, tight = _gradients(func, y0, "rk4", opts, Checkpointing(host_bytes=4 * STATE_BYTES))
    assert small["checkpoint_schedule"] == "graphs" and small["memory_budget"] == 10 ** 9
    assert no_graphs["checkpoint_schedule"] == "all"
    assert tight["checkpoint_schedule"] == "binomial" and tight["checkpoint_slots"] == 4


def _cost(func, y0, method, t0=0.0):
    """The StepCost the policy should derive, from sizes measured here independently."""
    from pnode_dist.checkpointing import StepCost
    from pnode_dist.methods import METHODS
    from pnode_dist._reversal.budget import graph_bytes
    m = METHODS[method]
    return StepCost(y0.nbytes, graph_bytes(func, list(func.parameters()), t0, y0),
                    m.states_per_step, m.graphs_per_step)


def test_default_picks_the_fastest_strategy_that_fits(y0):
    """No argument: stored graphs within half the free memory. Smaller budgets step down the
    ladder graphs > all > states > binomial; each plan's estimate is what the measured sizes
    give, what it holds stays within the budget, and the gradients stay the same."""
    from pnode_dist._reversal.budget import available_host_bytes
    func, n = TimeMLP(), 20
    opts = {"step_size": 1.0 / n}
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    _, ref, default = _gradients(func, y0, "rk4", opts, None, t=t)
    cost = _cost(func, y0, "rk4")
    assert cost.graph > 2 * y0.nbytes            # the tanh layer's saved output at least
    assert default["checkpoint_schedule"] == "graphs"
    assert 0 < default["memory_budget"] <= available_host_bytes() // 2 * 1.1
    assert default["memory_estimate"] == default["memory_used"] == n * cost.graph_step
    assert default["adjoint_f_evaluations"] == 0
    reserve = cost.record + 4 * cost.state
    budgets = {"graphs": n * cost.graph_step + reserve,
               "all": n * cost.graph_step + reserve - 1,
               "states": n * cost.state_step + reserve - 1,
               "binomial": cost.record + 6 * cost.state}
    for expected, budget in budgets.items():
        _, g, stats = _gradients(func, y0, "rk4", opts, Checkpointing(memory=budget), t=t)
        assert stats["checkpoint_schedule"] == expected, (expected, stats)
        assert stats["memory_budget"] == budget
        assert stats["memory_used"] <= stats["memory_estimate"] <= budget
        assert float((g - ref).abs().max() / ref.abs().max()) <= 1e-14, expected
    assert stats["checkpoint_slots"] == 6 and stats["recomputed_steps"] > 0
    with pytest.raises(InputError, match="cannot reverse a step"):
        _gradients(func, y0, "rk4", opts, Checkpointing(memory=cost.record), t=t)
    _, _, never = _gradients(func, y0, "rk4", opts, None, t=t, store_graphs=False)
    assert never["checkpoint_schedule"] == "all"


def _heap_in_use():
    """Bytes glibc's malloc has handed out (mallinfo2), after a garbage collection."""
    import ctypes
    import gc

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    gc.collect()
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.parametrize("store_graphs", [None, False])
def test_a_small_states_estimate_counts_the_objects_it_holds(store_graphs):
    """For a 3x2 state the objects (PETSc Vecs, tensors and autograd nodes) are most of what a
    step holds: the plan's bytes per step agree with the heap's growth per step (2000 more
    steps) within 25%. Counting the data alone gave 1/30 of it."""
    func = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()).double()
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    held, estimates = [], []
    for n in (1000, 3000):
        t = torch.tensor([0.0, n * 0.01], dtype=torch.float64)
        kw = dict(method="rk4", options={"step_size": 0.01, "max_num_steps": 5000},
                  store_graphs=store_graphs)
        odeint(lambda t, y: func(y), y0.detach(), t, **kw)     # the solver set up
        stats, before = {}, _heap_in_use()
        ys = odeint(lambda t, y: func(y), y0, t, stats=stats, **kw)
        held.append(_heap_in_use() - before)
        estimates.append(stats["memory_estimate"])
        del ys
    ratio = (held[1] - held[0]) / (estimates[1] - estimates[0])
    assert 0.8 <= ratio <= 1.25, (held, estimates)


class _HeapAtStep(torch.nn.Module):
    """tanh(linear(y)); reads the heap in use when step `at` is accepted (a step callback)."""

    def __init__(self, at):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()).double()
        self.at, self.steps, self.heap = at, 0, None

    def forward(self, t, y):
        return self.net(y)

    def callback_accept_step(self, t0, y0, dt):
        self.steps += 1
        if self.steps == self.at:
            self.heap = _heap_in_use()


def test_an_event_that_never_fires_stays_within_the_budget():
    """A solve until an event that never comes, with gradients, holds no more at its 3000th
    step than at its 1000th: at the budget (4 MiB) it spills to checkpoints. When only the
    data was counted, a 3x2 state's steps held 42 KB each: 80 MB more, the budget far exceeded."""
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    heap = []
    for n in (1000, 3000):
        func = _HeapAtStep(n)
        before = _heap_in_use()
        with pytest.raises(SolverError, match="no event by"):
            odeint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5",
                   event_fn=lambda t, y: 10 + t, options={"max_num_steps": n, "max_step": 0.1},
                   checkpointing=Checkpointing(memory=4 << 20))
        heap.append(func.heap - before)
    assert heap[1] - heap[0] < 1 << 20, heap


def test_a_solve_that_outgrows_its_plan_spills_within_the_budget(y0):
    """An adaptive solve is planned for the previous solve's step count. When a solve takes
    more steps, the forward stops keeping graphs, then continues with binomial checkpoints
    in what the budget has left: the gradients are still those of the same steps."""
    func, twin = TimeMLP(), TimeMLP()                # same weights, separate solver caches
    cost = _cost(func, y0, "dopri5")
    budget = 10 * cost.graph_step
    policy = Checkpointing(memory=budget)
    for t_end, spills in ((1.0, False), (8.0, True)):
        t = torch.tensor([0.0, 0.3 * t_end, t_end], dtype=torch.float64)
        _, g, stats = _gradients(func, y0, "dopri5", None, policy, t=t)
        _, ref, ref_stats = _gradients(twin, y0, "dopri5", None, Checkpointing(schedule="all"),
                                       t=t)
        assert stats["steps"] == ref_stats["steps"]
        assert stats["memory_used"] <= budget
        assert ("spilled_at_step" in stats) == spills, stats
        assert float((g - ref).abs().max() / ref.abs().max()) <= 1e-14
    assert 0 < stats["spilled_at_step"] < stats["steps"]
    assert stats["recomputed_steps"] >= 0 and stats["checkpoint_slots"] >= 4


_MEASURE_GRAPHS = """
import json, torch
from pnode_dist import odeint
def resident():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
torch.manual_seed(0)
func = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                           torch.nn.Linear(256, 64)).double()
y0 = torch.randn(512, 64, dtype=torch.float64, requires_grad=True)
t = torch.tensor([0.0, 1.0], dtype=torch.float64)
kw = dict(method="rk4", options={"step_size": 0.05})
with torch.no_grad():
    odeint(lambda t, y: func(y), y0, t, **kw)
stats = {}
before = resident()
ys = odeint(lambda t, y: func(y), y0, t, stats=stats, **kw)
print(json.dumps([resident() - before, stats]))
"""


def test_graph_estimate_matches_the_memory_taken():
    """The planned bytes of stored graphs against the growth of the resident set while the
    forward holds them, in a fresh process (whose allocator has no freed memory to reuse) and
    a problem large enough for its noise not to matter. glibc's mmap threshold is fixed, as in
    benchmarks/memory_peers.py: under its dynamic one, the stage copies freed during the solve
    leave heap holes that the resident set keeps (1.5x the estimate)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", _MEASURE_GRAPHS], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    grown, stats = json.loads(proc.stdout.splitlines()[-1])
    assert stats["checkpoint_schedule"] == "graphs"
    assert 0.8 <= grown / stats["memory_estimate"] <= 1.25, (grown, stats["memory_estimate"])


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


def _open_in(directory):
    """This process's open files under `directory` (their /proc/self/fd targets)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + os.sep):
            found.append(target)
    return found


def test_checkpoint_files_have_no_name_and_close_with_the_graph(tmp_path, y0):
    """A file that is not kept is unlinked once created (no death of the process can leave it
    behind); it is open until the graph is dropped, without a backward pass too."""
    func = TimeMLP()
    y = y0.clone().requires_grad_(True)
    ys = odeint(func, y, T, method="rk4", options={"step_size": 0.1},
                checkpointing=Checkpointing(schedule="binomial", slots=2, host_bytes=0,
                                            disk_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []
    (target,) = _open_in(tmp_path)
    assert target.endswith(" (deleted)") and ".rank0000-of-0001.h5" in target, target
    del ys
    assert list(tmp_path.iterdir()) == [] and _open_in(tmp_path) == []


def test_kept_files_of_dead_processes_are_removed_by_the_next_run(tmp_path, y0):
    """A kept file is written under a name with its process's id until it is sealed: one that a
    killed process left (SIGKILL, mid-write) is removed by the next disk tier on that host,
    while a living process's and another host's stay."""
    from pnode_dist._reversal import disk_tier as store
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    name = "ode-0123456789ab-00001.rank0000-of-0001.h5.part-{}-{}"
    orphan = tmp_path / name.format(dead.pid, store._PROCESS_SPACE)
    alive = tmp_path / name.format(os.getpid(), store._PROCESS_SPACE)
    foreign = tmp_path / name.format(dead.pid, "node7-4026531836")
    for path in (orphan, alive, foreign):
        path.write_bytes(b"partial")
    policy = Checkpointing(schedule="binomial", slots=2, host_bytes=0, disk_dir=str(tmp_path),
                           keep_files=True)
    _gradients(TimeMLP(), y0, "rk4", {"step_size": 0.1}, policy)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not orphan.exists() and alive.exists() and foreign.exists(), left
    kept = [n for n in left if n.endswith(".rank0000-of-0001.h5")]
    assert len(kept) == 1 and len(left) == 3, left


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


class _MyTier(Tier):
    """A tier of the user's, as minimal as it gets: no Tier.__init__, no byte counting; `fault`
    makes get() return a float32 copy, a wrong shape, other values, or raise."""
    name = "mine"

    def __init__(self, fault=None):
        self.data, self.fault = {}, fault

    def put(self, pos, state, meta):
        self.data[pos] = state.clone()

    def get(self, pos):
        state = self.data[pos]
        if self.fault == "raise":
            raise ConnectionError("the remote store is unreachable")
        if self.fault == "values":
            state = state.clone()
            state.view(-1)[0] += 1e-9
        return {"float32": state.float(), "shape": state[1:]}.get(self.fault, state)

    def drop(self, pos):
        del self.data[pos]


def _policy_over(*tiers):
    class Mine(Checkpointing):
        def tiers(self, pool, capacities=None):
            return list(tiers)
    return Mine(schedule="binomial", slots=3)


def test_a_tier_of_ones_own_is_counted_by_the_store(y0):
    ys_ref, ref, ref_stats = _gradients(TimeMLP(), y0, "rk4", {"step_size": 0.1},
                                        Checkpointing(schedule="binomial", slots=3))
    ys, g, stats = _gradients(TimeMLP(), y0, "rk4", {"step_size": 0.1}, _policy_over(_MyTier()))
    assert torch.equal(ys, ys_ref) and torch.equal(g, ref)
    assert stats["mine_checkpoints"] == ref_stats["host_checkpoints"] > 3
    assert stats["mine_bytes_peak"] == ref_stats["host_bytes_peak"] == 3 * STATE_BYTES
    with pytest.raises(InputError, match="must return pnode_dist.checkpointing.Tier"):
        _gradients(TimeMLP(), y0, "rk4", {"step_size": 0.1}, _policy_over(object()))


@pytest.mark.parametrize("fault,words", [
    ("float32", "returned a torch.float32 tensor of shape (4, 3), not the torch.float64"),
    ("shape", "of shape (3, 3), not the torch.float64 tensor of shape (4, 3)"),
    ("values", "returned other values than it was given"),
    ("raise", "ConnectionError: the remote store is unreachable")])
def test_what_a_tier_restores_is_checked(y0, fault, words):
    """A restore of the wrong dtype, shape or values, or one that raises, is a SolverError
    naming the tier and the step; the next solve works."""
    func = TimeMLP()
    _, ref, _ = _gradients(func, y0, "rk4", {"step_size": 0.1}, None)
    with pytest.raises(SolverError) as info:
        _gradients(func, y0, "rk4", {"step_size": 0.1}, _policy_over(_MyTier(fault)))
    assert "checkpoint tier 'mine' failed restoring the checkpoint of step " in str(info.value)
    assert words in str(info.value)
    _, g, _ = _gradients(func, y0, "rk4", {"step_size": 0.1}, _policy_over(_MyTier()))
    assert float((g - ref).abs().max() / ref.abs().max()) <= 1e-14
