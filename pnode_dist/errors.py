"""Exceptions raised by pnode_dist.

All derive from :class:`PnodeError`. Inside odeint and the training-state functions every one is
raised on every rank of the communicator, so a script that catches one on one rank catches it on
all and no rank is left waiting in a collective call.
"""


class PnodeError(RuntimeError):
    """Base class of pnode_dist's errors.

    Catch it to handle any error pnode_dist raises (:class:`InputError`, :class:`SolverError`,
    :class:`FileFormatError`, ``pnode_dist.training.state.SaveError``).
    """


class InputError(PnodeError, ValueError):
    """A bad argument to odeint/ODEBlock; the message says how to fix it.

    Raised on every rank when any rank finds a bad argument (a wrong shape, dtype or device,
    an unknown method or option, a torchdiffeq option that has no counterpart here, a
    ``Checkpointing`` or ``Grid`` that cannot work), when the ranks are at different points of
    the program (``torch.no_grad()`` on one rank only, a backward pass skipped or run on one
    rank only), and for what a solve refuses by design (a second derivative through an implicit
    method, through a solve split over several ranks or a grid, or through an event time). A
    bad ``PNODE_PRECISION`` is one at import. It is also a ``ValueError``.

    Notes
    -----
    What to do: change the argument or the call as the message says; nothing has been solved.
    """


class SolverError(PnodeError):
    """The time integration failed (non-finite state, too many steps, step rejections...).

    Raised on every rank when a solve or its backward pass fails on any rank: the solution
    blew up (NaN or Inf), ``options['max_num_steps']`` was reached, Newton's method failed (the
    message names the step, the time, PETSc's reason and the residual norm), ``func``, a step
    callback or ``event_fn`` raised (the error is chained to your exception on the rank where it
    happened), a checkpoint file changed on disk between the forward and the backward pass or
    the checkpoint disk is full, or an event time has no derivative (a tangential crossing).
    The message holds each failing rank's reason, the root cause first, and names where a
    non-finite value first appeared (func, a vector-Jacobian or Jacobian-vector product of it;
    the forward solve, a re-run of recorded steps or the adjoint solve; the time).

    Notes
    -----
    What to do: for a blow-up, use smaller steps (``step_size`` or ``rtol``/``atol``) or rescale
    the problem; for a stiff problem, an implicit method (``kencarp4``, ``kvaerno5``,
    ``cn``...); raise ``options['max_num_steps']`` if the solve needs more steps; fix ``func``
    where it raised; free disk space or choose another ``Checkpointing(disk_dir=...)``. The
    solver stays usable: a solve that failed is never reused, and the same call can be made
    again.
    """


class FileFormatError(PnodeError):
    """A file that is missing, unreadable, truncated or not written by pnode_dist.

    Raised by ``pnode_dist.training.state.load`` (on every rank: a missing, damaged or foreign
    file, or one saved with other ranks or another model) and by ``pnode_dist.inspect.describe``
    (``pnode-inspect``, which prints its message and exits with status 1).

    Notes
    -----
    What to do: check the path, or resume from another state:
    ``pnode_dist.training.state.latest_valid`` finds the newest one that verifies.
    """
