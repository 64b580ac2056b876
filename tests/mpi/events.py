"""Run under mpiexec: an event on a batch split over the ranks equals the whole batch on one
rank: the event time (the first row on any rank to reach its threshold; placed on the last
rank), the solution, and the gradients w.r.t. y0, func's parameters and a tensor event_fn uses,
through odeint_event (the last summed by allreduce_gradients), with the method named on the
command line (dopri5: located on the dense output; rk4, cn: fixed steps, the crossing step
retaken). Also an event_fn that fails on one rank: a SolverError on every rank.
Exits non-zero on a mismatch; prints 'worst relative difference'."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__) + "/..")
from conftest import TimeMLP  # noqa: E402

from pnode_dist import SolverError, allreduce_gradients, odeint, odeint_event  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
batch = 7
counts = [batch // size + (1 if r < batch % size else 0) for r in range(size)]
lo = sum(counts[:rank])
hi = lo + counts[rank]
y_all = torch.rand(batch, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
y_all[-1, 0] = 0.05                   # the last row (last rank) reaches the level first
func = TimeMLP(dim=3, hidden=6)
level = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)


def shifted(t, y):
    return func(t, y) - 1.0          # every first component falls


def event_fn(t, y):
    return y[:, 0] - level


METHOD = sys.argv[1] if len(sys.argv) > 1 else "dopri5"
OPTIONS = {} if METHOD == "dopri5" else {"step_size": 0.05}


def gradients(rows, where, weigh_time):
    y0 = rows.clone().requires_grad_(True)
    for p in list(func.parameters()) + [level]:
        p.grad = None
    event_t, sol = odeint_event(shifted, y0, torch.tensor(0.0, dtype=torch.float64),
                                event_fn=event_fn, rtol=1e-9, atol=1e-11, comm=where,
                                method=METHOD, options=OPTIONS)
    loss = sol[-1].square().sum() + (3.0 * event_t if weigh_time else 0.0)
    loss.backward()
    if where is None:
        # A tensor of the user's: summed over the ranks by allreduce_gradients (None on the
        # ranks whose event functions did not stop the solve: nothing reached it there).
        allreduce_gradients([level])
    level_grad = level.grad.clone()
    params = torch.cat([p.grad.reshape(-1) for p in func.parameters()])
    return event_t.detach(), sol.detach(), y0.grad, params, level_grad


dist = gradients(y_all[lo:hi], None, weigh_time=rank == 0)
whole = gradients(y_all, "self", weigh_time=True)
pairs = [(dist[0], whole[0]), (dist[1], whole[1][:, lo:hi]), (dist[2], whole[2][lo:hi]),
         (dist[3], whole[3]), (dist[4], whole[4])]
worst = max(float((a - b).abs().max() / max(b.abs().max(), 1e-300)) for a, b in pairs)
worst = comm.allreduce(worst, op=MPI.MAX)


def failing(t, y):
    if rank == size - 1 and float(t) > 0.05:
        raise ValueError("injected failure in event_fn")
    return y[:, 0] - 0.0


try:
    odeint(shifted, y_all[lo:hi], torch.tensor([0.0, 1.0], dtype=torch.float64),
           event_fn=failing)
    refused = False
except SolverError as exc:
    refused = "event_fn" in str(exc)
refused = comm.allreduce(int(refused), op=MPI.SUM) == size
if rank == 0:
    print(f"worst relative difference {worst:.1e}", flush=True)
    if refused:
        print("event_fn failure raised on every rank", flush=True)
sys.exit(0 if worst <= (1e-11 if METHOD != "cn" else 1e-9) else 1)
