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
