"""Terminal events in the forward solve, with torchdiffeq's rule: event_fn(t, y) gives one or
several event functions; the solve stops where the first of them reaches zero from the sign it
had at the start. Their combination is min_k(sign_k(t0) * g_k(t, y)), positive until the event.

After each accepted step the combination is evaluated at the step's end; where it is no longer
positive, the crossing inside the step is located (Illinois' regula falsi, bisecting where it
stalls) to `tol` in time: on the method's dense output, or, for methods without one, on the
crossing step retaken with shorter sizes (_events/landing.py). On several ranks event_fn sees
this rank's part of the state, and the combination is the minimum over the ranks: one allgather per
evaluation, so that every rank takes the same decisions and finds the same event time. Where
event_fn fails (raises, or gives NaN), every rank stops at that evaluation: the failing rank with
its own exception, the others with EventElsewhere, which is never the user's to see (`raise_failure`
and the Integrator's event search let the failing rank report).
"""
import math

import torch

from .._distributed.collective import raise_collectively
from ..errors import InputError


class EventElsewhere(RuntimeError):
    """event_fn failed on another rank (that rank reports its own error)."""


class EventLocator:
    """The event of one solve. An observer of the forward solve (its `locates_event` marks it
    for the Integrator); after the solve, `time` is the event time (solver time) and `slope`
    the dense output's d/dt there (this rank's part, solver precision)."""
    role = "event_fn"
    locates_event = True

    def __init__(self, event_fn, to_user, time_sign, comm, dtype, tol=None):
        self.event_fn, self.to_user, self.time_sign = event_fn, to_user, time_sign
        self.comm = comm
        self.mpi = comm.tompi4py() if comm.getSize() > 1 else None
        self.dtype, self.tol = dtype, tol
        self.signs = None            # sign of each event function at the start (this rank's)
        self.last = None             # (t, value) at the last accepted step's end
        self.time = self.slope = None
        # without a dense output: (start, end, y at the start, step times to the start) of the
        # step over which the event functions crossed zero
        self.crossing = None
        self.failed = False
        self.evaluations = 0

    # the forward solve's observer calls (nothing to do: the Integrator asks `crossed`)
    def starting(self, step, t, dt, state):
        pass

    def accepted(self, step, times, state):
        pass

    def _local(self, t, y):
        """This rank's event functions at (t, y), flattened, in float64."""
        time = torch.tensor(self.time_sign * t, dtype=self.dtype, device=y.device)
        with torch.no_grad():
            value = self.event_fn(time, self.to_user(y.to(self.dtype)))
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"event_fn(t, y) returned {type(value).__name__}: it must return a "
                            "tensor (one or several event functions)")
        return value.detach().reshape(-1).to(torch.float64)

    def _agreed(self, local_value, exc):
        """The combination over the ranks (one allgather), raising where event_fn failed: the
        failing rank its exception (FloatingPointError for NaN), the others EventElsewhere."""
        values = [local_value] if self.mpi is None else self.mpi.allgather(local_value)
        self.evaluations += 1
        bad = [r for r, v in enumerate(values) if math.isnan(v)]      # raised or gave NaN
        if bad or math.isinf(min(values)):       # or no event function on any rank
            self.failed = True
            if exc is not None:
                raise exc
            if bad and not math.isnan(local_value):
                raise EventElsewhere(f"event_fn failed on rank {bad[0]}")
            raise FloatingPointError(
                f"event_fn returned {'NaN' if bad else 'no value'} at t="
                f"{self.time_sign * self._t:g}: it must give finite event functions")
        return min(values)

    def raise_failure(self, exc, where, exc_type):
        """After an evaluation failed with `exc` (on every rank at once): exc_type on every rank
        with the reason of each rank where event_fn failed, chained to its exception there.
        Collective."""
        own = None if isinstance(exc, EventElsewhere) else (
            f"event_fn failed {where} (t={self.time_sign * self._t:g}): "
            f"{type(exc).__name__}: {exc}")
        raise_collectively(self.comm, own, exc_type, cause=None if own is None else exc)

    def value(self, t, y):
        """min_k(sign_k * g_k(t, y)) over every rank's event functions (collective)."""
        self._t = t
        try:
            g = self._local(t, y) * self.signs
            local, exc = (float(g.min()) if g.numel() else math.inf), None
        except Exception as error:               # every rank must still take part
            local, exc = math.nan, error
        return self._agreed(local, exc)

    def start(self, t, y):
        """The signs at the start (collective); the combination there: 0 means the event is at
        the start (an event function is zero there), as in torchdiffeq."""
        self._t = t
        try:
            g = self._local(t, y)
            self.signs, exc = torch.sign(g), None
            local = float((g * self.signs).min()) if g.numel() else math.inf
        except Exception as error:
            local, exc = math.nan, error
        value = self._agreed(local, exc)
        self.last = (t, value)
        return value

    def crossed(self, t_end, y_end):
        """After an accepted step ending at t_end with state y_end: None while the combination
        is positive, else ((t, value) at the step's start, (t, value) at its end). Collective."""
        v_end = self.value(t_end, y_end)
        if v_end > 0:
            self.last = (t_end, v_end)
            return None
        return self.last, (t_end, v_end)

    def root(self, start, end, state_at):
        """The event time between `start` and `end` ((t, value) pairs from `crossed`), where
        `state_at(t)` is the state (the dense output, or the step retaken to t). Collective."""
        return self._root(*start, *end, state_at)

    def _root(self, a, fa, b, fb, state_at):
        """Illinois' regula falsi on [a, b] with f(a) > 0 >= f(b); once its estimate settles,
        a probe just past it closes the bracket, and a bisection follows three iterations that
        did not halve it. Returns the bracket's end where the combination is no longer
        positive, within tol of the crossing."""
        if fb == 0:
            return b
        if self.tol is not None and self.tol >= b - a:      # the same on every rank
            self.failed = True
            raise InputError(f"options['event_tol']={self.tol:g} is not below the length of the "
                             f"step in which the event functions cross zero ({b - a:g}, from "
                             f"t={self.time_sign * a:g}): the event would not be located at all; "
                             "choose a tolerance well below the step sizes")
        tol = self.tol if self.tol is not None else \
            8 * torch.finfo(torch.float64).eps * max(1.0, min(abs(a), abs(b)))
        moved, last, slow = None, None, 0
        for _ in range(200):
            width = b - a
            if width <= tol:
                break
            if slow >= 3:
                s, slow = 0.5 * (a + b), 0
            else:
                s = b - fb * (b - a) / (fb - fa)
                if last is not None and abs(s - last) < 0.5 * tol:
                    s += 0.5 * tol if moved == "a" else -0.5 * tol
            if not a < s < b:
                s = 0.5 * (a + b)
            fs = self.value(s, state_at(s))
            if fs > 0:
                a, fa = s, fs
                if moved == "a":
                    fb *= 0.5            # Illinois: the same end moved twice
                moved = "a"
            else:
                b, fb = s, fs
                if fs == 0:
                    break
                if moved == "b":
                    fa *= 0.5
                moved = "b"
            last = s
            slow = slow + 1 if b - a > 0.5 * width else 0
        return b
