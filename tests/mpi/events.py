"""Run under mpiexec: an event on a batch split over the ranks equals the whole batch on one
rank: the event time (the first row on any rank to reach its threshold; placed on the last
rank), the solution, and the gradients w.r.t. y0, func's parameters and a tensor event_fn uses,
through odeint_event (the last summed by allreduce_gradients; rank 0's loss uses the event
time only, the others' the state), with the method named on the command line (dopri5: located
on the dense output; rk4, cn: fixed steps, the crossing step retaken). Also, each on every rank
alike and followed by a solve that works: an event_fn that fails on one rank (at a step's end,
or raising or giving NaN between the steps: in the retaken crossing step) is a SolverError
naming its cause; a zero rate at the crossing on the rank whose event stops the solve, a
SolverError; a loss that ignores the event's outputs on one rank, an InputError.
Exits non-zero on a mismatch; prints 'worst relative difference' and one line per case."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__) + "/..")
from conftest import TimeMLP  # noqa: E402

from pnode_dist import (InputError, PnodeError, SolverError, allreduce_gradients,  # noqa: E402
                        odeint, odeint_event)
from pnode_dist.parallel import MPI  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
batch = 7
counts = [batch // size + (1 if r < batch % size else 0) for r in range(size)]
lo = sum(counts[:rank])
hi = lo + counts[rank]
y_all = torch.rand(batch, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
y_all[-1, 0] = 0.01                   # the last row (last rank) reaches the level first
func = TimeMLP(dim=3, hidden=6)
level = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)


def shifted(t, y):
    return func(t, y) - 1.0          # every first component falls


def event_fn(t, y):
    return y[:, 0] - level


METHOD = sys.argv[1] if len(sys.argv) > 1 else "dopri5"
OPTIONS = {} if METHOD == "dopri5" else {"step_size": 0.05}


def gradients(rows, where, weigh_time, state_rows):
    """The event, and the gradients of 3 event_t (if weigh_time) + |y(event_t)[state_rows]|^2
    (if state_rows is not None)."""
    y0 = rows.clone().requires_grad_(True)
    for p in list(func.parameters()) + [level]:
        p.grad = None
    event_t, sol = odeint_event(shifted, y0, torch.tensor(0.0, dtype=torch.float64),
                                event_fn=event_fn, rtol=1e-9, atol=1e-11, comm=where,
                                method=METHOD, options=OPTIONS)
    loss = (3.0 * event_t if weigh_time else 0.0) + \
        (sol[-1][state_rows].square().sum() if state_rows is not None else 0.0)
    loss.backward()
    if where is None:
        # A tensor of the user's: summed over the ranks by allreduce_gradients (None on the
        # ranks whose event functions did not stop the solve: nothing reached it there).
        allreduce_gradients([level])
    level_grad = level.grad.clone()
    params = torch.cat([p.grad.reshape(-1) for p in func.parameters()])
    return event_t.detach(), sol.detach(), y0.grad, params, level_grad


# Rank 0's loss uses the event time only (its rows do not stop the solve), the others' the
# state only: every rank's backward pass still takes the same collective steps.
dist = gradients(y_all[lo:hi], None, weigh_time=rank == 0,
                 state_rows=slice(None) if rank else None)
whole = gradients(y_all, "self", weigh_time=True, state_rows=slice(counts[0], None))
pairs = [(dist[0], whole[0]), (dist[1], whole[1][:, lo:hi]), (dist[2], whole[2][lo:hi]),
         (dist[3], whole[3]), (dist[4], whole[4])]
worst = max(float((a - b).abs().max() / max(b.abs().max(), 1e-300)) for a, b in pairs)
worst = comm.allreduce(worst, op=MPI.MAX)


def failing(t, y):
    if rank == size - 1 and float(t) > 0.0:          # at the first step's end
        raise ValueError("injected failure in event_fn")
    return y[:, 0] - 0.0


def off_grid(t):
    """Between the fixed steps: only the retaken crossing step evaluates event_fn there (any
    step's end for dopri5)."""
    return abs(float(t) / 0.05 - round(float(t) / 0.05)) > 1e-6


def retaken(fault):
    def fails_between_steps(t, y):
        if rank == size - 1 and off_grid(t):
            if fault == "raise":
                raise ValueError("injected failure in event_fn")
            return y[:, 0] * float("nan")
        return y[:, 0]
    return fails_between_steps


def flat(t, y):
    """The first components, with a zero rate on the rank whose event stops the solve."""
    h = y[:, 0]
    return h + (h.detach() - h) if rank == size - 1 else h


def solve(event=event_fn, times=None):
    """odeint_event (gradients wanted) or, over `times`, odeint."""
    kwargs = dict(event_fn=event, rtol=1e-9, atol=1e-11, method=METHOD, options=OPTIONS)
    if times is None:
        return odeint_event(shifted, y_all[lo:hi].clone().requires_grad_(True),
                            torch.tensor(0.0, dtype=torch.float64), **kwargs)
    return odeint(shifted, y_all[lo:hi], times, **kwargs)


def ignoring_the_event():
    """Rank 0's loss uses no output of the solve: it goes on to allreduce_gradients while the
    others are in the event's backward pass."""
    event_t, sol = solve()
    (level.sum() if rank == 0 else event_t + sol[-1].sum()).backward()
    allreduce_gradients([level])


def works():
    event_t, sol = solve()
    (event_t + sol[-1].sum()).backward()
    return abs(float(event_t.detach()) - float(dist[0])) <= 1e-12 * abs(float(dist[0]))


def on_every_rank(case, run, kind, *words):
    """run() raises `kind` on every rank, its message holding `words`, chained to the
    user's exception where it was raised; then the next solve works (the same event time)."""
    try:
        run()
        ok = False
    except PnodeError as exc:
        text = str(exc)
        ok = (type(exc) is kind and all(w in text for w in words) and "Elsewhere" not in text
              and type(exc.__cause__).__name__ in ("NoneType", "ValueError",
                                                   "FloatingPointError"))
        if not ok:
            print(f"rank {rank}: {case}: {type(exc).__name__}: {text}", flush=True)
    ok = works() and ok
    if comm.allreduce(int(ok), op=MPI.SUM) == size and rank == 0:
        print(f"{case} raised on every rank", flush=True)


times = torch.tensor([0.0, 1.0], dtype=torch.float64)
on_every_rank("event_fn failure", lambda: odeint(shifted, y_all[lo:hi], times, event_fn=failing),
              SolverError, "injected failure", f"rank {size - 1}")
on_every_rank("event_fn failure in the retaken step",
              lambda: solve(retaken("raise"), times=times), SolverError, "injected failure",
              f"rank {size - 1}")
on_every_rank("event_fn NaN in the retaken step", lambda: solve(retaken("nan"), times=times),
              SolverError, "event_fn returned NaN", f"rank {size - 1}")
on_every_rank("tangential crossing", lambda: solve(flat), SolverError,
              "tangential crossing")
on_every_rank("loss without the event", ignoring_the_event, InputError,
              "every rank's loss must use the event time or state")
if rank == 0:
    print(f"worst relative difference {worst:.1e}", flush=True)
sys.exit(0 if worst <= (1e-11 if METHOD != "cn" else 1e-9) else 1)
