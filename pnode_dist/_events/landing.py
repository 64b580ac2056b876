"""An event solve below odeint's face: the event functions checked at the start, then either
the locator watching the steps (a dense output finds the event inside a step) or, without one,
the crossing step retaken until it ends on the event (on a fixed-step pool); afterwards, the
event's time and solution as odeint returns them."""
import math
from dataclasses import replace as dc_replace

import torch

from .._reversal.strategies import solve_without_gradient
from .._solve import dense
from .._solve.device import SOLVER_DTYPE
from .._solve.events import EventLocator
from ..errors import InputError, SolverError


def start(r, pool, layout, func, y_start, to_user, time_sign, observers, fixed_pool):
    """For Request r's event solve: (locator, pool, t_out, control, observers) of the solve to
    run, or None when an event function is zero at the start. func: the solved func (on the
    Vec's order); fixed_pool(): the problem's pool of fixed steps, to retake a crossing step
    on. Collective."""
    locator = EventLocator(r.event_fn, to_user, time_sign, layout.comm, r.y0.dtype,
                           r.event_tol)
    if _event_at_start(locator, r.t_out[0], y_start) == 0:
        return None
    if r.control.interpolate:
        return locator, pool, r.t_out, r.control, tuple(observers) + (locator,)
    retake = pool if not r.adaptive else fixed_pool()
    t_out, control = _land_on_event(pool, retake, locator, y_start, r.t_out[0], r.control,
                                    func)
    return locator, retake, t_out, control, observers


def at_start(r):
    """odeint's result when the event is at the start: (t0, [y0, y0])."""
    t0 = torch.as_tensor(r.t, dtype=getattr(r.t, "dtype", None))[0].detach()
    return t0, torch.stack([r.y0, r.y0])


def finish(r, locator, outputs, comm, time_sign, event_out):
    """(event time, outputs [y0, y(event)]) of a finished event solve; its statistics into
    r.stats, and for odeint_event the slope there and the communicator into event_out."""
    if len(outputs) > 2:                 # a retaken step: [t0, ..., t_n, event]
        outputs = outputs[[0, -1]]
    if r.stats is not None:
        r.stats["event_evaluations"] = locator.evaluations
    if event_out is not None:            # for odeint_event: the dense output's d/dt there
        event_out["slope"] = locator.to_user(locator.slope.to(r.y0.dtype))
        event_out["comm"], event_out["call"] = comm, r.call
    t = r.t
    like = t if isinstance(t, torch.Tensor) else torch.tensor(0.0, dtype=torch.float64)
    return torch.tensor(time_sign * locator.time, dtype=like.dtype, device=like.device), outputs


def _land_on_event(pool, retake, locator, y0, t0, control, func):
    """Without a dense output: a solve without gradient (on `pool`) stops after the step over
    which the event functions crossed zero, and that step is retaken from its start (on
    `retake`, a fixed-step pool) with the sizes the locator tries (PETSc's own step of the
    method: any family) until it ends on the event. Returns the output times and StepControl
    of the differentiable solve that takes the same steps and then the shortened one (fixed
    steps: [t0, t_n, event]; adaptive: every step time, one step each); the locator gets the
    event time and the slope of the shortened step's end in its size: exact for explicit
    methods (torch), by central differences of the retaken step for the implicit ones."""
    solve_without_gradient(pool, y0.detach(), [t0, math.inf], control, (locator,))
    start, end, y_start, times = locator.crossing
    t_start = start[0]

    def step_to(s):
        return solve_without_gradient(retake, y_start, [t_start, s],
                                      dc_replace(control, step_size=s - t_start))[1]

    try:
        t_event = locator.root(start, end, step_to)
    except Exception as exc:
        if not locator.failed:           # the retaken step's own (raised on every rank)
            raise
        locator.raise_failure(exc, "while the crossing step was retaken", SolverError)
    if pool.method.kind == "explicit":
        dtype = pool.dtype

        def f(time, y):
            return func(time.to(dtype), y.to(dtype)).to(SOLVER_DTYPE)
        slope = dense.step_slope(f, t_start, y_start, t_event - t_start, pool.method.tableau)
    else:
        delta = 1e-4 * (end[0] - t_start)
        if t_event - delta > t_start:
            slope = (step_to(t_event + delta) - step_to(t_event - delta)) / (2 * delta)
        else:
            slope = (4 * step_to(t_event + delta) - step_to(t_event + 2 * delta)
                     - 3 * step_to(t_event)) / (2 * delta)
    locator.time, locator.slope = t_event, slope
    if control.step_size is not None:
        return ([t0, t_start, t_event] if t_start > t0 else [t0, t_event]), control
    times = times + [t_event]
    widest = max(b - a for a, b in zip(times, times[1:]))
    return times, dc_replace(control, step_size=widest * (1 + 1e-9))


def _event_at_start(locator, t0, y0):
    """The event combination at the start (collective); event_fn's failure there is an error
    on every rank."""
    try:
        return locator.start(t0, y0.detach().to(SOLVER_DTYPE))
    except Exception as exc:
        locator.raise_failure(exc, "at the start", InputError)
