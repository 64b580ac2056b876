"""How a torch tensor maps onto a PETSc Vec.

BatchLayout: each rank holds its own shard of the batch (leading dimension, shards may be
uneven); the global Vec is the concatenation of the shards in rank order. GridLayout (grid.py):
a field on a DMDA-distributed grid. Both offer the Layout interface below.
"""
import math

import torch

from .._solve.device import new_vec


class Layout:
    """What the solver needs of a layout: local and global sizes, a state Vec, the parameter
    Vec (every rank its own copy), the sizes of the Jacobian Mats, the communicator over
    which parameter gradients are summed (the solve's own by default), and the torch device
    where the Vecs live (host Vecs, or CUDA Vecs for a state on a GPU)."""
    evaluates_collectively = False   # an evaluation of f communicates (halo exchanges)

    def __init__(self, comm, local_shape, gradient_comm=None, device=None):
        self.comm = comm
        self.device = torch.device(device or "cpu")
        self.gradient_comm = gradient_comm or comm
        self.local_shape = tuple(local_shape)
        self.local_size = math.prod(self.local_shape)
        self.rank, self.nranks = comm.getRank(), comm.getSize()

    def create_param_vec(self, nparams):
        """A Vec with `nparams` entries on *every* rank: each rank accumulates its own
        parameter vjps there during the adjoint, then one allreduce sums them."""
        return new_vec(self.comm, nparams, nparams * self.nranks, self.device)

    def state_mat_sizes(self):
        n, N = self.local_size, self.global_size
        return ((n, N), (n, N))

    def param_mat_sizes(self, nparams):
        return ((self.local_size, self.global_size), (nparams, nparams * self.nranks))


class BatchLayout(Layout):
    """Leading (batch) dimension split over the ranks of `comm`; other dimensions whole."""

    def __init__(self, comm, local_shape, all_local_shapes=None, device=None):
        """`all_local_shapes`: every rank's shard shape in rank order (gathered by the caller,
        which has already checked that they differ only in the leading dimension)."""
        super().__init__(comm, local_shape, device=device)
        shapes = all_local_shapes or [self.local_shape]
        if len(shapes) != self.nranks or tuple(shapes[self.rank]) != self.local_shape:
            raise ValueError("all_local_shapes must list every rank's shard shape")
        self.all_local_shapes = tuple(tuple(s) for s in shapes)
        self.global_size = sum(math.prod(s) for s in shapes)
        self.global_shape = (sum(s[0] for s in shapes),) + self.local_shape[1:]

    @property
    def key(self):
        """What identifies this layout for reuse of solver objects."""
        return ("batch", self.comm.tompi4py().py2f(), self.all_local_shapes, str(self.device))

    def create_state_vec(self):
        """A Vec holding this rank's shard, flattened in C order."""
        return new_vec(self.comm, self.local_size, self.global_size, self.device)
