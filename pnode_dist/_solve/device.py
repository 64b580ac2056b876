"""Where the solver state lives (host or GPU) and in which precision.

Precision: the state has PETSc's scalar type, float64 by default or float32 with the
single-precision build (PNODE_PRECISION=single, see parallel.py). A func of that same dtype is
evaluated on the Vecs' own memory, without casts; another dtype costs a cast per callback.

Device: when y0 is on a GPU (and PETSc is built with CUDA, `make setup GPU=1`), the state Vecs
are CUDA Vecs and callbacks see torch views of their device memory: nothing crosses to the host
during a solve. Each rank uses one GPU, chosen at import (parallel.py): `rank_device()` names
it.
"""
import numpy as np
import torch

from .._distributed.startup import PETSc
from ..errors import InputError

SOLVER_DTYPE = torch.from_numpy(np.zeros(0, PETSc.ScalarType)).dtype
SOLVER_ITEMSIZE = torch.finfo(SOLVER_DTYPE).bits // 8
# What a Vec in PETSc's memory trajectory costs beyond its data (the step's share of the
# trajectory's and the forward record's bookkeeping included), measured with glibc's mallinfo2.
VEC_OVERHEAD = 1536


def petsc_has_cuda():
    return bool(PETSc.Sys.hasExternalPackage("cuda"))


def rank_device():
    """This rank's torch device: its GPU if torch sees one and PETSc is built with CUDA, else
    the CPU.

    One GPU per MPI rank: at import, rank r of a node takes GPU ``r % (visible GPUs)`` for torch
    and PETSc alike (``-device_select_cuda N`` on the command line overrides it). Put the model
    and y0 there.

    Returns
    -------
    torch.device
        ``cuda:k`` on a GPU node, else ``cpu``.

    Examples
    --------
    ::

        dev = pnode_dist.rank_device()
        block = ODEBlock(func.to(dev), method="rk4", options={"step_size": 0.1})
        out = block(x.to(dev))
    """
    if torch.cuda.is_available() and petsc_has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_device(y0):
    """InputError unless y0 is on a device that this PETSc can solve on."""
    dev = y0.device
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise InputError(f"y0 is on {dev}: pnode_dist solves on the CPU or on CUDA GPUs")
    if not petsc_has_cuda():
        raise InputError("y0 is on a GPU but this PETSc is built without CUDA: build it with "
                         "`make setup GPU=1` (or move func and y0 to the CPU)")
    if dev.index is not None and dev.index != torch.cuda.current_device():
        raise InputError(f"y0 is on {dev} but this rank's GPU is cuda:"
                         f"{torch.cuda.current_device()} (node-local rank modulo the visible "
                         "GPUs): use y0.to(pnode_dist.rank_device())")
    if torch.cuda.current_stream(dev) != torch.cuda.default_stream(dev):
        raise InputError("odeint runs on the default CUDA stream, which PETSc's kernels share "
                         "(ordering them with torch's): call it outside torch.cuda.stream(...)")


def vec_type(dev):
    """The PETSc Vec type holding a state on torch device `dev`."""
    return PETSc.Vec.Type.CUDA if dev.type == "cuda" else PETSc.Vec.Type.STANDARD


def new_vec(comm, local_size, global_size, dev):
    """A Vec of the given sizes in the memory of torch device `dev`."""
    vec = PETSc.Vec().create(comm=comm)
    vec.setSizes((local_size, global_size))
    vec.setType(vec_type(dev))
    vec.setUp()
    return vec
