"""Run under mpiexec: an event on a field split over the ranks by a DMDA (event_fn sees this
rank's patch: one event function per cell, the first cell to fall to a level stops the solve)
gives the event time, the field at it and the gradients (field and parameters, through
odeint_event) of the whole field solved on one rank without a grid. Prints the worst relative
mismatch; exits non-zero above 1e-11."""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__) + "/..")
from conftest import ConvField, Extended  # noqa: E402

from pnode_dist import Grid, odeint_event  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

comm = MPI.COMM_WORLD
rank = comm.Get_rank()


class Drift(nn.Module):
    """func minus a constant: every cell drifts down, so that one reaches the level."""

    def __init__(self, func):
        super().__init__()
        self.func = func

    def forward(self, t, y):
        return self.func(t, y) - 0.5


shape = (12, 10)
field = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
level = float(field[0].min()) - 0.1
weights = torch.cos(torch.arange(field.numel(), dtype=torch.float64)).view(field.shape)
grid = Grid(shape, channels=2, halo=2)
results = {}
for mode in ("grid", "whole"):
    f = ConvField(2, 2, False, seed=3)
    if mode == "grid":
        y0 = grid.scatter(field).clone().requires_grad_(True)
        event_t, sol = odeint_event(Drift(f), y0, torch.tensor(0.0, dtype=torch.float64),
                                    event_fn=lambda t, y: y[0].reshape(-1) - level, grid=grid,
                                    rtol=1e-8, atol=1e-10)
        w = weights[(slice(None),) + grid.patch_slices()]
        loss = (sol[-1] * w).sum() + (2.0 * event_t if rank == 0 else 0.0)
    else:
        y0 = field.clone().requires_grad_(True)
        event_t, sol = odeint_event(Extended(Drift(f), 2, 2, False), y0,
                                    torch.tensor(0.0, dtype=torch.float64),
                                    event_fn=lambda t, y: y[0].reshape(-1) - level,
                                    comm="self", rtol=1e-8, atol=1e-10)
        loss = (sol[-1] * weights).sum() + 2.0 * event_t
    loss.backward()
    grads = [p.grad.clone() for p in f.parameters()]
    if mode == "grid":
        results[mode] = (event_t.detach(), grid.gather(sol[-1].detach()), grid.gather(y0.grad),
                         grads)
    else:
        results[mode] = (event_t.detach(), sol[-1].detach(), y0.grad, grads)
errs = [float((a - b).abs().max() / b.abs().max())
        for a, b in zip(results["grid"][3], results["whole"][3])]
errs.append(abs(float(results["grid"][0] - results["whole"][0])) / float(results["whole"][0]))
if rank == 0:
    for a, b in zip(results["grid"][1:3], results["whole"][1:3]):
        errs.append(float((a - b).abs().max() / b.abs().max()))
worst = comm.allreduce(max(errs), op=MPI.MAX)
grid.destroy()
if rank == 0:
    print(f"grid events on {comm.Get_size()} ranks: worst relative difference {worst:.1e}",
          flush=True)
sys.exit(0 if worst <= 1e-11 else 1)
