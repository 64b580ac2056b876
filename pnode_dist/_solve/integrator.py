"""The PETSc side of one ODE problem: TS set-up, the forward solve through the output times, and
the discrete adjoint between output times.

An Integrator owns one TS with its Vecs and Jacobian Mats; it solves forward, re-runs recorded
steps, and applies the adjoint. An IntegratorPool keeps them for one problem configuration, so
that several forward passes may await their backward at once (an ODE block used twice in a
network); each differentiable solve's reversal strategy (reversal.py) leases Integrators until
its backward pass (or the graph's destruction) returns them.
"""
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Dict, List

import torch

from .._distributed.collective import (CAUSE, CONSEQUENCE, SYMPTOM, PETSc, allreduce_sum,
                                      raise_collectively)
from ..errors import InputError, SolverError
from . import dense
from .device import SOLVER_DTYPE, VEC_OVERHEAD, vec_type
from .controller import ExplicitController
from .events import EventElsewhere
from .explicit import GraphStore, ParamJacobianMat, StateJacobianMat, round_off_apart
from .first_step import initial_step
from .guard import guarded, released
from .implicit import BlockJacobianPC, IJacobianMat, IJacobianPMat
from .trapezoid_control import TrapezoidControl
from .lifetime import keep_forever, pin_comm
from .options import layered_options
from .rk_register import ts_tableau
from .views import touch, vec_view

# Times within this relative distance are the same time (PETSc's times have its precision).
_REL_TIME_TOL = max(1e-12, 64 * torch.finfo(SOLVER_DTYPE).eps)
_MIN_CAPACITY = 1024                 # trajectory steps reserved at least
# An idle Integrator stays pooled while what it holds (work Vecs, trajectory) is at most this:
# re-creating one costs about 3 ms, more than a small solve; a larger one is freed at once.
KEEP_IDLE_BYTES = 1 << 20
# Newton and Krylov tolerances within reach of the solver precision (PETSc options override).
_NEWTON_TOLERANCES = {torch.float64: {"snes_rtol": 1e-10, "snes_atol": 1e-12, "ksp_rtol": 1e-10},
                      torch.float32: {"snes_rtol": 1e-5, "snes_atol": 1e-6, "ksp_rtol": 1e-5}}


def _option_given(prefix, name, petsc_options):
    """Whether the user chose PETSc option `name`: in petsc_options or on the command line."""
    return (name in dict(petsc_options or ())
            or PETSc.Options().hasName(f"{prefix or ''}{name}"))


def trajectory_capacity(expected, max_num_steps):
    """Steps a forward solve's trajectory reserves: twice the steps expected, at least
    _MIN_CAPACITY, at most max_num_steps (a solve that fills it stops: record.stopped)."""
    return min(max_num_steps, max(_MIN_CAPACITY, 2 * (expected or 0)))


def time_slack(t_out):
    """How far apart two times of a solve over t_out may be and still be the same time (an
    event solve's open end, inf, aside)."""
    return _REL_TIME_TOL * max(1.0, *(abs(t) for t in (t_out[0], t_out[-1]) if math.isfinite(t)))


def fixed_step_count(span, step_size, slack=0.0):
    """Equal steps, at most step_size long, that cover span (one without a step_size); a span
    longer than a whole number of steps by at most `slack` is that number (math.inf beyond what
    a float can count)."""
    if step_size is None:
        return 1
    steps = (span - slack) / step_size * (1 - 1e-12)
    return max(1, math.ceil(steps)) if math.isfinite(steps) else math.inf


def fixed_steps(t_out, step_size):
    """The fixed steps of a solve over t_out: equal steps of at most step_size per interval."""
    slack = time_slack(t_out)
    return sum(fixed_step_count(b - a, step_size, slack) for a, b in zip(t_out, t_out[1:]))


def _reason_name(enum, value):
    """PETSc's name of a converged/diverged reason, e.g. DIVERGED_MAX_IT."""
    names = [k for k in dir(enum) if k.isupper() and getattr(enum, k) == value]
    return names[0] if names else f"reason {value}"


@dataclass
class StepControl:
    """How the steps are chosen for one solve."""
    step_size: float = None      # fixed steps no longer than this; None with adaptive -> TSAdapt
    first_step: float = None     # initial step of an adaptive solve
    min_step: float = None       # TSAdapt's step limits (None: as the PETSc options set them)
    max_step: float = None
    max_num_steps: int = 1_000_000
    rtol: float = 1e-7
    atol: float = 1e-9
    store_graphs: bool = None    # keep f's stage graphs for the adjoint (None: the policy says)
    interpolate: bool = False    # output times by dense output (adaptive explicit methods)
    first_weights: torch.Tensor = None   # continuing a solve: its next step's error weights


