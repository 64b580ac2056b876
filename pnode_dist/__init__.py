"""pnode_dist: distributed, reverse-accurate neural ODEs on PETSc TS.

    from pnode_dist import odeint            # instead of: from torchdiffeq import odeint
    ys = odeint(func, y0, t, method="rk4", options={"step_size": 0.1})

The solver's names are imported at their first use (``from pnode_dist import odeint``,
``pnode_dist.ODEBlock``, ``import pnode_dist.parallel``): that is when PETSc and MPI start. A
bare ``import pnode_dist`` and the modules that only read files (``pnode_dist.inspect``, the
``pnode-inspect`` command) start neither, so they also run in a child process of an MPI rank.
"""
from .errors import FileFormatError, InputError, PnodeError, SolverError

__version__ = "0.1.0"
__all__ = ["odeint", "odeint_adjoint", "odeint_event", "ODEBlock", "IMEX", "Checkpointing", "Grid", "METHODS",
           "PnodeError", "InputError", "SolverError", "FileFormatError", "rank_device",
           "allreduce_gradients", "broadcast_parameters", "__version__"]

_SOLVER = {"odeint": "api", "odeint_adjoint": "api", "odeint_event": "api", "ODEBlock": "api",
           "Checkpointing": "checkpointing", "Grid": "grid", "IMEX": "methods",
           "METHODS": "methods", "allreduce_gradients": "parallel",
           "broadcast_parameters": "parallel", "rank_device": "parallel"}


def __getattr__(name):
    """A solver name, imported (and PETSc and MPI started) at its first use."""
    if name not in _SOLVER:
        raise AttributeError(f"module 'pnode_dist' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_SOLVER[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_SOLVER))
