"""Run under mpiexec -n 2: test_lifetime's soak with func failing on rank 1 only (every rank
raises SolverError). Rank 0 prints 'rank <r>: flat' or what grew, a line per rank; then
PETSc's garbage on PETSC_COMM_WORLD is printed ('Rank <r>:: Total entries: <n>').
argv: PLAN (graphs | binomial)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pnode_dist import Checkpointing  # noqa: E402
from pnode_dist.parallel import MPI, PETSc  # noqa: E402
from test_lifetime import PLANS, soak  # noqa: E402

rank = MPI.COMM_WORLD.Get_rank()
grew = soak("dopri5", Checkpointing(**PLANS[sys.argv[1]]), fails_here=rank == 1)
# Rank 0 prints both lines: two ranks printing at once can interleave in mpiexec's output.
lines = MPI.COMM_WORLD.gather(f"rank {rank}: {grew or 'flat'}", root=0)
if rank == 0:
    print("\n".join(lines), flush=True)
PETSc.garbage_view(PETSc.COMM_WORLD)