@dataclass
class ForwardRecord:
    """What a forward solve leaves for its adjoint: the accepted step times and, for each
    output, the position whose adjoint state receives its cotangent: the step index it ended
    on, or, for an output interpolated inside step n (dense_times: its time, else None), n.
    starts: the state at the start of each step holding interpolated outputs."""
    times: List[float] = field(default_factory=list)
    output_steps: List[int] = field(default_factory=list)
    dense_times: List[float] = field(default_factory=list)
    starts: Dict[int, torch.Tensor] = field(default_factory=dict)
    stage_graphs: Dict[int, list] = field(default_factory=dict)   # step n -> f's stage graphs
    stopped: bool = False        # ended early, before the last output time (stop_requested)
    scheme: tuple = None         # (tableau, dense output) an explicit method integrated with

    @property
    def steps(self):
        return len(self.times) - 1

    def add_output(self, position, dense_time=None):
        self.output_steps.append(position)
        self.dense_times.append(dense_time)


class _Stepping:
    """Bookkeeping of one forward solve, driven by the post-step callback."""

    def __init__(self, t_out, control, adaptive, outputs, interpolate=False, controller=None):
        self.t_out = t_out
        self.control = control
        self.adaptive = adaptive
        self.interpolate = interpolate               # outputs inside a step by dense output
        self.controller = controller                 # ExplicitController, or None
        self.outputs = outputs
        self.k = 1                                   # next output index
        self.record = ForwardRecord(times=[t_out[0]])
        self.record.add_output(0)
        self.done = False
        self.tol = time_slack(t_out)

    def fixed_steps(self, t):
        """Number of equal steps from t to the next output time (at most step_size each)."""
        return fixed_step_count(self.t_out[self.k] - t, self.control.step_size, self.tol)

    def _fixed_dt(self, t):
        """The next fixed step from t: equal steps to the next output time, step_size towards
        an event solve's open end."""
        remaining = self.t_out[self.k] - t
        if math.isinf(remaining):
            return self.control.step_size
        return remaining / self.fixed_steps(t)

    def first_dt(self, chosen=None):
        """The first step: fixed steps' size; adaptive: first_step, else `chosen` (from f at
        the start), else a hundredth of the interval; landing on the first target."""
        if not self.adaptive:
            return self._fixed_dt(self.t_out[0])
        control, span = self.control, self.t_out[-1] - self.t_out[0]
        if math.isinf(span):         # an event solve without a first step from f
            span = 1.0
        first = control.first_step or chosen or span * 1e-2
        if chosen is not None and not control.first_step:   # within TSAdapt's limits
            first = min(max(first, control.min_step or 0.0), control.max_step or math.inf)
        return _landing(first, self._target() - self.t_out[0])

    def _target(self):
        """The time the steps must land on next: the next output time, or with interpolation
        the last one."""
        return self.t_out[-1] if self.interpolate else self.t_out[self.k]

    def post_step(self, integrator, ts):
        """Record the accepted step, copy or interpolate the outputs it reached, choose the
        next step."""
        t = ts.getTime()
        record = self.record
        record.times.append(t)
        n = len(record.times) - 1                    # the step just taken ends at position n
        integrator._notify("accepted", n, record.times, integrator.x_view)
        while self.interpolate and self.k < len(self.t_out) and self.t_out[self.k] < t - self.tol:
            # Inside the step (only with interpolation: otherwise the steps land on them).
            self._output_inside(integrator, n, self.t_out[self.k])
        if integrator.event is not None and self.k == 1:
            self._find_event(integrator, ts, n)
        if self.k < len(self.t_out) and t >= self.t_out[self.k] - self.tol:
            self.outputs[self.k].copy_(integrator.x_view)
            record.add_output(n)
            self.k += 1
        if self.k == len(self.t_out):
            self.done = True
            ts.setConvergedReason(PETSc.TS.ConvergedReason.CONVERGED_USER)
            return
        self._choose_next(integrator, ts, t)
        if integrator.capacity is not None and n >= integrator.capacity:
            integrator.stop_requested = True  # its trajectory is full (Integrator.reserve)
        if integrator.stop_requested:         # after the choice: a continuation takes it
            self.record.stopped = True
            ts.setConvergedReason(PETSc.TS.ConvergedReason.CONVERGED_USER)

    def _output_inside(self, integrator, n, t_output):
        """Output k by the dense output of step n (from position n - 1), at t_output."""
        record = self.record
        if n - 1 not in record.starts:
            record.starts[n - 1] = integrator.step_start.clone()
            graphs = integrator.stage_graphs(record.times[n - 1], record.times[n])
            if graphs is not None:
                record.stage_graphs[n - 1] = graphs
        self.outputs[self.k].copy_(integrator.interpolated(t_output))
        record.add_output(n - 1, t_output)
        self.k += 1

    def _find_event(self, integrator, ts, n):
        """An event solve (t_out = [t0, inf]): if the event function crossed zero in step n,
        with interpolation its time is the solve's last output (by the dense output), and the
        event's time and the dense output's d/dt there go to the locator; with fixed steps the
        solve stops and the locator keeps the step (api.py retakes it). Every rank stops
        alike, also when event_fn failed somewhere."""
        event, record = integrator.event, self.record
        try:
            crossing = event.crossed(record.times[n], integrator.x_view)
            if crossing is not None and not self.interpolate:
                event.crossing = crossing + (integrator.step_start.clone(),
                                             list(record.times[:n]))
                crossing = None
            t_event = None if crossing is None else event.root(
                *crossing, lambda s: integrator.interpolated(s))
        except EventElsewhere:           # this rank stops; the failing one reports why
            t_event = None
        finally:
            if event.failed or event.crossing is not None:
                record.stopped = True
                ts.setConvergedReason(PETSc.TS.ConvergedReason.CONVERGED_USER)
        if t_event is None:
            return
        self._output_inside(integrator, n, t_event)
        event.time = t_event
        event.slope = dense.dense_slope(integrator.torch_f(), record.times[n - 1],
                                        record.times[n], record.starts[n - 1], t_event,
                                        integrator.tableau, integrator.dense)

    def _choose_next(self, integrator, ts, t):
        """The next step: fixed steps' size, or TSAdapt's proposal under the controller's
        rule; landing on the next target."""
        remaining = self._target() - t
        if not self.adaptive:
            ts.setTimeStep(self._fixed_dt(t))
            return
        proposed = ts.getTimeStep()
        controller, h = self.controller, t - self.record.times[-2]
        dt = controller.next_step(h, proposed) if controller is not None else proposed
        landed = _landing(dt, remaining)
        if landed != proposed:
            ts.setTimeStep(landed)
        if controller is not None:
            controller.weigh(integrator.step_start, integrator.x_view, h, landed)


