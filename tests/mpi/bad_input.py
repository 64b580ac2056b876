"""Run under mpiexec: a bad argument on ONE rank raises InputError on EVERY rank (no hang).
argv[1] names the case. Each rank prints 'raised: <message>'; exits 0 only if it raised."""
import atexit
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__) + "/..")
from conftest import TimeMLP  # noqa: E402

from pnode_dist import Checkpointing, InputError, SolverError, odeint  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

rank = MPI.COMM_WORLD.Get_rank()
case = sys.argv[1]
f = TimeMLP()
y0 = torch.randn(3, 3, dtype=torch.float64)
t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
kwargs = {"method": "rk4", "options": {"step_size": 0.1}}
if rank == 1:
    if case == "nan":
        y0[0, 0] = float("nan")
    elif case == "shape":
        y0 = torch.randn(3, 4, dtype=torch.float64)
    elif case == "times":
        t = torch.tensor([0.0, 0.6, 1.0], dtype=torch.float64)
    elif case == "method":
        kwargs["method"] = "rk45"
    elif case == "blowup":
        y0 = torch.full((3, 3), 50.0, dtype=torch.float64)
if case == "disk":       # rank 1's checkpoint directory cannot be created (a file is in the way)
    scratch = tempfile.mkdtemp(prefix="pnode-bad-disk-")
    atexit.register(shutil.rmtree, scratch)
    blocker = os.path.join(scratch, "file")
    open(blocker, "w").close()
    kwargs["checkpointing"] = Checkpointing(
        schedule="binomial", slots=3, host_bytes=0,
        disk_dir=os.path.join(blocker if rank == 1 else scratch, "ckpt"))
    y0.requires_grad_(True)
if case == "blowup":
    class Square(torch.nn.Module):
        """y' = y^2 blows up at t = 1/y0: within [0, 1] only for rank 1's y0 = 50."""

        def forward(self, t, y):
            return y * y

    f = Square()
    y0 = y0.abs() * 0.1 if rank != 1 else y0
try:
    odeint(f, y0, t, **kwargs)
except (InputError, SolverError) as exc:
    os.write(1, f"rank {rank} raised: {exc}\n".encode())     # one atomic write per rank
    sys.exit(0)
os.write(1, f"rank {rank} did not raise\n".encode())
sys.exit(1)
