"""Reversal strategies: how one differentiable solve keeps its forward states and reverses
them in the backward pass. A Checkpointing policy resolves to one per solve
(Checkpointing.strategy); each owns its forward and its backward.

StoreAll:  PETSc's memory trajectory keeps every step (stages included); the adjoint walks it
           back.
Revolve, Uniform (Recompute): the forward solve keeps only the states the schedule places in
           the CheckpointStore (plus y_{n-1} in a one-state tail buffer); the backward pass
           executes schedule.reversal_plan: it re-runs steps from checkpoints (replaying the
           recorded step times exactly), records the steps it is about to reverse in a
           trajectory Integrator, and applies their adjoint, carrying lambda and mu from one
           segment to the previous one. Revolve places them binomially (fewest re-runs),
           Uniform evenly.
ReplayAll: a further backward pass through a solve whose states were consumed.
solve_without_gradient: a forward solve on a trajectory-free Integrator.
"""
import time

import torch

from .._distributed.collective import raise_collectively
from .._solve.device import SOLVER_DTYPE
from .._solve.cotangents import Cotangents
from .._solve.integrator import trajectory_capacity
from .._solve.stepping import ForwardRecord
from ..errors import SolverError
from .schedule import Placement, plan_advances, reversal_plan
from .store import CheckpointStore

_PREFETCH_LOOKAHEAD = 4


def solve_without_gradient(pool, y0, t_out, control, observers=(), stats=None):
    """The outputs of a forward solve whose adjoint is never wanted (its counts into stats)."""
    integrator = pool.acquire(adjoint=False)
    try:
        outputs, record = integrator.forward(y0, t_out, control, observers)
    finally:
        pool.release(integrator)
        if stats is not None:
            stats.update(integrator.stats)
    pool.history.solved(record.steps)
    return outputs


class StoreAll:
    """Forward and adjoint on one trajectory-recording Integrator (with f's stage graphs kept
    too if `graphs`). If the graph is dropped without a backward pass, the trajectory still
    holds the steps (petsc4py cannot reset it), so the Integrator is destroyed instead of
    returned to the pool. With a `limit` (bytes, counted by `cost`: a StepCost), the forward
    stops keeping graphs, then stops altogether, before what it holds would exceed it (Spill
    continues such a solve)."""

    def __init__(self, pool, control, graphs=False, cost=None, limit=None, expected=None,
                 capacity=None):
        self.pool, self.integrator = pool, None
        if capacity is None:
            capacity = trajectory_capacity(expected, control.max_num_steps)
        self.integrator = pool.acquire(adjoint=True, nsteps=capacity)
        self.graphs = graphs
        self.limit = None if limit is None else _Limit(self.integrator, cost, limit, expected)
        self.stats = {"checkpoint_schedule": "graphs" if graphs else "all"}
        self.adjoint_done = False

    def forward(self, y0, t_out, control, observers=()):
        limit = (self.limit,) if self.limit is not None else ()
        try:
            outputs, record = self.integrator.forward(y0, t_out, control,
                                                      limit + tuple(observers), self.graphs)
        finally:
            self.stats.update(self.integrator.stats)
        if self.limit is not None:
            self.stats["memory_used"] = self.limit.used
            self.stats["memory_peak"] = self.limit.used + self.integrator.work_bytes()
        self.pool.history.solved(record.steps)
        return outputs, record

    @property
    def used(self):
        """Bytes counted against the limit (0 without one)."""
        return self.limit.used if self.limit is not None else 0

    def full(self, record):
        """Whether the forward stopped because its trajectory was full (not at its limit)."""
        return record.stopped and record.steps >= self.integrator.capacity

    def backward(self, record, grad_outputs, control):
        grads = self.integrator.backward(record, grad_outputs)
        self.adjoint_done = True
        self.stats.update(self.integrator.stats)
        return grads

    def close(self):
        if self.integrator is None:
            return
        if self.adjoint_done:
            self.pool.release(self.integrator)
        else:
            self.integrator.destroy()
        self.integrator = None

    def __del__(self):
        self.close()


