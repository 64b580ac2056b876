"""The PETSc side of one ODE problem: one TS and its Vecs, the forward solve through the output
times, re-runs of recorded steps, and the discrete adjoint between output times.

An Integrator's TS is set up by ts_setup.py; its steps are chosen and recorded by a Stepping
policy (stepping.py, from PETSc's post-step callback); failures are worded by failures.py; the
adjoint's cotangents at the output positions come from cotangents.py. An IntegratorPool
(pool.py) keeps Integrators for one problem configuration, so that several forward passes may
await their backward at once (an ODE block used twice in a network); each differentiable
solve's reversal strategy (_reversal/strategies.py) leases them until its backward pass (or
the graph's destruction) returns them.
"""
import time
from dataclasses import replace

import torch

from .._distributed.collective import (CAUSE, CONSEQUENCE, SYMPTOM, PETSc, allreduce_sum,
                                      raise_collectively)
from ..errors import SolverError
from . import dense, ts_setup
from .controller import ExplicitController
from .cotangents import Cotangents
from .device import SOLVER_DTYPE, VEC_OVERHEAD
from .explicit import GraphStore
from .failures import incomplete, petsc_failure, reason_name
from .first_step import initial_step
from .guard import guarded, released
from .lifetime import keep_forever, pin_comm
from .rk_register import ts_tableau
from .stepping import ForwardRecord, Replaying, StepControl, Stepping
from .trapezoid_control import TrapezoidControl
from .views import touch, vec_view

_MIN_CAPACITY = 1024                 # trajectory steps reserved at least


def capacity_for(nsteps):
    """The trajectory steps an Integrator leased for `nsteps` reserves (_MIN_CAPACITY at least)."""
    return max(nsteps, _MIN_CAPACITY)


def trajectory_capacity(expected, max_num_steps):
    """Steps a forward solve's trajectory reserves: twice the steps expected, at least
    _MIN_CAPACITY, at most max_num_steps (a solve that fills it stops: record.stopped)."""
    return min(max_num_steps, max(_MIN_CAPACITY, 2 * (expected or 0)))


