"""Checks of the single-precision build, run with PNODE_PRECISION=single on 1 or more ranks
(tests/test_device.py). Every rank asserts; a failure exits non-zero."""
import sys
import tempfile
from pathlib import Path

import h5py
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import TimeMLP, mpi_batch_problem, recorded_steps  # noqa: E402

import pnode_dist  # noqa: E402
from pnode_dist import Checkpointing, odeint  # noqa: E402
from pnode_dist._distributed.layout import BatchLayout  # noqa: E402
from pnode_dist._solve.explicit import TorchRHS  # noqa: E402
from pnode_dist.testing import SOLVER_DTYPE  # noqa: E402
from pnode_dist.parallel import MPI, PETSc  # noqa: E402
from pnode_dist.testing import rk_record_replay, theta_replay  # noqa: E402

F32 = torch.float32
T_OUT = torch.tensor([0.0, 0.3, 0.7, 1.0])
TOL = 2e-5                   # float32 round-off accumulated over a few dozen steps


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def loss(ys):
    w = torch.arange(1, ys.shape[0] + 1, dtype=ys.dtype).view(-1, 1, 1)
    return (w * ys.sin()).sum() + (ys[-1] ** 2).sum()


def gradients(func, y0, **kwargs):
    y = y0.clone().requires_grad_(True)
    ys = odeint(func, y, T_OUT, **kwargs)
    return ys, torch.autograd.grad(loss(ys), [y] + list(func.parameters()))


def check_precision():
    assert pnode_dist.parallel.PRECISION == "single"
    assert SOLVER_DTYPE == F32 and PETSc.ScalarType().itemsize == 4


def check_callbacks_use_the_vec_memory(dtype=F32):
    """A func of the solver's dtype gets the Vec's own memory (no cast, no copy) in the forward
    solve."""
    seen = []

    def func(t, y):
        seen.append((y.data_ptr(), y.dtype))
        return -y

    layout = BatchLayout(PETSc.COMM_SELF, (4, 3), [(4, 3)])
    X, F = layout.create_state_vec(), layout.create_state_vec()
    X.set(1.5)
    rhs = TorchRHS(func, [], (4, 3), dtype, torch.device("cpu"))
    rhs.rhs(None, 0.0, X, F)
    assert seen == [(X.getArray(readonly=True).ctypes.data, dtype)], seen
    assert float(F.norm()) > 0 and rhs.error is None
    rhs.forget_views()


def check_fixed_steps_land_on_outputs(y0):
    """float32 times: each output interval of 0.3 takes exactly 30 steps of 0.01, with no
    sliver step for a time that misses the output time by round-off."""
    stats = {}
    t = torch.linspace(0, 3.3, 12)
    odeint(TimeMLP(dtype=F32), y0, t, method="rk4", options={"step_size": 0.01}, stats=stats,
           comm="self")
    assert stats["steps"] == 11 * 30, stats["steps"]


def check_reverse_accuracy(y0):
    """Gradients equal backprop through a float32 torch replay of the same steps."""
    for method, options in (("rk4", {"step_size": 0.05}), ("dopri5", None)):
        mlp = TimeMLP(dtype=F32)
        ys, grads = gradients(mlp, y0, method=method, options=options, rtol=1e-5, atol=1e-6)
        record, _ = recorded_steps(mlp, y0, T_OUT, method, options, rtol=1e-5, atol=1e-6)
        y = y0.clone().requires_grad_(True)
        ref = rk_record_replay(mlp, y, record, method)
        grads_ref = torch.autograd.grad(loss(ref), [y] + list(mlp.parameters()))
        assert ys.dtype == F32 and rel(ys.detach(), ref.detach()) < TOL, method
        for k, (g, gr) in enumerate(zip(grads, grads_ref)):
            assert g.dtype == F32 and rel(g, gr) < TOL, f"{method} gradient {k}: {rel(g, gr)}"


def check_implicit(y0):
    """Crank-Nicolson with matrix-free Newton-GMRES converges at float32 tolerances, and its
    gradients match the replay of the same steps (Newton solved to float32 round-off)."""
    mlp = TimeMLP(dtype=F32)
    options = {"step_size": 0.1}
    ys, grads = gradients(mlp, y0, method="cn", options=options)
    record, _ = recorded_steps(mlp, y0, T_OUT, "cn", options)
    y = y0.clone().requires_grad_(True)
    ref = theta_replay(mlp, y, record.times, record.output_steps, 0.5, True)
    grads_ref = torch.autograd.grad(loss(ref), [y] + list(mlp.parameters()))
    assert rel(ys.detach(), ref.detach()) < 1e-4
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        assert rel(g, gr) < 1e-3, f"cn gradient {k}: {rel(g, gr)}"


def check_checkpoints_on_disk(y0):
    """Binomial checkpointing through float32 HDF5 files gives the gradients of 'all'."""
    mlp = TimeMLP(dtype=F32)
    options = {"step_size": 0.05}
    _, grads_all = gradients(mlp, y0, method="rk4", options=options)
    with tempfile.TemporaryDirectory() as tmp:
        policy = Checkpointing(schedule="binomial", slots=4, host_bytes=0, disk_dir=tmp,
                               keep_files=True)
        _, grads = gradients(mlp, y0, method="rk4", options=options, checkpointing=policy,
                             comm="self")
        files = list(Path(tmp).glob("*.h5"))
        assert files, "no checkpoint file written"
        with h5py.File(files[0]) as f:
            dtypes = {str(ds.dtype) for ds in f["checkpoints"].values()}
        assert dtypes == {"float32"}, dtypes
    for g, ga in zip(grads, grads_all):
        assert rel(g, ga) < 1e-6, rel(g, ga)      # the same steps; sums in another order


def check_ranks_agree():
    """The batch split over the ranks gives the one-rank solve (float32 round-off)."""
    comm = MPI.COMM_WORLD
    counts, lo, hi, y_all, t = mpi_batch_problem(comm)
    y_all = y_all.to(F32)
    mlp = TimeMLP(dtype=F32)
    options = {"step_size": 0.1}

    def solve(y, comm):
        y = y.clone().requires_grad_(True)
        ys = odeint(mlp, y, t.to(F32), method="rk4", options=options, comm=comm)
        return ys.detach(), torch.autograd.grad((ys ** 2).sum(), [y] + list(mlp.parameters()))

    ys, grads = solve(y_all[lo:hi], None)
    ys_one, grads_one = solve(y_all, "self")
    assert rel(ys, ys_one[:, lo:hi]) < TOL
    assert rel(grads[0], grads_one[0][lo:hi]) < TOL
    for g, g1 in zip(grads[1:], grads_one[1:]):
        assert rel(g, g1) < TOL, rel(g, g1)


def main():
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)).to(F32)
    check_precision()
    check_ranks_agree()
    if MPI.COMM_WORLD.Get_size() == 1:
        check_callbacks_use_the_vec_memory()
        check_fixed_steps_land_on_outputs(y0)
        check_reverse_accuracy(y0)
        check_implicit(y0)
        check_checkpoints_on_disk(y0)
    print(f"rank {MPI.COMM_WORLD.Get_rank()}: single-precision checks passed", flush=True)


if __name__ == "__main__":
    main()
