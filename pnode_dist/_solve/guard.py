"""One rule for every callback PETSc makes into Python (f and its derivatives, the Jacobian
Mats, the exact-Newton preconditioner, the step observers): an exception never unwinds through
PETSc on one rank alone. It is recorded (the first one) on the callbacks' Recorder, the callback
fills its output so that PETSc can go on or stop, and after the solve the Integrator raises it
on every rank (parallel.raise_collectively), chained to the exception itself.

    with guarded(recorder, lambda: f"func during the forward solve at t={t:g}") as call:
        out.copy_(f(t, y))
    if call.failed:
        out.zero_()

KeyboardInterrupt and SystemExit are not recorded: they propagate (through PETSc, whose error
the Integrator turns back into them).
"""
import inspect
import os

_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class Recorder:
    """The first error of a group of callbacks (message and exception), and where f or one of
    its derivatives first gave NaN/Inf (a note: the cause of what PETSc reports next)."""

    def __init__(self):
        self.error = None
        self.exception = None
        self.nonfinite = None

    def record(self, exc, where):
        """Keep the first exception, described as '<type> in <where>: <message>'."""
        if self.error is None:
            self.error = f"{type(exc).__name__} in {where}: {exc}"
            self.exception = exc

    def clear(self):
        self.error = self.exception = self.nonfinite = None


class guarded:
    """Context manager running one callback body: an Exception inside is recorded on
    `recorder` and suppressed, and `failed` becomes True. `where` is a string or a function
    giving one (formatted only on failure)."""

    def __init__(self, recorder, where):
        self.recorder, self.where = recorder, where
        self.failed = False

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, Exception):
            return False
        self.failed = True
        self.recorder.record(exc, self.where() if callable(self.where) else self.where)
        return True


def released(exc):
    """`exc` with the locals of pnode_dist's own finished frames in its traceback cleared, to be
    raised (chained) after the solve. A callback's frame holds petsc4py wrappers of the TS and
    its Vecs, each a PETSc reference: kept by the exception, they would keep a destroyed TS
    alive, and through its callbacks its Integrator, for as long as the exception lives (a
    training loop that catches SolverError would lose the whole trajectory's memory each time).
    The callers of those frames go too: a finished frame keeps its caller (f_back), such as a
    Jacobian Mat's product holding the Mat and both Vecs. The user's own frames keep their
    locals (post-mortem debugging)."""
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        frame = tb.tb_frame
        while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
            # A generator's frame is left alone: clearing a suspended one would close it.
            if not frame.f_code.co_flags & _SUSPENDABLE:
                try:
                    frame.clear()
                except RuntimeError:         # still executing: nothing to release yet
                    pass
            frame = frame.f_back
        tb = tb.tb_next
    return exc
