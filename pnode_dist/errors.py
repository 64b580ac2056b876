"""Exceptions raised by pnode_dist. Every one is raised on every rank of the communicator."""


class PnodeError(RuntimeError):
    """Base class of pnode_dist's errors."""


class InputError(PnodeError, ValueError):
    """A bad argument to odeint/ODEBlock; the message says how to fix it."""


class SolverError(PnodeError):
    """The time integration failed (non-finite state, too many steps, step rejections...)."""
