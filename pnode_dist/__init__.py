"""pnode_dist: distributed, reverse-accurate neural ODEs on PETSc TS.

    from pnode_dist import odeint            # instead of: from torchdiffeq import odeint
    ys = odeint(func, y0, t, method="rk4", options={"step_size": 0.1})
"""
from .api import ODEBlock, odeint, odeint_adjoint, odeint_event
from .checkpointing import Checkpointing
from .errors import FileFormatError, InputError, PnodeError, SolverError
from .grid import Grid
from .methods import IMEX, METHODS
from .parallel import allreduce_gradients, broadcast_parameters, rank_device

__version__ = "0.1.0"
__all__ = ["odeint", "odeint_adjoint", "odeint_event", "ODEBlock", "IMEX", "Checkpointing", "Grid", "METHODS",
           "PnodeError", "InputError", "SolverError", "FileFormatError", "rank_device",
           "allreduce_gradients", "broadcast_parameters", "__version__"]
