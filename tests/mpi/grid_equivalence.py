"""Run under mpiexec: a field split over the ranks by a DMDA gives the outputs and gradients
(field and parameters) of the whole field solved on one rank without a grid (func applied to
the field extended by the halo: zeros, or wrapped around when periodic), for 1-D, 2-D and
3-D grids, periodic or not, several process grids, explicit, adaptive, implicit and
checkpointed solves; the halo exchange passes the dot-product test <E x, y> = <x, E^T y>, and
grid.with_halo(patch) is the padded whole field's window.
Prints the worst relative mismatch; exits non-zero above 1e-12."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__) + "/..")
from conftest import ConvField, Extended  # noqa: E402

from pnode_dist import Checkpointing, Grid, InputError, odeint  # noqa: E402
from pnode_dist.grid import HaloAdd, HaloExchange  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

comm = MPI.COMM_WORLD
size = comm.Get_size()
def process_grids(ndim):
    """Process grids (torch order) with `size` ranks for an ndim grid, PETSc's choice first."""
    grids = [None]
    if ndim == 2 and size in (2, 3):
        grids += [(size, 1), (1, size)]
    if ndim == 2 and size == 4:
        grids += [(4, 1), (2, 2)]
    return grids


def dot_product_test(grid, gen):
    x = torch.randn(grid.vec_shape, generator=gen, dtype=torch.float64)
    y = torch.randn(grid.ghost_spatial + (grid.dof,), generator=gen, dtype=torch.float64)
    ex_y = float((HaloExchange.apply(grid, x) * y).sum())
    x_et = float((x * HaloAdd.apply(grid, y)).sum())
    lhs, rhs = comm.allreduce(ex_y), comm.allreduce(x_et)
    return abs(lhs - rhs) / abs(lhs)


def with_halo_error(grid, field):
    """grid.with_halo(patch) against the whole field padded by the halo, sliced to the patch."""
    h, nd = grid.halo, grid.ndim
    padded = torch.nn.functional.pad(field if field.dim() > nd + 1 else field[None],
                                     (h, h) * nd, mode="circular" if grid.periodic[0]
                                     else "constant")
    padded = padded if field.dim() > nd + 1 else padded[0]
    lead = (slice(None),) * (field.dim() - nd)
    window = tuple(slice(s, s + n + 2 * h) for s, n in zip(grid.local_start, grid.local_spatial))
    got = grid.with_halo(grid.scatter(field))
    return float((got - padded[lead + window]).abs().max() / field.abs().max())


SHAPES = {1: (24,), 2: (12, 10), 3: (6, 6, 5)}
SOLVES = [("rk4", {"step_size": 0.25}, None), ("dopri5", None, None),
          ("cn", {"step_size": 0.25}, None),
          ("rk4", {"step_size": 0.125}, Checkpointing(schedule="binomial", slots=3))]
worst = 0.0
gen = torch.Generator().manual_seed(11 + comm.Get_rank())
for ndim, shape in SHAPES.items():
    for periodic in (False, True):
        for procs in process_grids(ndim):
            for batch in ((None, 2) if ndim == 2 else (None,)):
                grid = Grid(shape, channels=2, batch=batch, periodic=periodic, halo=2,
                            proc_sizes=procs)
                worst = max(worst, dot_product_test(grid, gen))
                lead = (2,) if batch is None else (batch, 2)
                field = torch.randn(lead + shape, generator=torch.Generator().manual_seed(1),
                                    dtype=torch.float64)
                worst = max(worst, comm.allreduce(with_halo_error(grid, field), op=MPI.MAX))
                t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
                weights = torch.sin(torch.arange(3 * field.numel(), dtype=torch.float64))
                weights = weights.view((3,) + field.shape)
                for method, options, policy in SOLVES if (ndim == 2 and procs is None) else SOLVES[:1]:
                    results = {}
                    for mode in ("grid", "whole"):
                        f = ConvField(ndim, 2, periodic, seed=3)
                        if mode == "grid":
                            y0 = grid.scatter(field).clone().requires_grad_(True)
                            ys = odeint(f, y0, t, method=method, options=options, grid=grid,
                                        checkpointing=policy, rtol=1e-6, atol=1e-8)
                            w = weights[(slice(None),) * (1 + len(lead)) + grid.patch_slices()]
                        else:
                            y0 = field.clone().requires_grad_(True)
                            ys = odeint(Extended(f, ndim, 2, periodic), y0, t, method=method,
                                        options=options, comm="self",
                                        checkpointing=policy, rtol=1e-6, atol=1e-8)
                            w = weights
                        (ys * w).sum().backward()
                        if mode == "grid":
                            results[mode] = (grid.gather(ys.detach()), grid.gather(y0.grad),
                                             [p.grad.clone() for p in f.parameters()])
                        else:
                            results[mode] = (ys.detach(), y0.grad,
                                             [p.grad.clone() for p in f.parameters()])
                    # parameter gradients: equal on every rank
                    errs = [float((a - b).abs().max() / b.abs().max())
                            for a, b in zip(results["grid"][2], results["whole"][2])]
                    if comm.Get_rank() == 0:
                        for a, b in zip(results["grid"][:2], results["whole"][:2]):
                            errs.append(float((a - b).abs().max() / b.abs().max()))
                    err = comm.allreduce(max(errs), op=MPI.MAX)
                    if err > 1e-12 and comm.Get_rank() == 0:
                        print(f"mismatch {err:.2e}: ndim {ndim} periodic {periodic} procs "
                              f"{procs} batch {batch} {method} {policy}", flush=True)
                    worst = max(worst, err)
                grid.destroy()
