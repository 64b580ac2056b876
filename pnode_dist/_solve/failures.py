"""What a failed solve says: PETSc's names of its reasons, the message for a PETSc error in a
solve (naming the Python exception behind it), and why a forward solve stopped before its last
output time."""
from .._distributed.collective import CAUSE, CONSEQUENCE, PETSc


def reason_name(enum, value):
    """PETSc's name of a converged/diverged reason, e.g. DIVERGED_MAX_IT."""
    names = [k for k in dir(enum) if k.isupper() and getattr(enum, k) == value]
    return names[0] if names else f"reason {value}"


def petsc_failure(ts, exc, what, hint=""):
    """(severity, message) for a PETSc error in `what`; the Python exception behind it,
    if any, is named as the cause (KeyboardInterrupt and SystemExit are re-raised)."""
    cause, t = exc.__cause__, ts.getTime()
    if cause is not None and not isinstance(cause, Exception):
        raise cause from None
    if cause is not None:
        return (CAUSE, f"{type(cause).__name__} in a callback of {what} at t={t:g}: {cause}")
    return (CONSEQUENCE, f"PETSc stopped {what} at t={t:g} with error code {exc.ierr} {hint}")


def incomplete(ts, stepping, reason, event_solve, implicit):
    """Why a solve (of the TS `ts`, an event solve or not, implicit or not) stopped before
    the last output time."""
    t = stepping.record.times[-1]
    if reason == PETSc.TS.ConvergedReason.CONVERGED_ITS and event_solve:
        return (f"no event by t={t:g}: event_fn did not reach zero within max_num_steps="
                f"{stepping.control.max_num_steps} steps (raise options['max_num_steps'] "
                "if it does later)")
    if reason == PETSc.TS.ConvergedReason.CONVERGED_ITS:
        return (f"reached max_num_steps={stepping.control.max_num_steps} at t={t:g} before "
                f"t={stepping.t_out[-1]:g}: raise options['max_num_steps'] or loosen rtol/atol")
    if reason == PETSc.TS.ConvergedReason.DIVERGED_NONLINEAR_SOLVE:
        snes = ts.getSNES()
        return (f"Newton's method failed in step {len(stepping.record.times)} from t={t:g} "
                f"(step size {ts.getTimeStep():g}): "
                f"{reason_name(PETSc.SNES.ConvergedReason, snes.getConvergedReason())}"
                f", residual norm {snes.getFunctionNorm():.3e}"
                f" after {snes.getIterationNumber()} iterations; try a smaller step, "
                "linear_solver='exact', or looser -snes_rtol/-snes_atol")
    newton = ""
    if implicit and ts.getSNES().getConvergedReason() < 0:
        snes = ts.getSNES()
        norm = snes.getFunctionNorm()
        newton = (f"; the last attempt's Newton solve failed ("
                  f"{reason_name(PETSc.SNES.ConvergedReason, snes.getConvergedReason())}"
                  + (f", residual norm {norm:.3e}" if norm > 0 else "")
                  + f"; {ts.getSNESFailures()} Newton failures in this solve)")
    return (f"the time integration failed at t={t:g} "
            f"({reason_name(PETSc.TS.ConvergedReason, reason)}): "
            f"the step was rejected too often{newton}; try a smaller first_step, looser "
            "rtol/atol, or check f for blow-up")