def _landing(dt, remaining):
    """The adaptive step dt adjusted to land on an output time `remaining` ahead: the whole
    distance when dt (nearly) covers it, half of it when it is less than two steps."""
    if remaining <= 1.01 * dt:
        return remaining
    if remaining < 2 * dt:
        return remaining / 2
    return dt


class _Replaying:
    """A re-run of recorded steps: step i goes from times[i] to times[i + 1] (the step sizes
    PETSc's own adjoint uses, from the recorded times)."""

    def __init__(self, times):
        self.times = times
        self.i = 0

    def post_step(self, integrator, ts):
        self.i += 1
        if self.i < len(self.times) - 1:
            ts.setTimeStep(self.times[self.i + 1] - self.times[self.i])


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
        if self.rhs is not None:
            self._set_explicit_part(ts, nparams)
        defaults = {"ts_adapt_type": "basic" if adaptive else "none"}
        self.linear_solver = None    # Newton's: 'exact' or 'gmres' (implicit methods)
        if self.ifun is not None:
            self.linear_solver = "exact" if setup.linear_solver == "exact" else "gmres"
            defaults.update(self._set_implicit_part(ts, nparams, self.linear_solver))
            if adaptive:         # a failed Newton solve rejects the step: retried 4x smaller
                defaults["ts_max_snes_failures"] = -1
        # The trapezoidal rule's own error estimate (trapezoid_control.py) unless the options
        # choose a TSAdapt.
        trapezoid = (adaptive and method.trapezoidal(setup)
                     and not _option_given(prefix, "ts_adapt_type", petsc_options))
        if trapezoid:
            defaults["ts_adapt_type"] = "none"
        if adjoint:
            ts.setSaveTrajectory()
        ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
        ts.setErrorIfStepFails(False)
        ts.setPreStep(self._pre_step)
        ts.setPostStep(self._post_step)
        # The trajectory reads only unprefixed options; without a type PETSc would pick 'basic',
        # which writes files into the working directory.
        trajectory = {"ts_trajectory_type": "memory"} if adjoint else {}
        with layered_options(prefix, defaults, petsc_options), \
                layered_options("", trajectory, ()):
            ts.setFromOptions()
        if ts.getType() not in method.ts_types:
            raise InputError(f"TS type {ts.getType()!r} (from the PETSc options) does not match "
                             f"method {method.name!r} ({'/'.join(method.ts_types)}): choose the "
                             "method with odeint's method argument and its variant with "
                             "-ts_rk_type / -ts_arkimex_type")
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

    def _python_mat(self, sizes, context):
        """A matrix-free Mat whose products are torch callbacks (Vecs of the state's type)."""
        self._contexts.append(context)
        mat = PETSc.Mat().createPython(sizes, context, comm=self.layout.comm)
        mat.setVecType(vec_type(self.layout.device))
        mat.setUp()
        return mat

    def _set_explicit_part(self, ts, nparams):
        rhs = self.rhs
        ts.setRHSFunction(rhs.rhs, self.x.duplicate())
        if not self.adjoint:
            return
        J = self._python_mat(self.layout.state_mat_sizes(), StateJacobianMat(rhs))
        ts.setRHSJacobian(rhs.linearize, J, J)
        if nparams:
            Jp = self._python_mat(self.layout.param_mat_sizes(nparams), ParamJacobianMat(rhs))
            ts.setRHSJacobianP(rhs.linearize_params, Jp)

    def _set_implicit_part(self, ts, nparams, linear_solver):
        """IFunction, IJacobian (and IJacobianP); returns the Newton/Krylov option defaults."""
        ifun = self.ifun
        ts.setIFunction(ifun.ifunction, self.x.duplicate())
        A = self._python_mat(self.layout.state_mat_sizes(), IJacobianMat(ifun))
        ts.setIJacobian(ifun.ijacobian, A, A)
        if self.adjoint and nparams:
            Jp = self._python_mat(self.layout.param_mat_sizes(nparams), IJacobianPMat(ifun))
            ts.setIJacobianP(ifun.ijacobian_params, Jp)
        defaults = dict(_NEWTON_TOLERANCES[SOLVER_DTYPE])
        pc = ts.getSNES().getKSP().getPC()
        if linear_solver == "exact":
            pc.setType(PETSc.PC.Type.PYTHON)
            self._contexts.append(BlockJacobianPC(ifun))
            pc.setPythonContext(self._contexts[-1])
            # Exact Newton directions: full steps, no line search (which would cost a jvp).
            defaults.update(ksp_type="preonly", snes_linesearch_type="basic")
        else:
            defaults.update(ksp_type="gmres", pc_type="none")
        return defaults

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
        if the forward keeps them (a GraphStore), else None. Stages 2.. are the store's last
        entries (their times say so); the first is the entry before them, or for an FSAL step
        after a rejected attempt (whose evaluations lie in between) the last one at the step's
        start whose state is the step's start to round-off (the previous step's last stage)."""
        store, tableau = self.graph_store, self.tableau
        s = tableau.stages if tableau is not None else 0
        if store is None or tableau is None or len(store.entries) < s:
            return None
        h = t_end - t_start
        tol = 1e-12 * max(1.0, abs(t_start), abs(t_end))

        def at(entry, c):
            return abs(entry[0] - (t_start + c * h)) <= tol
        tail = store.entries[len(store.entries) - s + 1:]
        if not all(at(entry, c) for entry, c in zip(tail, tableau.c[1:])):
            return None
        first = store.entries[-s]
        if not at(first, tableau.c[0]):
            start = self.step_start
            first = next((e for e in reversed(store.entries[-4 * s:-s])
                          if at(e, tableau.c[0]) and not e[1].released
                          and e[1].y.shape == start.shape
                          and round_off_apart(e[1].y.detach(), start.to(e[1].y.dtype))), None)
            if first is None:
                return None
        for _, stage, _ in [first] + tail:
            stage.pinned = True      # their copies stay: the dense output's vjp reads them
        return [(stage.y, out) for _, stage, out in [first] + tail]

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
        stepping = _Stepping(t_out, control, self.adaptive, outputs, interpolate,
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
            return self._petsc_failure(exc, "the integration", "(a step adaptor giving up after "
                                       "repeated rejections): check f for blow-up, or loosen "
                                       "rtol/atol")
        return None

    def _petsc_failure(self, exc, what, hint=""):
        """(severity, message) for a PETSc error in `what`; the Python exception behind it,
        if any, is named as the cause (KeyboardInterrupt and SystemExit are re-raised)."""
        cause, t = exc.__cause__, self.ts.getTime()
        if cause is not None and not isinstance(cause, Exception):
            raise cause from None
        if cause is not None:
            return (CAUSE, f"{type(cause).__name__} in a callback of {what} at t={t:g}: {cause}")
        return (CONSEQUENCE, f"PETSc stopped {what} at t={t:g} with error code {exc.ierr} {hint}")

    def _check_forward(self, stepping, outputs, failure=None):
        error = self.error
        if error is None:
            error = failure
        reason = self.ts.getConvergedReason()
        if error is None and not (stepping.done or stepping.record.stopped):
            error = (CONSEQUENCE, self._incomplete(stepping, reason))
        reached = outputs[:stepping.k]
        if error is None and not bool(torch.isfinite(reached).all()):
            bad = int((~torch.isfinite(reached.reshape(stepping.k, -1))).any(1).nonzero()[0])
            error = (SYMPTOM, f"the solution became non-finite by t={stepping.t_out[bad]:g}: the "
                     "dynamics blew up; use smaller steps (step_size or rtol/atol) or rescale "
                     "the problem")
        raise_collectively(self.layout.comm, self._explained(error), SolverError,
                           cause=self.exception)

    def _incomplete(self, stepping, reason):
        """Why a solve stopped before the last output time."""
        t = stepping.record.times[-1]
        if reason == PETSc.TS.ConvergedReason.CONVERGED_ITS and self.event is not None:
            return (f"no event by t={t:g}: event_fn did not reach zero within max_num_steps="
                    f"{stepping.control.max_num_steps} steps (raise options['max_num_steps'] "
                    "if it does later)")
        if reason == PETSc.TS.ConvergedReason.CONVERGED_ITS:
            return (f"reached max_num_steps={stepping.control.max_num_steps} at t={t:g} before "
                    f"t={stepping.t_out[-1]:g}: raise options['max_num_steps'] or loosen rtol/atol")
        if reason == PETSc.TS.ConvergedReason.DIVERGED_NONLINEAR_SOLVE:
            snes = self.ts.getSNES()
            return (f"Newton's method failed in step {len(stepping.record.times)} from t={t:g} "
                    f"(step size {self.ts.getTimeStep():g}): "
                    f"{_reason_name(PETSc.SNES.ConvergedReason, snes.getConvergedReason())}"
                    f", residual norm {snes.getFunctionNorm():.3e}"
                    f" after {snes.getIterationNumber()} iterations; try a smaller step, "
                    "linear_solver='exact', or looser -snes_rtol/-snes_atol")
        newton = ""
        if self.ifun is not None and self.ts.getSNES().getConvergedReason() < 0:
            snes = self.ts.getSNES()
            norm = snes.getFunctionNorm()
            newton = (f"; the last attempt's Newton solve failed ("
                      f"{_reason_name(PETSc.SNES.ConvergedReason, snes.getConvergedReason())}"
                      + (f", residual norm {norm:.3e}" if norm > 0 else "")
                      + f"; {self.ts.getSNESFailures()} Newton failures in this solve)")
        return (f"the time integration failed at t={t:g} "
                f"({_reason_name(PETSc.TS.ConvergedReason, reason)}): "
                f"the step was rejected too often{newton}; try a smaller first_step, looser "
                "rtol/atol, or check f for blow-up")

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
        self._stepping = _Replaying(times)
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
                f"({_reason_name(PETSc.TS.ConvergedReason, reason)})"))
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
            self.failure = self.failure or self._petsc_failure(exc, "the adjoint solve")

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


class Cotangents:
    """The cotangents the adjoint adds at the positions of a forward record: an output's own
    at the step it ended on; those of outputs interpolated inside step n, through the step's
    dense output, at n (their parameter part into the adjoint Integrator's mu)."""

    def __init__(self, integrator, record, grad_outputs):
        self.integrator, self.record, self.grad_outputs = integrator, record, grad_outputs
        self.by_position = {}
        for k, pos in enumerate(record.output_steps):
            self.by_position.setdefault(pos, []).append(k)
        self._dense = {}             # position -> dL/dy of its interpolated outputs, computed

    def _request(self, pos):
        """(out_times, grads) of the outputs interpolated in step pos, or None."""
        ks = [k for k in self.by_position.get(pos, []) if self.record.dense_times[k] is not None]
        if not ks:
            return None
        return [self.record.dense_times[k] for k in ks], self.grad_outputs[ks]

    def positions_below(self, hi, lo):
        """The output positions p with lo < p < hi, from the highest."""
        return sorted((p for p in self.by_position if lo < p < hi), reverse=True)

    def at(self, pos):
        """dL/dy at position pos (zeros if no output is there); call once per position."""
        ks = self.by_position.get(pos, [])
        grad = torch.zeros_like(self.grad_outputs[0])
        for k in ks:
            if self.record.dense_times[k] is None:
                grad += self.grad_outputs[k]
        request = self._request(pos)
        if request is not None:
            if pos not in self._dense:
                # This step, and every step whose stage graphs the forward kept: together.
                requests = {n: self._request(n) for n in self.record.stage_graphs
                            if n not in self._dense and n != pos}
                requests = {n: r for n, r in requests.items() if r is not None}
                requests[pos] = request
                self._dense.update(self.integrator.step_cotangents(self.record, requests))
            grad += self._dense.pop(pos)
        return grad


class ProblemHistory:
    """What successive solves of one problem share: the last solve's step count (checkpoint
    placement for adaptive steps), a solve counter and a tag for checkpoint file names."""

    def __init__(self, comm):
        self.comm = comm
        self.last_steps = None
        self.solves = 0
        self._file_tag = None

    def solved(self, steps):
        self.last_steps = steps

    def expected_steps(self, adaptive, t_out, control):
        """Steps the coming solve should take: exact for fixed steps, the last solve's count
        for adaptive ones (None before the first)."""
        if adaptive:
            return self.last_steps
        return fixed_steps(t_out, control.step_size)

    def next_file(self):
        """(tag shared by all ranks, number of this solve) for a checkpoint file name
        (collective on first use: rank 0's random tag, broadcast)."""
        if self._file_tag is None:
            self._file_tag = self.comm.tompi4py().bcast(uuid.uuid4().hex[:12], root=0)
        self.solves += 1
        return self._file_tag, self.solves


class IntegratorPool:
    """A pool of Integrators for one problem configuration (several forward passes may await
    their backward at once), and the problem's history."""

    def __init__(self, layout, method, func, params, dtype, prefix, petsc_options, adaptive,
                 setup):
        self.args = (layout, method, func, params, dtype, prefix, petsc_options)
        self.layout, self.method, self.prefix, self.dtype = layout, method, prefix, dtype
        self.adaptive = adaptive
        self.setup = setup
        self._idle = {}
        self.closed = False
        self.history = ProblemHistory(layout.comm)
        self.sizes = None            # the problem's measured Sizes (set by checkpointing)

    def acquire(self, adjoint, adaptive=None, nsteps=0):
        """An idle Integrator (trajectory or not; adaptive steps or replayed ones) whose
        trajectory holds `nsteps` steps (pooled ones that are too small are destroyed)."""
        adaptive = self.adaptive if adaptive is None else adaptive
        pool = self._idle.setdefault((adjoint, adaptive), [])
        integrator = None
        while pool and integrator is None:
            integrator = pool.pop()
            if integrator.capacity is not None and integrator.capacity < nsteps:
                integrator.destroy()
                integrator = None
        if integrator is None:
            integrator = Integrator(*self.args, adaptive=adaptive, adjoint=adjoint,
                                    setup=self.setup)
        integrator.reserve(max(nsteps, _MIN_CAPACITY))
        return integrator

    def release(self, integrator):
        """Back to the pool if it is small (KEEP_IDLE_BYTES, by a size every rank computes
        alike, so that the pools stay alike); one whose last solve failed, a
        large one, or any after the pool closed, is destroyed. (A TSTHETA one whose trajectory
        re-ran segments stays pooled whatever its size: Integrator.destroy would keep it alive
        for good.)"""
        kept_anyway = integrator.replayed and integrator.method.keep_after_replay
        if self.closed or not integrator.healthy or (
                integrator.held_bytes(agreed=True) > KEEP_IDLE_BYTES and not kept_anyway):
            integrator.destroy()
        else:
            self._idle.setdefault((integrator.adjoint, integrator.adaptive), []).append(integrator)

    def held_bytes(self):
        """About what the idle Integrators hold (between calls)."""
        return sum(i.held_bytes() for idle in self._idle.values() for i in idle)

    def close(self):
        """Destroy the idle Integrators (the cache dropped this pool); leased ones are
        destroyed when their strategy returns them."""
        self.closed = True
        for pool in self._idle.values():
            while pool:
                pool.pop().destroy()
