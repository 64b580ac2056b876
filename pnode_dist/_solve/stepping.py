"""Step control of one forward solve, driven by PETSc's post-step callback: which steps are
taken (fixed, adaptive under TSAdapt or the explicit controller, landing on output times),
the outputs copied or interpolated on the way, an event's crossing found, and the re-run of
recorded steps (Replaying). What a solve records for its adjoint is a ForwardRecord.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from .._distributed.startup import PETSc
from . import dense
from .device import SOLVER_DTYPE
from .events import EventElsewhere

# Times within this relative distance are the same time (PETSc's times have its precision).
_REL_TIME_TOL = max(1e-12, 64 * torch.finfo(SOLVER_DTYPE).eps)


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


class Stepping:
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
        solve stops and the locator keeps the step (_events/landing.py retakes it). Every rank stops
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


class Replaying:
    """A re-run of recorded steps: step i goes from times[i] to times[i + 1] (the step sizes
    PETSc's own adjoint uses, from the recorded times)."""

    def __init__(self, times):
        self.times = times
        self.i = 0

    def post_step(self, integrator, ts):
        self.i += 1
        if self.i < len(self.times) - 1:
            ts.setTimeStep(self.times[self.i + 1] - self.times[self.i])
