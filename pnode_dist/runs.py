"""One differentiable solve, from its forward pass to its backward pass, under a checkpointing
policy.

StoredRun:       PETSc's memory trajectory keeps every step (stages included); the adjoint
                 walks it back.
CheckpointedRun: the forward solve keeps only the states the schedule places in the
                 CheckpointStore (plus y_{n-1} in a one-state tail buffer); the backward pass
                 executes schedule.reversal_plan: it re-runs steps from checkpoints (replaying
                 the recorded step times exactly), records the steps it is about to reverse
                 in a trajectory Integrator, and applies their adjoint, carrying lambda and mu
                 from one segment to the previous one.
"""
import math
import time

from . import h5format
from .device import SOLVER_DTYPE, SOLVER_ITEMSIZE
from .errors import SolverError
from .parallel import raise_collectively
from .schedule import Placement, plan_advances, reversal_plan
from .solver import fixed_step_count, time_slack
from .store import CheckpointStore, DeviceTier, DiskTier, MemoryTier, PinnedHostTier

_PREFETCH_LOOKAHEAD = 4


class StoredRun:
    """Forward and adjoint on one trajectory-recording Integrator. If the graph is dropped
    without a backward pass, the trajectory still holds the steps (petsc4py cannot reset it),
    so the Integrator is destroyed instead of returned to the pool."""

    def __init__(self, solver, control):
        self.solver, self.integrator = solver, None
        self.integrator = solver.acquire(adjoint=True, nsteps=control.max_num_steps)
        self.stats = {"checkpoint_schedule": "all"}
        self.adjoint_done = False

    def forward(self, y0, t_out, control, observers=()):
        try:
            outputs, record = self.integrator.forward(y0, t_out, control, observers)
        finally:
            self.stats.update(self.integrator.stats)
        self.solver.last_steps = record.steps
        return outputs, record

    def backward(self, record, grad_outputs, control):
        grads = self.integrator.backward(record, grad_outputs)
        self.adjoint_done = True
        self.stats.update(self.integrator.stats)
        return grads

    def close(self):
        if self.integrator is None:
            return
        if self.adjoint_done:
            self.solver.release(self.integrator)
        else:
            self.integrator.destroy()
        self.integrator = None

    def __del__(self):
        self.close()


class Rerun:
    """A further backward pass through a solve whose adjoint already ran (retain_graph=True,
    gradcheck, two losses on one solve): the recorded steps are re-run from y0 on a trajectory
    Integrator (the step sizes the first adjoint used), then their adjoint is applied. The same
    gradients as the first backward pass, for one more forward's time and memory."""

    def __init__(self, solver, y0):
        self.solver, self.y0 = solver, y0
        self.stats = {"checkpoint_schedule": "rerun"}

    def backward(self, record, grad_outputs, control):
        integrator = self.solver.acquire(adjoint=True, adaptive=False, nsteps=record.steps)
        try:
            grads = integrator.backward(record, grad_outputs, replay_from=self.y0)
        finally:
            self.stats.update(integrator.stats)
            self.solver.release(integrator)      # destroyed unless the adjoint completed
        return grads

    def close(self):
        pass


def expected_steps(solver, t_out, control):
    """Steps the coming solve should take: exact for fixed steps, the last solve's count for
    adaptive ones (None before the first)."""
    if solver.adaptive:
        return solver.last_steps
    slack = time_slack(t_out)
    return sum(fixed_step_count(b - a, control.step_size, slack) for a, b in zip(t_out, t_out[1:]))


def make_store(solver, policy, state_bytes):
    """The tiers the policy asks for, fastest first."""
    tiers = []
    layout = solver.layout
    on_device = layout.device.type == "cuda"
    for name, capacity in policy.capacities(on_device):
        if name == "device":
            tiers.append(DeviceTier("device", capacity, device=layout.device))
        elif name == "host" and on_device:
            tiers.append(PinnedHostTier(capacity, layout.device, policy.prefetch))
        elif name == "host":
            tiers.append(MemoryTier("host", capacity))
        else:
            solver.solves += 1
            name = (solver.prefix or "ode").rstrip("_") or "ode"
            path = h5format.checkpoint_file_name(policy.disk_dir, name, solver.file_tag(),
                                                 solver.solves, layout.rank, layout.nranks)
            attrs = dict(rank=layout.rank, nranks=layout.nranks, method=solver.method.name,
                         local_shape=layout.local_shape, global_shape=layout.global_shape,
                         dtype=str(solver.dtype).replace("torch.", ""))
            tiers.append(DiskTier(path, capacity, attrs, solver.method.name, policy.prefetch,
                                  policy.keep_files))
    return CheckpointStore(tiers, state_bytes)


class _Keeper:
    """Forward-solve observer: places checkpoints and keeps the tail buffer y_{n-1}."""
    role = "placing a checkpoint"

    def __init__(self, store, placement):
        self.store, self.placement = store, placement
        self.tail = None
        self.tail_pos = None

    def starting(self, pos, t, dt, state):
        if self.tail is None:
            self.tail = state.clone()
        else:
            self.tail.copy_(state)
        self.tail_pos = pos

    def accepted(self, pos, times, state):
        keep, drop = self.placement.decide(pos, self.store.held())
        for p in drop:
            self.store.drop(p)
        if keep:
            self.store.put(pos, state, times[pos], times[pos] - times[pos - 1])


