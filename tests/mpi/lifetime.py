"""Run under mpiexec -n 2: test_lifetime's soak with func failing on rank 1 only (every rank
raises SolverError). Prints 'rank <r>: flat' or what grew. argv: PLAN (graphs | binomial)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pnode_dist import Checkpointing  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402
from test_lifetime import PLANS, soak  # noqa: E402

rank = MPI.COMM_WORLD.Get_rank()
grew = soak("dopri5", Checkpointing(**PLANS[sys.argv[1]]), fails_here=rank == 1)
print(f"rank {rank}: {grew or 'flat'}", flush=True)
