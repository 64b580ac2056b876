"""What training scripts need for running on several ranks: ``MPI`` (mpi4py) and ``PETSc``
(petsc4py) as pnode_dist started them, ``PRECISION`` (``'double'`` or ``'single'``: the
precision of PETSc's build), this rank's device (:func:`rank_device`), and the gradient and
parameter helpers for the layers outside an ODE block (:func:`allreduce_gradients`,
:func:`broadcast_parameters`)."""
from ._distributed.collective import allreduce_gradients, broadcast_parameters
from ._distributed.startup import MPI, PETSc, PRECISION
from ._solve.device import rank_device

__all__ = ["MPI", "PETSc", "PRECISION", "rank_device", "allreduce_gradients",
           "broadcast_parameters"]
