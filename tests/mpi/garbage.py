"""Run under mpiexec -n 2: solves of a problem too large to keep pooled (each Integrator is
destroyed when its backward pass ends), under the default plan and a binomial one, then
PETSc's garbage on PETSC_COMM_WORLD (what petsc4py handed PETSc when Python dropped a parallel
object) is printed by PETSc.garbage_view: 'Rank <r>:: Total entries: <n>' per rank."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TimeMLP  # noqa: E402
from pnode_dist import Checkpointing, odeint  # noqa: E402
from pnode_dist.parallel import PETSc  # noqa: E402

torch.manual_seed(0)
func = TimeMLP(dim=2)
y0 = torch.randn(50_000, 2, dtype=torch.float64)       # 0.4 MiB a rank, about 6 MiB held
for plan in (Checkpointing(), Checkpointing(schedule="binomial", slots=2)):
    for _ in range(3):
        y = y0.clone().requires_grad_(True)
        ys = odeint(func, y, torch.linspace(0.0, 1.0, 3, dtype=torch.float64), method="rk4",
                    options={"step_size": 0.25}, checkpointing=plan)
        ys[-1].pow(2).mean().backward()
sys.stdout.flush()
PETSc.garbage_view(PETSc.COMM_WORLD)
