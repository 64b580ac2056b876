"""Run under mpiexec -n 2: a fixed-step explicit solve (forward and adjoint) does not synchronise
the ranks. Rank 1 sleeps 1 s in its first f evaluation of each pass; rank 0 records when its own
evaluations happen. Had the solve any collective call per step, rank 0's evaluations would be
spread over rank 1's sleep. The adaptive case (a global error norm every step) is the control
that shows the check can fail. Exits non-zero on a wrong outcome."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__) + "/..")
from conftest import TimeMLP  # noqa: E402

from pnode_dist import Checkpointing, odeint  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

rank = MPI.COMM_WORLD.Get_rank()
SLEEP = 1.0


class Recording(TimeMLP):
    def __init__(self):
        super().__init__()
        self.calls = {True: [], False: []}      # grad enabled (adjoint) / disabled (forward)

    def forward(self, t, y):
        calls = self.calls[torch.is_grad_enabled()]
        if rank == 1 and not calls:
            time.sleep(SLEEP)
        calls.append(time.perf_counter())
        return super().forward(t, y)


def spans(method, options):
    """Seconds between rank 0's first and last f evaluation in the forward/adjoint pass."""
    f = Recording()
    y0 = torch.randn(2 + rank, 3, dtype=torch.float64, requires_grad=True)
    # Store-all without graphs: grad mode tells the forward's evaluations from the adjoint's,
    # and no sizes are measured (that evaluation is followed by an allreduce).
    ys = odeint(f, y0, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), method=method,
                options=options, checkpointing=Checkpointing(schedule="all"))
    ys.pow(2).sum().backward()
    return {k: v[-1] - v[0] for k, v in f.calls.items()}


spans("rk4", {"step_size": 0.05})      # warm-up: the first autograd call is slow
fixed = spans("rk4", {"step_size": 0.05})
adaptive = spans("dopri5", None)
ok = True
if rank == 0:
    ok = fixed[False] < SLEEP / 2 and fixed[True] < SLEEP / 2 and adaptive[False] > 0.9 * SLEEP
    os.write(1, (f"fixed-step spans: forward {fixed[False]:.3f}s adjoint {fixed[True]:.3f}s; "
                 f"adaptive forward span {adaptive[False]:.3f}s (control); "
                 f"{'no communication in the solve' if ok else 'UNEXPECTED'}\n").encode())
ok = MPI.COMM_WORLD.allreduce(ok, op=MPI.LAND)
sys.exit(0 if ok else 1)