class _Limit:
    """Forward-solve observer of a StoreAll with a byte limit: counts what the trajectory and
    the graph store hold after each step. Graphs are kept while they leave room for the
    trajectory of the steps still expected; then the store closes (the adjoint re-evaluates f
    where it kept none). Before the next step could pass the limit, the solve is asked to
    stop."""
    role = "keeping the memory budget"

    def __init__(self, integrator, cost, limit, expected=None):
        self.integrator, self.cost, self.limit = integrator, cost, limit
        self.expected = expected or 0
        self.used = 0

    def starting(self, pos, t, dt, state):
        pass

    def accepted(self, pos, times, state):
        cost, store = self.cost, self.integrator.graph_store
        graphs = store.size * cost.graph if store is not None else 0
        held = pos * cost.state_step + graphs
        self.used = max(self.used, held)
        ahead = max(self.expected - pos - 1, 0) * cost.state_step
        if store is not None and not store.closed and \
                held + cost.graph_step + ahead > self.limit:
            store.closed = True
        keeps_graphs = store is not None and not store.closed
        if held + (cost.graph_step if keeps_graphs else cost.state_step) > self.limit:
            self.integrator.stop_requested = True


class Spill:
    """A StoreAll head whose forward stopped (at its byte limit, or with its trajectory full),
    continued by a tail (`make_tail(head, record)`: a binomial one in the bytes left, or a
    StoreAll reserving every step left) from the state where it stopped; the backward pass
    applies the tail's adjoint, then the head's from there. The same discrete solve: the tail
    starts with the step size the head's controller proposed (fixed steps: the same steps)."""

    def __init__(self, head, make_tail, expected_steps):
        self.head, self.make_tail, self.tail = head, make_tail, None
        self.pool = head.pool
        self.expected = expected_steps
        self.stats = head.stats
        self.head_record = self.tail_record = None

    def forward(self, y0, t_out, control, observers=()):
        outputs, record = self.head.forward(y0, t_out, control, observers)
        if not (record.stopped and self.head.integrator.stop_requested):
            return outputs, record          # done (or stopped at an event)
        self.head_record = record
        k = len(record.output_steps)             # outputs 0..k-1 are the head's
        integrator = self.head.integrator
        y_stop = integrator.x_view.clone()
        tail_t = [record.times[-1]] + list(t_out[k:])
        tail_control = integrator.continuing(control)
        pool = self.head.pool
        left = None if self.expected is None else max(self.expected - record.steps, 0)
        pool.history.solved(left or None)        # the tail's expectation (adaptive steps)
        self.tail = self.make_tail(self.head, record)
        try:
            tail_outputs, tail = self.tail.forward(y_stop, tail_t, tail_control, observers)
        finally:
            self._merge_stats()
        self.tail_record = tail
        outputs[k:] = tail_outputs[1:]
        pool.history.solved(record.steps + tail.steps)
        return outputs, ForwardRecord(
            times=record.times + tail.times[1:],
            output_steps=record.output_steps + [record.steps + s for s in tail.output_steps[1:]],
            dense_times=record.dense_times + tail.dense_times[1:],
            starts={**record.starts, **{record.steps + n: y for n, y in tail.starts.items()}},
            scheme=record.scheme)

    def _merge_stats(self):
        """stats: the head's counts plus the tail's (the head's plan); memory_used is what
        both held at most, together."""
        merged = dict(self.head.stats)
        for key, value in self.tail.stats.items():
            if key in merged and isinstance(value, int) and key not in _NOT_SUMMED:
                merged[key] += value
            elif key not in _PLAN_KEYS:
                merged[key] = value
        merged["memory_used"] = self.head.used + self.tail.stats.get("memory_used", 0)
        merged["memory_peak"] = merged["memory_used"] + self.head.integrator.work_bytes()
        merged["spilled_at_step"] = self.head_record.steps
        self.stats = merged

    def backward(self, record, grad_outputs, control):
        if self.tail is None:
            return self.head.backward(record, grad_outputs, control)
        head = self.head_record
        k = len(head.output_steps)
        tail_grads = torch.cat([torch.zeros_like(grad_outputs[:1]), grad_outputs[k:]])
        grad_stop, grad_params = self.tail.backward(self.tail_record, tail_grads, control)
        head_grads = grad_outputs[:k].clone()
        steps, dense_times = list(head.output_steps), list(head.dense_times)
        if steps[-1] == head.steps and dense_times[-1] is None:  # stopped on an output time
            head_grads[-1] += grad_stop
        else:
            steps.append(head.steps)
            dense_times.append(None)
            head_grads = torch.cat([head_grads, grad_stop[None]])
        try:
            grad_y0, head_params = self.head.backward(
                ForwardRecord(head.times, steps, dense_times, head.starts), head_grads, control)
        finally:
            self._merge_stats()
        if grad_params is not None:
            grad_params = grad_params + head_params
        return grad_y0, grad_params

    def close(self):
        self.head.close()
        if self.tail is not None:
            self.tail.close()