class Integrator:
    """One PETSc TS for a problem; with `adjoint=True` it records a memory trajectory and
    carries the Jacobian Mats the discrete adjoint applies."""

    def __init__(self, layout, method, func, params, dtype, prefix, petsc_options, adaptive,
                 adjoint, setup):
        self.layout, self.method = layout, method
        self.adaptive, self.adjoint = adaptive, adjoint
        shape, dev = layout.local_shape, layout.device
        self.on_gpu = dev.type == "cuda"
        # The explicit part (RHS form) and the implicit part (IFunction), None where unused.
        self.rhs, self.ifun = method.parts(func, params, shape, dtype, dev, setup)
        self.parts = [p for p in (self.rhs, self.ifun) if p is not None]
        self._contexts = []          # the Python Mat/PC contexts PETSc holds (see destroy)
        nparams = self.parts[0].nparams
        comm = layout.comm
        pin_comm(comm)
        ts = PETSc.TS().create(comm=comm)
        if prefix:
            ts.setOptionsPrefix(prefix)
        ts.setProblemType(PETSc.TS.ProblemType.NONLINEAR)
        method.configure(ts, setup)
        self.x = layout.create_state_vec()
        self.x_view = vec_view(self.x, shape)
        self.mu = None
        if adjoint:
            self.lam = self.x.duplicate()
            self.lam_view = vec_view(self.lam, shape)
            if nparams:
                self.mu = layout.create_param_vec(nparams)
        self.linear_solver, trapezoid = ts_setup.configure(self, ts, setup, prefix,
                                                           petsc_options, nparams)
        self.ts = ts
        self.step_limits = ts.getStepLimits()    # PETSc's (-ts_adapt_dt_min/max), per solve
        self.trapezoid = TrapezoidControl(self) if trapezoid else None
        # The tableau and dense output PETSc integrates with (after the options): interpolated
        # outputs and their cotangents use exactly these.
        self.tableau, self.dense = (ts_tableau(ts) if method.kind == "explicit"
                                    else (None, None))
        self.step_start = None       # the state at the start of the step under way
        # torchdiffeq's step-size rule for adaptive explicit steps (controller.py).
        self.controller = (ExplicitController(self.x, shape)
                           if adaptive and method.kind == "explicit" else None)
        self._work = None            # (Vec, view) receiving interpolated outputs
        self._stepping, self.observers = None, ()
        self.event = None            # the EventLocator of an event solve under way
        self.stats = {}
        self.capacity = None         # steps the trajectory can hold (set on first use)
        self.recorded = 0            # the most steps its trajectory has held
        self.replayed = False        # has re-run recorded segments (see destroy)
        # False from the start of a solve or adjoint until it completes on every rank: a TS
        # left in a failed state (PETSc error 73 on its next use) is destroyed, never pooled
        # again. The same on every rank: pools must stay alike, since creating an Integrator
        # is collective.
        self.healthy = True
        self.failure = None          # (CONSEQUENCE, why) a solve, re-run or adjoint failed
        self.stop_requested = False  # set by an observer: end the forward solve after this step
        if self.rhs is not None and layout.nranks > 1 and layout.evaluates_collectively:
            self.rhs.agree_comm = layout.comm.tompi4py()

    def reserve(self, nsteps):
        """Size the memory trajectory for solves of up to `nsteps` steps. PETSc sizes its stack
        once, at the first solve, from the max steps and the first step size; a longer solve
        on the same TS was seen to corrupt memory, so a forward solve stops when the trajectory
        is full (record.stopped: a continuation takes over). A solve that takes no step (its
        step number already at the maximum) sets it up here, with a margin."""
        if not self.adjoint:
            return
        if self.capacity is not None:
            if nsteps > self.capacity:
                raise RuntimeError(f"trajectory capacity {self.capacity} < {nsteps} steps: "
                                   "acquire the Integrator with nsteps")
            return
        ts = self.ts
        ts.setTime(0.0)
        ts.setTimeStep(1.0)
        ts.setMaxTime(float(nsteps + 8))
        ts.setMaxSteps(nsteps + 8)
        ts.setStepNumber(nsteps + 8)
        ts.solve(self.x)
        self.capacity = nsteps

    def _counts(self):
        """Callback counters summed over the parts (f evaluations, jvps, vjps...)."""
        total = {}
        for p in self.parts:
            for k, v in p.counts.items():
                total[k] = total.get(k, 0) + v
        return total

    def _counts_since(self, before):
        names = {"rhs": "f_evaluations", "linearize": "linearizations", "reused": "graphs_reused",
                 "vjp": "vjps", "jvp": "jvps", "blocks": "jacobian_blocks"}
        return {names[k]: v - before.get(k, 0) for k, v in self._counts().items()}

    @property
    def error(self):
        """The first error since the last reset, as (severity, message): an exception in a
        callback (the cause) before a failure of PETSc's solve (often its consequence)."""
        cause = next((p.error for p in self.parts if p.error is not None), None)
        return (CAUSE, cause) if cause is not None else self._explained(self.failure)

    def _explained(self, error):
        """A failure of PETSc or a non-finite result, preceded by where f (or a derivative)
        first gave NaN/Inf, if it did: then that is the cause."""
        note = next((p.nonfinite for p in self.parts if p.nonfinite is not None), None)
        if error is None or note is None or error[0] == CAUSE:
            return error
        return (CAUSE, f"{note}, and then: {error[1]}")

    def _set_phase(self, phase):
        for p in self.parts:
            p.phase = phase

    @property
    def exception(self):
        """The user's exception behind `error`, if it is one (chained to the SolverError)."""
        return released(next((p.exception for p in self.parts if p.error is not None), None))

    def reset_errors(self):
        for p in self.parts:
            p.clear()
        self.failure = None

    # ---------------------------------------------------------------- forward
    def _pre_step(self, ts):
        if self.ifun is not None:
            self.ifun.new_step()
        store = self.graph_store
        if store is not None:        # the trajectory holds the stages of the steps taken
            store.release_inputs(keep_last=1)
        stepping = self._stepping
        keep_start = stepping is not None and (getattr(stepping, "interpolate", False)
                                               or getattr(stepping, "controller", None) is not None
                                               or self.event is not None)
        if self.on_gpu and (self.observers or keep_start):
            touch(self.x, "r")
        if keep_start:
            self.step_start.copy_(self.x_view)
        if self.observers:
            step, t, dt = ts.getStepNumber(), ts.getTime(), ts.getTimeStep()
            self._notify("starting", step, t, dt, self.x_view)

    def interpolated(self, t):
        """The dense output at time t inside the step just accepted (PETSc's TSInterpolate)."""
        if self._work is None:
            vec = self.x.duplicate()
            self._work = (vec, vec_view(vec, self.layout.local_shape))
        vec, view = self._work
        self.ts.interpolate(t, vec)
        if self.on_gpu:
            touch(vec, "r")
        return view

    def stage_graphs(self, t_start, t_end):
        """f's graphs at the stages of the step just accepted, [(y_leaf, f)] in stage order,
        if the forward keeps them (a GraphStore), else None."""
        store = self.graph_store
        if store is None or self.tableau is None:
            return None
        return store.step_graphs(self.tableau, t_start, t_end, self.step_start)

    def _first_step(self, y0, t_out, control):
        """The first step from f at the start (adaptive solves without first_step, implicit
        ones too unless a mass matrix hides ydot), or None. An exception in f is recorded like
        any callback's (raised after the solve)."""
        if not (self.adaptive and control.first_step is None):
            return None
        if self.ifun is not None and self.ifun.mass is not None:
            return None
        mpi = self.layout.comm.tompi4py() if self.layout.nranks > 1 else None

        def total(x):
            return mpi.allreduce(x) if mpi is not None else x

        # The norms are sums over every rank: the same step everywhere.
        return initial_step(self.torch_f(), t_out[0], y0, t_out[-1] - t_out[0],
                            self.method.order - 1, control.rtol, control.atol, total)[0]

    def torch_f(self):
        """f(t: float, y) (the sum of the parts: explicit and implicit) in the solver precision
        outside PETSc's callbacks (counted), or NaN after an exception (recorded, raised on
        every rank after the solve): every rank must still take part in what follows."""
        def f(t, y):
            total = None
            for part in self.parts:
                part.counts["rhs"] += 1
                with guarded(part, part._in_func(t)) as call, torch.no_grad():
                    out = part._evaluate(t, y.to(part.dtype)).to(SOLVER_DTYPE)
                if call.failed:
                    return torch.full_like(y, float("nan"))
                total = out if total is None else total + out
            return total
        return f

    def _notify(self, event, step, *args):
        """Tell the observers of a step event; once anything failed, they are told no more."""
        for observer in self.observers:
            if self.error is None:
                with guarded(self.parts[0], lambda: f"{observer.role} (step {step})"):
                    getattr(observer, event)(step, *args)

    def _post_step(self, ts):
        if self.ifun is not None:            # PETSc's re-runs call post-step, not pre-step
            self.ifun.new_step()
        if ts.getConvergedReason() < 0:      # PETSc calls it after a failed step too
            return
        if self.rhs is not None and self.rhs.store is not None:
            self.rhs.store.accept_step()
        if self.on_gpu:              # the state is read (outputs, checkpoints) every step
            touch(self.x, "r")
        with guarded(self.parts[0], "the step bookkeeping"):
            self._stepping.post_step(self, ts)

    @property
    def graph_store(self):
        """The GraphStore of the forward solve or re-run under way (None if none)."""
        return self.rhs.store if self.rhs is not None else None

    def forward(self, y0, t_out, control: StepControl, observers=(), graphs=False):
        """Solve from t_out[0] through every output time; returns (outputs, record).
        outputs has shape [len(t_out), *local_shape], in the solver precision, on the
        layout's device.
        observers (checkpoint placement, the user's step callbacks): observer.starting(step,
        t, dt, state) before each step, observer.accepted(step, times, state) after each
        accepted one; `role` names them in errors; one may set `stop_requested` to end the
        solve after the step (record.stopped; outputs after the last time reached are unset).
        graphs: keep f's stage graphs for the adjoint (a trajectory Integrator only)."""
        ts = self.ts
        self.reserve(min(control.max_num_steps, _MIN_CAPACITY))
        self.observers = tuple(observers)
        self.event = next((o for o in observers if getattr(o, "locates_event", False)), None)
        outputs = torch.empty((len(t_out),) + self.layout.local_shape, dtype=SOLVER_DTYPE,
                              device=self.layout.device)
        outputs[0].copy_(y0)
        touch(self.x, "w")
        self.x_view.copy_(y0)
        self.x.stateIncrease()
        interpolate = control.interpolate and self.adaptive and self.dense is not None
        stepping = Stepping(t_out, control, self.adaptive, outputs, interpolate,
                             self.controller)
        if self.tableau is not None:
            stepping.record.scheme = (self.tableau, self.dense)
        if self.step_start is None and (interpolate or self.controller is not None
                                        or self.event is not None):
            self.step_start = torch.empty_like(self.x_view)
        self.reset_errors()
        self._set_phase("the forward solve")
        before = self._counts()
        chosen = self._first_step(outputs[0], t_out, control)
        self._stepping = stepping
        if self.rhs is not None:
            self.rhs.store = GraphStore() if (self.adjoint and graphs) else None
        self.stop_requested = False
        if self.adaptive:
            if self.controller is not None:
                self.controller.begin(ts, control.rtol, control.atol, control.first_weights)
            else:
                ts.setTolerances(rtol=control.rtol, atol=control.atol)
            if self.trapezoid is not None:
                self.trapezoid.begin(t_out[0], outputs[0], control.rtol, control.atol)
            low, high = self.step_limits
            ts.setStepLimits(control.min_step or low, control.max_step or high)
        ts.setTime(t_out[0])
        ts.setStepNumber(0)
        ts.setMaxTime(t_out[-1])
        ts.setMaxSteps(control.max_num_steps)
        ts.setTimeStep(stepping.first_dt(chosen))
        ts.setConvergedReason(PETSc.TS.ConvergedReason.CONVERGED_ITERATING)
        self.healthy = False
        try:
            failure = self._solve(self.x)
        finally:
            self._stepping, self.observers = None, ()
            if self.graph_store is not None:
                self.graph_store.release_inputs()
        if self.adjoint:
            self.recorded = max(self.recorded, stepping.record.steps)
        rejected = ts.getStepRejections() + (self.trapezoid.rejected if self.trapezoid else 0)
        self.stats = {"steps": stepping.record.steps, "rejected_steps": rejected,
                      "newton_iterations": ts.getSNESIterations(),
                      "newton_failures": ts.getSNESFailures(),
                      **({"linear_solver": self.linear_solver} if self.linear_solver else {}),
                      "linear_iterations": ts.getKSPIterations(),
                      "interpolated_outputs": sum(t is not None
                                                  for t in stepping.record.dense_times),
                      **self._counts_since(before)}
        try:
            self._check_forward(stepping, outputs, failure)
        finally:
            self.event = None        # the locator holds the user's event_fn
        self.healthy = True
        return outputs, stepping.record

    def continuing(self, control):
        """The StepControl that continues the forward solve this Integrator stopped (a new
        solve from its last state): the next step and its error weights as they would have
        been, so that the steps are the same as those of one solve."""
        weights = self.controller.view.clone() if self.controller is not None else None
        return replace(control, first_step=self.ts.getTimeStep(), first_weights=weights)

    def _solve(self, x):
        """TSSolve; PETSc's own error (a step adaptor giving up, an exception that escaped a
        callback) is returned as (severity, message), to be raised collectively with the
        callbacks' errors. KeyboardInterrupt and SystemExit are not solver failures: they
        propagate (on one rank only, the job is then aborted: parallel.abort_on_uncaught)."""
        try:
            self.ts.solve(x)
        except PETSc.Error as exc:
            return petsc_failure(self.ts, exc, "the integration",
                                 "(a step adaptor giving up after repeated rejections): check "
                                 "f for blow-up, or loosen rtol/atol")
        return None

    def _check_forward(self, stepping, outputs, failure=None):
        error = self.error
        if error is None:
            error = failure
        reason = self.ts.getConvergedReason()
        if error is None and not (stepping.done or stepping.record.stopped):
            error = (CONSEQUENCE, incomplete(self.ts, stepping, reason, self.event is not None,
                                             self.ifun is not None))
        reached = outputs[:stepping.k]
        if error is None and not bool(torch.isfinite(reached).all()):
            bad = int((~torch.isfinite(reached.reshape(stepping.k, -1))).any(1).nonzero()[0])
            error = (SYMPTOM, f"the solution became non-finite by t={stepping.t_out[bad]:g}: the "
                     "dynamics blew up; use smaller steps (step_size or rtol/atol) or rescale "
                     "the problem")
        raise_collectively(self.layout.comm, self._explained(error), SolverError,
                           cause=self.exception)

    def replay(self, y_start, times, keep_graphs=False):
        """Re-run the recorded steps times[0] -> ... -> times[-1] from y_start (with the
        trajectory on if this Integrator records one, and f's stage graphs kept for its adjoint
        with keep_graphs); the end state is left in x_view."""
        ts = self.ts
        self.reserve(len(times) - 1)
        self.replayed = True
        if self.adjoint:
            self.recorded = max(self.recorded, len(times) - 1)
        self.healthy = False
        touch(self.x, "w")
        self.x_view.copy_(y_start)
        self.x.stateIncrease()
        self._stepping = Replaying(times)
        self._set_phase("a re-run of recorded steps for the backward pass")
        if self.rhs is not None:
            self.rhs.store = GraphStore() if (self.adjoint and keep_graphs) else None
        ts.setTime(times[0])
        ts.setStepNumber(0)
        ts.setMaxTime(times[-1])
        ts.setMaxSteps(len(times) - 1)
        ts.setTimeStep(times[1] - times[0])
        ts.setConvergedReason(PETSc.TS.ConvergedReason.CONVERGED_ITERATING)
        try:
            failure = self._solve(self.x)
        finally:
            self._stepping = None
            if self.graph_store is not None:
                self.graph_store.release_inputs()
        reason = ts.getConvergedReason()
        if (failure or reason < 0) and self.failure is None:
            self.failure = failure or (CONSEQUENCE, (
                f"re-running the steps from t={times[0]:g} failed "
                f"({reason_name(PETSc.TS.ConvergedReason, reason)})"))
        # Healthy again even after an error: whether to keep it must be decided alike on every
        # rank (creating an Integrator is collective), by the run that raises collectively.
        self.healthy = True

    # ---------------------------------------------------------------- adjoint
    def start_adjoint(self, grad_last):
        """lambda = dL/dy(t_N), mu = 0, before the adjoint steps."""
        self.reset_errors()
        self.healthy = False
        self.adjoint_broken = False
        self._adjoint_counts = self._counts()
        self._step_replays = 0       # steps re-run for interpolated outputs' cotangents
        touch(self.lam, "w")
        self.lam_view.copy_(grad_last)
        self.lam.stateIncrease()
        if self.mu is not None:
            self.mu.zeroEntries()
            self.ts.setCostGradients([self.lam], [self.mu])
        else:
            self.ts.setCostGradients([self.lam])

    def adjoint_steps(self, nsteps):
        """Apply the discrete adjoint of the last `nsteps` recorded steps (after a PETSc error
        nothing more: finish_adjoint reports it on every rank)."""
        if self.adjoint_broken:
            return
        self._set_phase("the adjoint solve")
        try:
            self.ts.adjointSetSteps(nsteps)
            self.ts.adjointSolve()
        except PETSc.Error as exc:
            self.adjoint_broken = True
            self.failure = self.failure or petsc_failure(self.ts, exc, "the adjoint solve")

    def add_to_lambda(self, grad):
        touch(self.lam, "rw")
        self.lam_view.add_(grad)
        self.lam.stateIncrease()

    def add_to_mu(self, grads):
        """mu += this rank's parameter gradients (a list shaped like the parameters; None
        where zero), before the adjoint's allreduce."""
        if self.mu is None or all(g is None for g in grads):
            return
        params = self.parts[0].params
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                          for g, p in zip(grads, params)])
        view = vec_view(self.mu, (self.mu.getLocalSize(),), "rw")
        view.add_(flat.to(view.dtype))
        self.mu.stateIncrease()

    def step_cotangents(self, record, requests):
        """dL/dy at the start of each step n of `record` from its interpolated outputs,
        requests {n: (out_times, grads)} -> {n: dL/dy} (their parameter part is added to mu).
        Steps whose stage graphs the forward kept are done together from those graphs (they are
        used once); the others by a replay of the step each. An exception in func is recorded
        (NaN returned)."""
        rhs = self.rhs
        kept = {n: record.stage_graphs.pop(n) for n in requests if n in record.stage_graphs}
        out = {}
        with guarded(rhs, "func while differentiating the outputs interpolated in steps "
                          f"{sorted(requests)}") as call:
            if kept:
                grad_ys, grad_params = dense.stage_graph_cotangents(
                    [(kept[n], record.times[n], record.times[n + 1], requests[n][0],
                      requests[n][1].to(rhs.dtype)) for n in kept],
                    rhs.params, self.tableau, self.dense)
                out.update(zip(kept, grad_ys))
                self.add_to_mu(grad_params)
            for n, (out_times, grads) in requests.items():
                if n in kept:
                    continue
                self._step_replays += 1
                out[n], grad_params = dense.step_cotangent(
                    lambda t, y: rhs._evaluate(t, y), rhs.params, record.times[n],
                    record.times[n + 1], record.starts[n].to(rhs.dtype), out_times, grads,
                    self.tableau, self.dense)
                self.add_to_mu(grad_params)
        if call.failed:
            return {n: torch.full_like(grads[0], float("nan"))
                    for n, (_, grads) in requests.items()}
        return {n: g.to(SOLVER_DTYPE) for n, g in out.items()}

    def finish_adjoint(self, grad_first, error=None, cause=None):
        """(dL/dy0 for this rank's shard, dL/dtheta summed over all ranks); raises on every rank
        if a callback failed here (or `error`, with the exception `cause`, was reported
        elsewhere)."""
        if error is None:
            error, cause = self.error, self.exception
        self.stats.update({f"adjoint_{k}": v
                           for k, v in self._counts_since(self._adjoint_counts).items()})
        self.stats["adjoint_step_replays"] = self._step_replays
        if self.rhs is not None:     # no graph of f outlives the adjoint (pooled: held)
            self.rhs.drop_graphs()
        touch(self.lam, "r")
        grad_y0 = self.lam_view + grad_first
        if error is None and not bool(torch.isfinite(grad_y0).all()):
            error = (SYMPTOM, "the adjoint produced a non-finite gradient with respect to y0")
        if error is None and self.mu is not None and not bool(
                torch.isfinite(vec_view(self.mu, (self.mu.getLocalSize(),), "r").sum())):
            error = (SYMPTOM, "the adjoint produced a non-finite gradient with respect to the "
                     "parameters")
        raise_collectively(self.layout.comm, self._explained(error), SolverError, cause=cause)
        self.healthy = True
        grad_params = None
        if self.mu is not None:
            grad_params = vec_view(self.mu, (self.mu.getLocalSize(),), "r").clone()
            mpi = self.layout.gradient_comm.tompi4py()
            if mpi.Get_size() > 1:
                t0 = time.perf_counter()
                allreduce_sum(grad_params, mpi)
                self.stats["gradient_allreduce_seconds"] = time.perf_counter() - t0
        return grad_y0, grad_params

    def backward(self, record: ForwardRecord, grad_outputs, replay_from=None):
        """Discrete adjoint of the last forward solve (its whole trajectory recorded), or, with
        `replay_from` (y0), of a re-run of the recorded steps from there on this (non-adaptive)
        Integrator. grad_outputs: [len(t), *local_shape]."""
        cotangents = Cotangents(self, record, grad_outputs)
        self.start_adjoint(cotangents.at(record.steps))
        if replay_from is not None:
            self.replay(replay_from, record.times)
        hi = record.steps
        for lo in cotangents.positions_below(hi, 0) + [0]:
            self.adjoint_steps(hi - lo)
            hi = lo
            if lo > 0:
                self.add_to_lambda(cotangents.at(lo))
        return self.finish_adjoint(cotangents.at(0))

    def _state_bytes(self, agreed=False):
        """Bytes of this rank's part of the state; with `agreed`, the mean over the ranks
        (the same number on every rank, for decisions the ranks must take alike)."""
        numel = self.x.getSize() / self.layout.nranks if agreed else self.x_view.numel()
        return numel * self.x_view.element_size()

    def work_bytes(self, agreed=False):
        """About what the TS's and our work Vecs take (a few per stage; the adjoint's too)."""
        state = self._state_bytes(agreed)
        return (3 * self.method.states_per_step + 8) * (state + VEC_OVERHEAD)

    def held_bytes(self, agreed=False):
        """About what this Integrator holds between solves: its work Vecs, its trajectory's
        Vecs (of the longest solve it recorded) and stack (`agreed`: see _state_bytes)."""
        state = self._state_bytes(agreed)
        stored = self.recorded * self.method.states_per_step if self.adjoint else 0
        return (self.work_bytes(agreed) + stored * (state + VEC_OVERHEAD)
                + 8 * (self.capacity or 0))

    def destroy(self):
        """Free the TS now (lifetime.py's rule 1), after emptying the Python side PETSc may
        still reach (the parts' per-solve state, the Mat and PC contexts).

        A TS whose method says keep_after_replay (TSTHETA) and whose memory trajectory recorded
        re-run segments is kept alive instead: with PETSc 3.26, destroying such a trajectory
        crashed (segments of adaptive step sizes, seen in VecDestroy under TSTrajectoryDestroy)
        although every adjoint was correct. It holds at most one segment's states."""
        if self.ts is None:
            return
        # PETSc's error paths can leave a reference to a Python Mat behind (seen: the IJacobian
        # after a failed adjoint), so a context may outlive the TS: emptied, it holds no f, no
        # graphs, no recorded exception, and nothing that leads back to this Integrator.
        for p in self.parts:
            p.release()
        for context in self._contexts:
            vars(context).clear()
        # Our own Vecs, destroyed rather than dropped (lifetime.py's rule 5); a torch view
        # still alive keeps its Vec's memory (the view holds a reference of its own).
        for vec in (self.x, getattr(self, "lam", None), self.mu,
                    self.controller and self.controller.vec, self._work and self._work[0]):
            if vec is not None:
                vec.destroy()
        self.step_start = self._work = self.controller = None
        if self.trapezoid is not None:
            self.trapezoid.detach()
            self.trapezoid = None
        if self.adjoint and self.replayed and self.method.keep_after_replay:
            keep_forever(self.ts)
            self.ts = None
            return
        self.ts.destroy()
        self.ts = None


