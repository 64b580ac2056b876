"""Terminal events: an event solve's steps (landing.py: the locating solve and the landing on
the event; the locator watching the steps is _solve/events.py, under the integrator) and the
event time's gradient (event_time.py: the implicit-function relation at the event, summed over
the ranks). through_event is odeint_event's pipeline over any odeint."""
import torch

from .event_time import reroute


def through_event(solve, func, event_fn):
    """(event_t, solution) of an event solve, with the event time's gradients.
    solve(found) runs the solve: ours leaves the slope at the event and its communicator in
    the dict `found`; another odeint (torchdiffeq's) leaves nothing, and the slope is then f
    at the event."""
    found = {}
    event_t, solution = solve(found)
    state = tuple(s[-1] for s in solution) if isinstance(solution, tuple) else solution[-1]
    slope = found.get("slope")
    if slope is None:
        with torch.no_grad():
            slope = func(event_t, state)
    event_t, state = reroute(event_fn, event_t, state, slope, found.get("comm"),
                             found.get("call"))
    if isinstance(solution, tuple):
        solution = tuple(torch.cat([s[:-1], e[None]]) for s, e in zip(solution, state))
    else:
        solution = torch.cat([solution[:-1], state[None]])
    return event_t, solution
