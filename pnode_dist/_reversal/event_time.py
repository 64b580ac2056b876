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
ranks reach it through one allreduce in the backward pass.
"""
import torch

from .._distributed.collective import allreduce_sum


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses create_graph: the event time's second derivatives
    would need D's own derivatives, which the construction leaves out."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            from ..errors import InputError
            raise InputError("a second derivative through an event time (backward with "
                             "create_graph=True through odeint_event) is not supported")
        return grad


class _SumOverRanks(torch.autograd.Function):
    """x summed over the ranks, forward and backward (one allreduce each)."""

    @staticmethod
    def forward(ctx, x, mpi):
        ctx.mpi = mpi
        return allreduce_sum(x.detach().clone().contiguous(), mpi)

    @staticmethod
    def backward(ctx, grad):
        return allreduce_sum(grad.detach().clone().contiguous(), ctx.mpi), None


def _leaves(state):
    return tuple(state) if isinstance(state, tuple) else (state,)


def _rebuild(like, leaves):
    return tuple(leaves) if isinstance(like, tuple) else leaves[0]


def reroute(event_fn, event_t, state, slope, mpi=None):
    """(event_t, state) with the event time's dependence (see above). event_t: the located
    time (no graph needed); state: the solution at it, its graph the solve's; slope: Y'(t_e)
    in state's structure (values). mpi: the communicator the state is split over, or None."""
    t_e = event_t.detach()
    leaves, slopes = _leaves(state), [s.detach() for s in _leaves(slope)]
    with torch.enable_grad():
        time = t_e.clone().requires_grad_(True)
        points = [y.detach().clone().requires_grad_(True) for y in leaves]
        values = event_fn(time, _rebuild(state, points)).reshape(-1)
        k = int(values.abs().argmin()) if values.numel() else None
    nearest = float(values[k].detach().abs()) if k is not None else float("inf")
    rank = 0
    if mpi is not None and mpi.Get_size() > 1:
        gathered = mpi.allgather(nearest)
        rank = min(range(len(gathered)), key=lambda r: (gathered[r], r))
        active = rank == mpi.Get_rank()
    else:
        active = True
    shift = torch.zeros((), dtype=t_e.dtype, device=t_e.device)
    if active:
        with torch.enable_grad():
            grads = torch.autograd.grad(values[k], [time] + points, allow_unused=True)
            rate = sum(float((g * s.to(g.dtype)).sum()) for g, s in zip(grads[1:], slopes)
                       if g is not None)
            rate += float(grads[0]) if grads[0] is not None else 0.0
            if rate == 0.0:
                from ..errors import SolverError
                raise SolverError("the event function's rate of change along the solution is "
                                  "zero at the event: the event time has no derivative (a "
                                  "tangential crossing)")
            live = event_fn(t_e, state).reshape(-1)[k]
            shift = -(live - live.detach()).to(t_e.dtype) / rate
    if torch.is_grad_enabled() and any(y.requires_grad for y in leaves) \
            and not shift.requires_grad:         # every rank's backward meets the allreduce
        shift = shift.detach().requires_grad_(True)
    if mpi is not None and mpi.Get_size() > 1:
        shift = _SumOverRanks.apply(shift, mpi)
    moved = _FirstOrderOnly.apply(shift)
    event_out = t_e + moved
    moved_state = [y + s.to(y.dtype) * moved.to(y.dtype) for y, s in zip(leaves, slopes)]
    return event_out, _rebuild(state, moved_state)
