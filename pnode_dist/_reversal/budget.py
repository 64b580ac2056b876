"""Measured sizes of one problem and the memory its reversal may use: the numbers the
checkpointing policy's 'auto' schedule chooses a strategy from.

Sizes are measured once per problem (its first differentiable solve), on every rank, and
agreed in one allreduce (the largest sizes, the smallest budgets), so that every rank picks the
same strategy and slot count:
- state bytes: the largest shard in the solver precision;
- graph bytes: what one evaluation of f with a graph keeps alive (the tensors autograd saves,
  counted with torch's saved-tensor hooks, storages once, the parameters and the input state
  excluded) plus its input copy and output: the size of one stored stage graph;
- the default budgets: DEFAULT_FRACTION of the memory actually free (MemAvailable for host
  memory, shared by this solve's ranks on the node; torch.cuda.mem_get_info for a GPU).
"""
from dataclasses import dataclass

import numpy
import torch
from mpi4py import MPI

from .._distributed.collective import CAUSE, raise_collectively
from ..errors import SolverError

DEFAULT_FRACTION = 0.5
# What a stored object costs beyond its data, measured with glibc's mallinfo2 (PETSc 3.26,
# torch 2.13, CPU): a Vec in PETSc's memory trajectory (VEC_OVERHEAD, device.py), and each
# tensor or autograd node of a stored graph of f. For small states they are most of what a
# step holds: a 3x2 state's rk4 step with its stage graphs holds 25 KB, 30 times its data.
GRAPH_OBJECT_OVERHEAD = 400


@dataclass(frozen=True)
class Sizes:
    """One problem's measured sizes (bytes) and default budgets (bytes), agreed by all ranks."""
    state: int                   # one state, largest shard, solver precision
    graph: int                   # one stored stage graph of f (0: f keeps no graph)
    host_free: int               # DEFAULT_FRACTION of the free host memory per rank
    device_free: int             # DEFAULT_FRACTION of the free GPU memory (0 without a GPU)


def available_host_bytes():
    """MemAvailable of /proc/meminfo: what can be allocated without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def graph_bytes(func, params, t, y):
    """Bytes one evaluation func(t, y) with a graph keeps alive: the tensors autograd saves for
    the backward (storages counted once; the parameters and y excluded: they exist anyway,
    and a stored graph's input is the stage its trajectory keeps; of the output only the
    autograd edge is kept, unless the graph saved it), plus GRAPH_OBJECT_OVERHEAD for each
    saved tensor, autograd node and the input."""
    excluded = {p.untyped_storage().data_ptr() for p in params}
    found = {}

    saved = []

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved.append(1)
        if storage.data_ptr() not in excluded:
            found[storage.data_ptr()] = storage.nbytes()
        return tensor

    y = y.detach().clone().requires_grad_(True)
    excluded.add(y.untyped_storage().data_ptr())
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = func(torch.full((), t, dtype=y.dtype, device=y.device), y)
    if not isinstance(out, torch.Tensor) or out.shape != y.shape or not out.requires_grad:
        return 0                     # keeps no graph (a wrong output is the solve's to report)
    objects = len(saved) + _nodes(out.grad_fn) + 1
    return sum(found.values()) + objects * GRAPH_OBJECT_OVERHEAD


def _nodes(root):
    """The autograd nodes a graph reaches from `root`."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def measure(layout, state_bytes, func, params, t, y):
    """The agreed Sizes of a problem (collective over the layout's communicator: one
    evaluation of func, which may itself communicate, and one allreduce)."""
    comm = layout.comm.tompi4py()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    on_node = node.Get_size()
    node.Free()
    graph, error, cause = 0, None, None
    if func is not None:
        try:
            graph = graph_bytes(func, params, t, y)
        except Exception as exc:  # noqa: BLE001 - raised on every rank
            error = (CAUSE, f"func raised {type(exc).__name__} when evaluated at t={t:g} to "
                     f"measure the memory its graph takes: {exc}")
            cause = exc
    raise_collectively(layout.comm, error, SolverError, cause=cause)
    host = int(DEFAULT_FRACTION * available_host_bytes() / on_node)
    device = 0
    if layout.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(layout.device)
        sharing = -(-on_node // max(1, torch.cuda.device_count()))
        device = int(DEFAULT_FRACTION * free / sharing)
    # One allreduce: the largest sizes and the smallest budgets (negated) by MAX.
    agreed = numpy.array([state_bytes, graph, -host, -device], dtype=numpy.int64)
    comm.Allreduce(MPI.IN_PLACE, agreed, op=MPI.MAX)
    return Sizes(state=int(agreed[0]), graph=int(agreed[1]), host_free=int(-agreed[2]),
                 device_free=int(-agreed[3]))