class CheckpointedRun:
    """Forward with a bounded CheckpointStore; backward by re-running segments."""

    def __init__(self, solver, policy, schedule, slots, state_bytes):
        self.solver, self.policy = solver, policy
        self.schedule, self.slots = schedule, slots
        self.store = make_store(solver, policy, state_bytes)
        self.keeper = None
        self.stats = {"checkpoint_schedule": schedule, "checkpoint_slots": slots}

    def forward(self, y0, t_out, control, observers=()):
        solver = self.solver
        placement = Placement(self.schedule, self.slots, expected_steps(solver, t_out, control))
        self.keeper = _Keeper(self.store, placement)
        self.store.put(0, y0.to(SOLVER_DTYPE), t_out[0], 0.0)
        integrator = solver.acquire(adjoint=False)
        try:
            outputs, record = integrator.forward(y0, t_out, control,
                                                 (self.keeper,) + tuple(observers))
        finally:
            self.stats.update(integrator.stats)
            solver.release(integrator)
        solver.last_steps = record.steps
        for pos in [p for p in self.store.held() if p >= record.steps - 1 and p > 0]:
            self.store.drop(pos)             # y_{n-1} is in the tail buffer, y_n never needed
        self.store.finish_forward(record.times)
        self.store.settle()
        raise_collectively(solver.layout.comm, self.store.error, SolverError)
        self.stats["checkpoints_held"] = len(self.store.held())
        return outputs, record

    def _state(self, pos, work, work_pos):
        if pos == work_pos:
            return work
        if pos in self.store:
            state = self.store.get(pos)
            if self.store.fallible:
                raise_collectively(self.solver.layout.comm, self.store.error, SolverError)
            return state
        if pos == self.keeper.tail_pos:
            return self.keeper.tail
        raise RuntimeError(f"checkpoint schedule error: no state for step {pos}")

    def backward(self, record, grad_outputs, control):
        solver, store = self.solver, self.store
        n, times = record.steps, record.times
        ops = reversal_plan(n, store.held(), self.slots, tail=self.keeper.tail_pos == n - 1,
                            record_span=1 if self.schedule == "binomial" else None)
        restores = [op.a for op in ops if op.kind in ("record", "advance")]
        out_index = {step: k for k, step in enumerate(record.output_steps)}
        span = max(op.b - op.a for op in ops if op.kind == "record")
        rec = solver.acquire(adjoint=True, adaptive=False, nsteps=span)
        adv = solver.acquire(adjoint=False, adaptive=False) if plan_advances(ops) else None
        if adv is not None:
            adv.reset_errors()
        # Binomial records one step at a time: keeping f's stage graphs of that step costs little
        # memory and saves re-evaluating f in its adjoint.
        keep_graphs = control.store_graphs or self.schedule == "binomial"
        start = time.perf_counter()
        ok = False
        try:
            rec.start_adjoint(grad_outputs[-1])
            nrestore, work_pos = 0, None
            for op in ops:
                if op.kind in ("record", "advance"):
                    nrestore += 1
                    store.prefetch(restores[nrestore:nrestore + _PREFETCH_LOOKAHEAD])
                if op.kind == "advance":
                    adv.replay(self._state(op.a, None, None), times[op.a:op.b + 1])
                    work_pos = op.b
                elif op.kind == "store":
                    store.put(op.a, adv.x_view, times[op.a], times[op.a] - times[op.a - 1])
                elif op.kind == "drop":
                    store.drop(op.a)
                else:
                    work = adv.x_view if adv is not None else None
                    rec.replay(self._state(op.a, work, work_pos), times[op.a:op.b + 1],
                               keep_graphs)
                    self._adjoint_segment(rec, op.a, op.b, record.output_steps, out_index,
                                          grad_outputs)
            store.settle()
            error, cause = store.error, None
            if error is None and adv is not None:
                error, cause = adv.error, adv.exception
            grads = rec.finish_adjoint(grad_outputs[0], error=error, cause=cause)
            ok = True
        finally:
            self._finish(rec, adv, ok)
        self.stats.update(rec.stats)
        self.stats.update(recomputed_steps=plan_advances(ops), recorded_steps=n,
                          backward_seconds=time.perf_counter() - start, **store.stats())
        return grads

    @staticmethod
    def _adjoint_segment(rec, a, b, output_steps, out_index, grad_outputs):
        """Adjoint of the recorded steps a..b-1, adding dL/dy at the output steps crossed."""
        hi = b
        for lo in [s for s in reversed(output_steps) if a < s < b] + [a]:
            rec.adjoint_steps(hi - lo)
            hi = lo
            if lo > 0 and lo in out_index:
                rec.add_to_lambda(grad_outputs[out_index[lo]])

    def _finish(self, rec, adv, ok):
        """Return the Integrators; after a failure (raised on every rank) destroy both: they
        may hold a partial trajectory or a failed TS, and every rank must drop the same ones
        (creating an Integrator is collective)."""
        for integrator in (rec, adv):
            if integrator is None:
                continue
            if ok:
                self.solver.release(integrator)
            else:
                integrator.destroy()

    def close(self):
        if self.store is not None:
            self.store.close()
            self.store = None

    def __del__(self):
        self.close()


def new_run(solver, policy, t_out, control):
    """The run that `policy` asks for in this solve. The schedule depends only on values every
    rank shares (the largest shard's bytes, step counts), so all ranks take the same steps."""
    state_bytes = SOLVER_ITEMSIZE * max(math.prod(s) for s in solver.layout.all_local_shapes)
    schedule, slots = policy.resolve(state_bytes, expected_steps(solver, t_out, control),
                                     solver.method.states_per_step,
                                     on_device=solver.layout.device.type == "cuda")
    if schedule == "all":
        return StoredRun(solver, control)
    return CheckpointedRun(solver, policy, schedule, slots, state_bytes)
