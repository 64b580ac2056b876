"""Run under mpiexec: bounded-memory schedules (binomial and uniform, host and disk tiers) give
the gradients of the store-everything run on the same ranks (<= 1e-14 relative) and of the
whole batch on one rank (<= 1e-12), and leave no files behind. The memory-aware default plans
alike on every rank, and a solve that outgrows its plan spills at the same step on every rank
with the store-everything gradients. Exits non-zero on a mismatch."""
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__) + "/..")
from conftest import TimeMLP, mpi_batch_problem  # noqa: E402

from pnode_dist import Checkpointing, odeint  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
counts, lo, hi, y_all, t = mpi_batch_problem(comm)
disk = comm.bcast(tempfile.mkdtemp(prefix="pnode-ckpt-") if rank == 0 else None, root=0)
STATE = 8 * 3 * max(counts)
POLICIES = {"default": None, "all": Checkpointing(schedule="all"),
            "binomial-disk": Checkpointing(schedule="binomial", slots=3, host_bytes=STATE,
                                           disk_dir=disk),
            "uniform-disk": Checkpointing(schedule="uniform", slots=3, host_bytes=0,
                                          disk_dir=disk)}
# Implicit methods with the exact Newton: gmres on 3 oversubscribed ranks takes turns at every
# Krylov iteration (equivalence.py covers cn with gmres on n ranks).
CASES = [("rk4", {"step_size": 0.1}), ("dopri5", None),
         ("cn", {"step_size": 0.1, "linear_solver": "exact"}),
         ("beuler", {"step_size": 0.1, "linear_solver": "exact"})]


def gradients(method, options, policy, mode):
    f = TimeMLP(seed=3)
    y0 = (y_all[lo:hi] if mode == "dist" else y_all).clone().requires_grad_(True)
    ys = odeint(f, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8,
                comm=None if mode == "dist" else "self", checkpointing=policy)
    (ys.sin() * torch.arange(1, 4, dtype=ys.dtype).view(3, 1, 1)).sum().backward()
    g = y0.grad if mode == "dist" else y0.grad[lo:hi]
    return torch.cat([g.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


worst_schedule = worst_ranks = 0.0
for method, options in CASES:
    ref = gradients(method, options, None, "dist")
    for name, policy in POLICIES.items():
        g = gradients(method, options, policy, "dist")
        worst_schedule = max(worst_schedule, rel(g, ref))
        worst_ranks = max(worst_ranks, rel(g, gradients(method, options, policy, "serial")))
        if rel(g, ref) > 1e-14:
            print(f"rank {rank} {method} {name}: {rel(g, ref):.2e} from store-all", flush=True)


def planned(f, policy, t_end):
    """An adaptive dopri5 solve of f to t_end on the uneven shards: (gradients, stats)."""
    f.zero_grad()
    y0 = y_all[lo:hi].clone().requires_grad_(True)
    stats = {}
    times = torch.tensor([0.0, 0.3 * t_end, t_end], dtype=torch.float64)
    ys = odeint(f, y0, times, method="dopri5", rtol=1e-6, atol=1e-8, checkpointing=policy,
                stats=stats)
    (ys.sin() * torch.arange(1, 4, dtype=ys.dtype).view(3, 1, 1)).sum().backward()
    return torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()]), stats


# The memory-aware default plans alike on every rank (agreed sizes and budget), and a solve
# that outgrows its plan spills at the same step on every rank, with the same gradients.
_, default = planned(TimeMLP(seed=4), None, 1.0)
budget = 2 * default["memory_used"]  # a budget the longer solve outgrows
f, twin = TimeMLP(seed=4), TimeMLP(seed=4)      # same weights, separate solver caches
plans = []
for t_end in (1.0, 8.0):
    g, stats = planned(f, Checkpointing(memory=budget), t_end)
    ref, _ = planned(twin, Checkpointing(schedule="all"), t_end)
    worst_schedule = max(worst_schedule, rel(g, ref))
    plans.append((stats["checkpoint_schedule"], stats["memory_budget"],
                  stats.get("spilled_at_step"), stats["memory_used"] <= budget))
everyone = comm.allgather((default["checkpoint_schedule"], default["memory_budget"], plans))
spilled = plans[-1][2] is not None and all(p[3] for p in plans)
if any(e != everyone[0] for e in everyone) or not spilled:
    print(f"rank {rank}: plans differ or no spill within the budget: {everyone}", flush=True)
    worst_schedule = 1.0
comm.Barrier()                       # the serial solves of other ranks may still be running
leftover = len(os.listdir(disk))
worst_schedule = comm.allreduce(worst_schedule, op=MPI.MAX)
worst_ranks = comm.allreduce(worst_ranks, op=MPI.MAX)
leftover = comm.allreduce(leftover, op=MPI.SUM)
if rank == 0:
    shutil.rmtree(disk)
    print(f"ranks={size} schedules vs store-all {worst_schedule:.2e}, "
          f"{size} ranks vs 1 rank {worst_ranks:.2e}, files left {leftover}")
sys.exit(0 if worst_schedule <= 1e-14 and worst_ranks <= 1e-12 and leftover == 0 else 1)
