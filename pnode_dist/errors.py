"""Exceptions raised by pnode_dist. Inside odeint and the training-state functions every one is
raised on every rank of the communicator."""


class PnodeError(RuntimeError):
    """Base class of pnode_dist's errors."""


class InputError(PnodeError, ValueError):
    """A bad argument to odeint/ODEBlock; the message says how to fix it."""


class SolverError(PnodeError):
    """The time integration failed (non-finite state, too many steps, step rejections...)."""


class FileFormatError(PnodeError):
    """A file that is missing, unreadable, truncated or not written by pnode_dist."""