def split_batch_error():
    """Batch split over two groups of ranks, grid split within each group, gradients summed
    over all ranks: against the whole batch on one rank."""
    group_of = comm.Get_rank() * 2 // size
    group = comm.Split(color=group_of, key=comm.Get_rank())
    field = torch.randn(4, 2, 12, 10, generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)
    rows = slice(2 * group_of, 2 * group_of + 2)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    weights = torch.cos(torch.arange(2 * field.numel(), dtype=torch.float64)).view((2,) + field.shape)
    grid = Grid((12, 10), channels=2, batch=2, periodic=True, halo=2, comm=group,
                gradient_comm=comm)
    f = ConvField(2, 2, True, seed=6)
    y0 = grid.scatter(field[rows]).clone().requires_grad_(True)
    ys = odeint(f, y0, t, method="rk4", options={"step_size": 0.25}, grid=grid)
    (ys * weights[(slice(None), rows, slice(None)) + grid.patch_slices()]).sum().backward()
    grads = [p.grad.clone() for p in f.parameters()]
    ys_group, gy_group = grid.gather(ys.detach()), grid.gather(y0.grad)
    g = ConvField(2, 2, True, seed=6)
    y0_all = field.clone().requires_grad_(True)
    ys_all = odeint(Extended(g, 2, 2, True), y0_all, t, method="rk4", comm="self",
                    options={"step_size": 0.25})
    (ys_all * weights).sum().backward()
    ys_all = ys_all.detach()
    errs = [float((a - b.grad).abs().max() / b.grad.abs().max())
            for a, b in zip(grads, g.parameters())]
    if ys_group is not None:
        errs.append(float((ys_group - ys_all[:, rows]).abs().max() / ys_all.abs().max()))
        errs.append(float((gy_group - y0_all.grad[rows]).abs().max() / y0_all.grad.abs().max()))
    grid.destroy()
    return comm.allreduce(max(errs), op=MPI.MAX)


if size in (2, 4):
    err = split_batch_error()
    if err > 1e-12 and comm.Get_rank() == 0:
        print(f"mismatch {err:.2e}: batch split over 2 groups", flush=True)
    worst = max(worst, err)
if size > 1:                        # patches narrower than the halo: the same error on every rank
    try:
        Grid((8, 2 * size), channels=1, halo=3, proc_sizes=(1, size))
        sys.exit("a patch narrower than the halo was accepted")
    except InputError as exc:
        assert "narrower than halo=3" in str(exc), exc
    try:                            # a halo that differs on one rank: an error everywhere
        Grid((12, 12), channels=1, halo=1 + (comm.Get_rank() == size - 1))
        sys.exit("grids that differ between ranks were accepted")
    except InputError as exc:
        assert "differs between ranks" in str(exc), exc
if comm.Get_rank() == 0:
    print(f"worst relative mismatch {worst:.2e} on {size} ranks", flush=True)
sys.exit(0 if worst <= 1e-12 else 1)
