"""What training scripts need for running on several ranks: mpi4py's MPI and petsc4py's PETSc
as pnode_dist started them, the precision of PETSc's build, this rank's device, and the
gradient and parameter helpers for the layers outside an ODE block."""
from ._distributed.collective import allreduce_gradients, broadcast_parameters
from ._distributed.startup import MPI, PETSc, PRECISION
from ._solve.device import rank_device

__all__ = ["MPI", "PETSc", "PRECISION", "rank_device", "allreduce_gradients",
           "broadcast_parameters"]
