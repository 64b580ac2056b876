"""Gradients through an event time (odeint_event).

The solve to an event returns y_e = Y(t_e): the solution at the event time as a fixed time
(its gradient is the discrete adjoint's). The event time itself moves with everything the
solution and event_fn depend on: with c the event function that reached zero (the active one)
and Y' = dY/dt at t_e (the method's dense output there: the discrete solution's own slope),
the implicit-function relation c(t_e, Y(t_e)) = 0 gives

    dt_e = -(dc/dy . dy_e + dc/dtheta_event) / D,    D = dc/dt + dc/dy . Y'(t_e),

and the state at the event moves by Y'(t_e) dt_e. Both are built here as autograd terms whose
value is zero, so that backprop gives exactly these derivatives (first order: D is a number).
On several ranks the active event function is on one rank; the event time's cotangents of all
ranks reach it through one sum over the ranks in the backward pass, and every rank's event time
and state lead to the solve's own backward pass, so that every rank makes the same collective
calls whichever of them its loss uses (a loss that uses neither, on some ranks only, is an
InputError on every rank).
"""
import math

import torch

from .._distributed.collective import PETSc, raise_collectively
from ..errors import InputError, SolverError


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses create_graph: the event time's second derivatives
    would need D's own derivatives, which the construction leaves out."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise InputError("a second derivative through an event time (backward with "
                             "create_graph=True through odeint_event) is not supported")
        return grad


class _SumOverRanks(torch.autograd.Function):
    """x (0-d) summed over the ranks of comm, forward and backward: one allgather each, which
    also compares the ranks' phases, so that a rank whose loss uses no output of the event
    (its backward pass goes elsewhere, or nowhere) meets the others in an InputError."""

    @staticmethod
    def forward(ctx, x, comm, call):
        ctx.comm, ctx.call = comm, call
        return _summed(x, comm, f"the event of odeint call {call}")

    @staticmethod
    def backward(ctx, grad):
        return _summed(grad, ctx.comm, f"backward of odeint call {ctx.call} through its event "
                       "(every rank's loss must use the event time or state)"), None, None


def _summed(x, comm, phase):
    values = raise_collectively(comm, None, InputError, same={"phase": phase},
                                share=float(x.detach()))
    return torch.tensor(sum(values), dtype=x.dtype, device=x.device)


def _leaves(state):
    return tuple(state) if isinstance(state, tuple) else (state,)


def _rebuild(like, leaves):
    return tuple(leaves) if isinstance(like, tuple) else leaves[0]


def reroute(event_fn, event_t, state, slope, comm=None, call=None):
    """(event_t, state) with the event time's dependence (see above). event_t: the located
    time (no graph needed); state: the solution at it, its graph the solve's; slope: Y'(t_e)
    in state's structure (values). comm: the communicator (petsc4py) the state is split over
    in odeint call number `call`, or None. Collective: event_fn's failure, or a zero rate of
    the active event function, is a SolverError on every rank."""
    t_e = event_t.detach()
    leaves, slopes = _leaves(state), [s.detach() for s in _leaves(slope)]
    comm = comm if comm is not None else PETSc.COMM_SELF
    try:
        nearest, rate, live = _nearest(event_fn, t_e, state, leaves, slopes)
        error = None
    except Exception as exc:                     # every rank must still take part
        nearest, rate, live, error = math.inf, None, None, exc
    found = raise_collectively(
        comm, None if error is None else
        f"event_fn failed at the event (t={float(t_e):g}): {type(error).__name__}: {error}",
        SolverError, share=(nearest, rate), cause=error)
    rank = min(range(len(found)), key=lambda r: (found[r][0], r))
    active = rank == comm.getRank()
    if not found[rank][1]:
        raise_collectively(comm, "the event function's rate of change along the solution is "
                           "zero at the event: the event time has no derivative (a tangential "
                           "crossing)" if active else None, SolverError)
    shift = (-(live - live.detach()).to(t_e.dtype) / rate if active
             else torch.zeros((), dtype=t_e.dtype, device=t_e.device))
    if torch.is_grad_enabled():
        # Zero times the state: every rank's event time and state then lead to the solve's
        # backward pass, the same collectives on every rank whichever of them its loss uses.
        shift = shift + sum(0 * (y - y.detach()).sum().to(shift) for y in leaves)
    if comm.getSize() > 1:
        shift = _SumOverRanks.apply(shift, comm, call)
    moved = _FirstOrderOnly.apply(shift)
    event_out = t_e + moved
    moved_state = [y + s.to(y.dtype) * moved.to(y.dtype) for y, s in zip(leaves, slopes)]
    return event_out, _rebuild(state, moved_state)


def _nearest(event_fn, t_e, state, leaves, slopes):
    """This rank's event function nearest to zero at the event: its |value|, its rate of
    change along the solution (dc/dt + dc/dy . Y'), and its value with the solve's graph;
    (inf, None, None) where event_fn gives none."""
    with torch.enable_grad():
        time = t_e.clone().requires_grad_(True)
        points = [y.detach().clone().requires_grad_(True) for y in leaves]
        values = event_fn(time, _rebuild(state, points)).reshape(-1)
        if not values.numel():
            return math.inf, None, None
        k = int(values.abs().argmin())
        rate = 0.0                               # constant along the solution without a graph
        if values[k].requires_grad:
            grads = torch.autograd.grad(values[k], [time] + points, allow_unused=True)
            rate = sum(float((g * s.to(g.dtype)).sum()) for g, s in zip(grads[1:], slopes)
                       if g is not None)
            rate += float(grads[0]) if grads[0] is not None else 0.0
    live = event_fn(t_e, state).reshape(-1)[k]
    return float(values[k].detach().abs()), rate, live