_NOT_SUMMED = ("checkpoint_slots", "checkpoints_held", "memory_used", "memory_peak")
_PLAN_KEYS = ("checkpoint_schedule", "memory_budget", "memory_estimate")


class ReplayAll:
    """A further backward pass through a solve whose adjoint already ran (retain_graph=True,
    gradcheck, two losses on one solve): the recorded steps are re-run from y0 on a trajectory
    Integrator (the step sizes the first adjoint used), then their adjoint is applied. The same
    gradients as the first backward pass, for one more forward's time and memory."""

    def __init__(self, pool, y0):
        self.pool, self.y0 = pool, y0
        self.stats = {"checkpoint_schedule": "rerun"}

    def backward(self, record, grad_outputs, control):
        integrator = self.pool.acquire(adjoint=True, adaptive=False, nsteps=record.steps)
        try:
            grads = integrator.backward(record, grad_outputs, replay_from=self.y0)
        finally:
            self.stats.update(integrator.stats)
            self.pool.release(integrator)      # destroyed unless the adjoint completed
        return grads

    def close(self):
        pass


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


class Recompute:
    """Forward with a bounded CheckpointStore; backward by re-running segments. Subclasses
    name the placement schedule and how many steps are recorded at once."""
    schedule = None
    record_span = None           # steps recorded per segment (None: a whole segment)
    keep_graphs = False          # keep f's stage graphs of recorded steps for their adjoint
    store = None                 # (until built: the tiers can be refused)

    def __init__(self, pool, tiers, slots, state_bytes, overhead=0):
        self.pool, self.slots = pool, slots
        self.overhead = overhead     # bytes held besides the checkpoints (memory_used)
        self.store = CheckpointStore(tiers, state_bytes)
        self.keeper = None
        self.stats = {"checkpoint_schedule": self.schedule, "checkpoint_slots": slots}

    def forward(self, y0, t_out, control, observers=()):
        pool = self.pool
        placement = Placement(self.schedule, self.slots,
                              pool.history.expected_steps(pool.adaptive, t_out, control))
        self.keeper = _Keeper(self.store, placement)
        self.store.put(0, y0.to(SOLVER_DTYPE), t_out[0], 0.0)
        integrator = pool.acquire(adjoint=False)
        try:
            outputs, record = integrator.forward(y0, t_out, control,
                                                 (self.keeper,) + tuple(observers))
        finally:
            self.stats.update(integrator.stats)
            pool.release(integrator)
        pool.history.solved(record.steps)
        for pos in [p for p in self.store.held() if p >= record.steps - 1 and p > 0]:
            self.store.drop(pos)             # y_{n-1} is in the tail buffer, y_n never needed
        self.store.finish_forward(record.times)
        self.store.settle()
        raise_collectively(pool.layout.comm, self.store.error, SolverError)
        self.stats["checkpoints_held"] = len(self.store.held())
        return outputs, record

    def _state(self, pos, work, work_pos):
        if pos == work_pos:
            return work
        if pos in self.store:
            state = self.store.get(pos)
            if self.store.fallible:
                raise_collectively(self.pool.layout.comm, self.store.error, SolverError)
            return state
        if pos == self.keeper.tail_pos:
            return self.keeper.tail
        raise RuntimeError(f"checkpoint schedule error: no state for step {pos}")

    def backward(self, record, grad_outputs, control):
        pool, store = self.pool, self.store
        n, times = record.steps, record.times
        ops = reversal_plan(n, store.held(), self.slots, tail=self.keeper.tail_pos == n - 1,
                            record_span=self.record_span)
        restores = [op.a for op in ops if op.kind in ("record", "advance")]
        span = max(op.b - op.a for op in ops if op.kind == "record")
        rec = pool.acquire(adjoint=True, adaptive=False, nsteps=span)
        adv = pool.acquire(adjoint=False, adaptive=False) if plan_advances(ops) else None
        if adv is not None:
            adv.reset_errors()
        keep_graphs = bool(control.store_graphs) or self.keep_graphs
        start = time.perf_counter()
        ok = False
        try:
            cotangents = Cotangents(rec, record, grad_outputs)
            rec.start_adjoint(cotangents.at(n))
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
                    if store.fallible:
                        raise_collectively(pool.layout.comm, store.error, SolverError)
                elif op.kind == "drop":
                    store.drop(op.a)
                else:
                    work = adv.x_view if adv is not None else None
                    rec.replay(self._state(op.a, work, work_pos), times[op.a:op.b + 1],
                               keep_graphs)
                    self._adjoint_segment(rec, op.a, op.b, cotangents)
            store.settle()
            error, cause = store.error, None
            if error is None and adv is not None:
                error, cause = adv.error, adv.exception
            grads = rec.finish_adjoint(cotangents.at(0), error=error, cause=cause)
            ok = True
        finally:
            self._finish(rec, adv, ok)
        self.stats.update(rec.stats)
        self.stats.update(recomputed_steps=plan_advances(ops), recorded_steps=n,
                          backward_seconds=time.perf_counter() - start, **store.stats())
        in_memory = sum(self.stats.get(f"{tier}_bytes_peak", 0) for tier in ("host", "device"))
        if self.overhead:
            self.stats["memory_used"] = self.overhead + in_memory
        # The checkpoints, the tail buffer, the recording Integrator (its work Vecs and the
        # trajectory of one segment) and the advancing one's work Vecs.
        tail = self.keeper.tail.nbytes if self.keeper.tail is not None else 0
        self.stats["memory_peak"] = in_memory + tail + rec.held_bytes() + (
            adv.work_bytes() if adv is not None else 0)
        return grads

    @staticmethod
    def _adjoint_segment(rec, a, b, cotangents):
        """Adjoint of the recorded steps a..b-1, adding dL/dy at the output positions crossed
        (position a included; 0 is finish_adjoint's)."""
        hi = b
        for lo in cotangents.positions_below(b, a) + [a]:
            rec.adjoint_steps(hi - lo)
            hi = lo
            if lo > 0 and lo in cotangents.by_position:
                rec.add_to_lambda(cotangents.at(lo))

    def _finish(self, rec, adv, ok):
        """Return the Integrators; after a failure (raised on every rank) destroy both: they
        may hold a partial trajectory or a failed TS, and every rank must drop the same ones
        (creating an Integrator is collective)."""
        for integrator in (rec, adv):
            if integrator is None:
                continue
            if ok:
                self.pool.release(integrator)
            else:
                integrator.destroy()

    def close(self):
        if self.store is not None:
            self.store.close()
            self.store = None

    def __del__(self):
        self.close()


class Revolve(Recompute):
    """Binomial placement (Griewank-Walther): the fewest re-run steps for the slots. It records
    one step at a time: keeping f's stage graphs of that step costs little memory and saves
    re-evaluating f in its adjoint."""
    schedule = "binomial"
    record_span = 1
    keep_graphs = True


class Uniform(Recompute):
    """Checkpoints evenly spread; each segment between them is re-run once, recorded whole."""
    schedule = "uniform"
