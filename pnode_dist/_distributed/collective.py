"""Communicators and collective error handling: an error on one rank is raised on every rank,
ranks at different points of the program meet in one check instead of a deadlock, and an
exception that escapes on one rank ends the job. Also the gradient allreduce and parameter
broadcast helpers. (PETSc start-up: startup.py.)
"""
import atexit
import os
import signal
import sys
import threading
import time
import traceback

from ..errors import InputError
from .startup import MPI, PETSc, PRECISION

__all__ = ["PETSc", "MPI", "PRECISION", "resolve_comm", "raise_collectively",
           "allreduce_gradients", "broadcast_parameters", "world", "allreduce_sum",
           "check_phase", "next_call", "CAUSE", "SYMPTOM", "CONSEQUENCE"]


def world():
    """PETSc's world communicator (all ranks of the job)."""
    return PETSc.COMM_WORLD


def resolve_comm(comm):
    """Turn None / 'world' / 'self' / an mpi4py or petsc4py communicator into a PETSc.Comm."""
    if comm is None or (isinstance(comm, str) and comm == "world"):
        return PETSc.COMM_WORLD
    if isinstance(comm, str) and comm == "self":
        return PETSc.COMM_SELF
    if isinstance(comm, PETSc.Comm):
        return comm
    if isinstance(comm, MPI.Comm):
        return PETSc.Comm(comm)
    raise InputError(f"comm must be None, 'world', 'self', an mpi4py or a petsc4py communicator; "
                     f"got {type(comm).__name__}")


# Kinds of failure, most fundamental first: a collective error names the root cause first
# (an exception in func on rank 1 comes before the Newton failure it causes on rank 0).
CAUSE, SYMPTOM, CONSEQUENCE = 0, 1, 2


def raise_collectively(comm, error, exc_type=InputError, same=None, share=None, cause=None):
    """Collective: if `error` is set on any rank, raise on every rank.

    `error`: None, a message, or (severity, message) with severity CAUSE (an exception in the
    user's code), SYMPTOM (non-finite values, a damaged file) or CONSEQUENCE (a solver failure
    that follows from another); a plain message counts as CAUSE.
    `same`: a dict of named values (output times, method...) that must be equal on every rank;
    a difference is an error too. `share`: a value gathered from every rank and returned (a list
    in rank order). `cause`: this rank's exception behind its error (the user's own, from func):
    the error raised on this rank is chained to it (`raise ... from cause`), so its type,
    message and traceback show.
    One allgather in all; none on a single rank. The message holds every failing rank's own
    message, the root cause first, so that no rank goes on into a collective PETSc call while
    another has stopped (a hang) and no rank's reason is lost.
    """
    mpi = comm.tompi4py()
    if mpi.Get_size() == 1:
        if error is not None:
            raise _collective(exc_type(_text(error))) from cause
        return [share]
    gathered = mpi.allgather((error, same, share))
    errors = [e for e, _, _ in gathered]
    if all(e is None for e in errors):
        errors = _disagreements([s for _, s, _ in gathered])
    bad = [r for r, e in enumerate(errors) if e is not None]
    if not bad:
        return [s for _, _, s in gathered]
    raise _collective(exc_type(_combined(errors, bad))) from (cause if error is not None
                                                              else None)


def _severity(error):
    return error[0] if isinstance(error, tuple) else CAUSE


def _text(error):
    return error[1] if isinstance(error, tuple) else error


def _combined(errors, bad):
    """One message from the failing ranks': root cause first, each distinct one once."""
    order = sorted(bad, key=lambda r: (_severity(errors[r]), r))
    texts = {}
    for r in order:
        texts.setdefault(_text(errors[r]), []).append(r)

    def where(ranks):
        return f"rank{'s' if len(ranks) > 1 else ''} " + ", ".join(map(str, ranks))
    parts = [f"{text} (raised on {where(ranks)})" for text, ranks in texts.items()]
    if len(parts) == 1:
        return parts[0]
    return parts[0] + "; also: " + "; ".join(parts[1:])


def _collective(exc):
    """Mark an exception as raised on every rank alike (see abort_on_uncaught)."""
    exc.collective = True
    return exc


def _disagreements(sames):
    """Per rank: a message if its `same` dict differs from rank 0's, else None. A 'phase'
    (where the rank is in the program) that differs is reported before any argument."""
    errors = [None] * len(sames)
    phased = any("phase" in (same or {}) for same in sames)
    for r, same in enumerate(sames):
        if phased and (same or {}).get("phase") != (sames[0] or {}).get("phase"):
            phases = "; ".join(f"rank {q}: {(s or {}).get('phase', 'elsewhere')}"
                               for q, s in enumerate(sames))
            errors[r] = (f"the ranks are at different points of the program ({phases}): every "
                         "rank must make the same odeint calls and backward passes, in the same "
                         "order and the same grad mode (torch.no_grad() on every rank or none)")
            continue
        for key, value in (same or {}).items():
            ref = (sames[0] or {}).get(key)
            if value != ref:
                errors[r] = (f"{key} differs between ranks ({value!r} on rank {r}, {ref!r} on rank "
                             "0): every rank must pass the same t, method, options, tolerances "
                             "and PETSc options, and shards of y0 may differ only in the leading "
                             "(batch) dimension")
                break
    return errors


_phase_counts = {}


def next_call(comm):
    """The number of this odeint call on `comm` (1, 2, ...): every rank counts its calls, and
    the forward and backward passes compare their phase (see check_phase)."""
    key = comm.tompi4py().py2f()
    _phase_counts[key] = _phase_counts.get(key, 0) + 1
    return _phase_counts[key]


def check_phase(comm, phase, error=None, exc_type=InputError):
    """Collective: raise on every rank unless all ranks are at the same `phase` (a string such
    as 'backward of odeint call 3') and none has an `error`. One allgather; none on a single
    rank."""
    raise_collectively(comm, error, exc_type, same={"phase": phase})


def abort_on_uncaught(exc_type, exc, tb):
    """sys.excepthook under mpiexec (more than one rank): print the traceback, then end the
    whole job with MPI_Abort. A rank that dies alone would otherwise hang at exit (PETSc's
    finalisation is collective) while the others wait in their next collective for ever.
    Errors pnode_dist raised on every rank alike end the ranks normally."""
    if getattr(exc, "collective", False):
        _previous_excepthook(exc_type, exc, tb)
        return
    if issubclass(exc_type, KeyboardInterrupt):     # Ctrl-C or SIGINT: no traceback
        _end_job("was interrupted (KeyboardInterrupt: SIGINT or Ctrl-C)", 128 + signal.SIGINT)
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    _abort(f"{''.join(traceback.format_exception(exc_type, exc, tb))}"
           f"pnode_dist: uncaught {exc_type.__name__} on rank {rank} of {size} ({exc}); "
           "aborting the MPI job so that the other ranks do not wait for ever "
           "(PNODE_ABORT_ON_ERROR=0 turns this off)\n")


def _end_on_signal(signum, frame=None):
    """SIGTERM or SIGHUP ends the process with one line naming it, instead of PETSc's crash
    banner: one process exits (SystemExit, so that its files are cleaned up); under mpiexec the
    whole job ends, not a rank alone. Installed only where the signal had its default action;
    the apps' StopSignals replace it while they train."""
    name = signal.Signals(signum).name
    if MPI.COMM_WORLD.Get_size() == 1:
        os.write(2, f"pnode_dist: received {name}; exiting\n".encode())
        raise SystemExit(128 + signum)
    _end_job(f"received {name}", 128 + signum)


def _end_job(what, code):
    _abort(f"pnode_dist: rank {MPI.COMM_WORLD.Get_rank()} of {MPI.COMM_WORLD.Get_size()} {what}; "
           "ending the MPI job\n", code)


def _abort(message, code=1):
    """Write `message` to stderr in one piece, give the launcher a moment to pass it on (it
    stops forwarding output once it tears the job down), then MPI_Abort with status `code`."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not stop the abort
            pass
    try:
        os.write(2, message.encode(errors="replace"))
    except OSError:
        pass
    time.sleep(0.5)
    MPI.COMM_WORLD.Abort(code)


def _exit_check():
    """At interpreter exit, before PETSc finalizes: a rank that leaves while another still
    waits in an odeint call or backward pass ends the job with the reason, instead of both
    waiting for ever."""
    if MPI.Is_finalized() or MPI.COMM_WORLD.Get_size() == 1:
        return
    try:
        check_phase(PETSc.COMM_WORLD, "exiting")
    except InputError as exc:
        _abort(f"pnode_dist: rank {MPI.COMM_WORLD.Get_rank()} is exiting while another rank "
               f"is not: {exc}\n")


_previous_excepthook = sys.excepthook
if MPI.COMM_WORLD.Get_size() > 1 and os.environ.get("PNODE_ABORT_ON_ERROR", "1") != "0":
    sys.excepthook = abort_on_uncaught
    atexit.register(_exit_check)
for _signum in (signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(_signum) in (signal.SIG_DFL, None) and \
            threading.current_thread() is threading.main_thread():
        signal.signal(_signum, _end_on_signal)        # replaces PETSc's handler (a crash banner)


def _mpi(comm):
    return resolve_comm(comm).tompi4py()


def gpu_aware_mpi():
    """Whether MPI takes GPU buffers: PNODE_GPU_AWARE_MPI=1/0 if set, else what MPI reports
    (MPIX_Query_cuda_support, where the MPI library has it)."""
    forced = os.environ.get("PNODE_GPU_AWARE_MPI")
    if forced in ("0", "1"):
        return forced == "1"
    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except MPI.Exception:
        return False


def allreduce_sum(tensor, mpi):
    """Sum a contiguous tensor over the ranks of the mpi4py communicator `mpi`, in place. A GPU
    tensor goes to MPI directly with GPU-aware MPI, else through one host copy."""
    if mpi.Get_size() == 1:
        return tensor
    if tensor.device.type == "cpu":
        mpi.Allreduce(MPI.IN_PLACE, tensor.numpy(), op=MPI.SUM)
    elif gpu_aware_mpi():
        import torch
        torch.cuda.current_stream(tensor.device).synchronize()   # MPI reads the memory now
        mpi.Allreduce(MPI.IN_PLACE, tensor, op=MPI.SUM)
    else:
        host = tensor.cpu()
        mpi.Allreduce(MPI.IN_PLACE, host.numpy(), op=MPI.SUM)
        tensor.copy_(host)
    return tensor


def allreduce_gradients(parameters, comm=None, average=False):
    """Sum (or average) the ``.grad`` of ``parameters`` over the ranks, in one allreduce.

    Use it for the parameters *outside* an ODE block (stem, head) in data-parallel training;
    the ODE block's own parameters are already reduced by its backward pass. A parameter
    with a gradient on some ranks only (a tensor an event function uses reaches only the rank
    whose event stopped the solve) counts as zero on the others and gets one everywhere.
    Collective: call it on every rank of ``comm``, after the backward pass.

    Parameters
    ----------
    parameters : iterable of Tensor
        The same tensors, in the same order, on every rank (``head.parameters()``).
    comm : optional
        None (PETSc's world), ``'world'``, ``'self'``, or an mpi4py or petsc4py communicator.
    average : bool, optional
        Divide the sum by the number of ranks.

    Raises
    ------
    InputError
        For a ``comm`` that is not a communicator, and on every rank when the ranks are at
        different points of the program (a rank whose loss did not use a solve's outputs calls
        it while another is still in that solve's backward pass).

    Notes
    -----
    The gradients are summed in float64 and copied back into each ``.grad``. GPU tensors go to
    MPI directly when MPI is GPU-aware (``MPIX_Query_cuda_support``, or forced with
    ``PNODE_GPU_AWARE_MPI=1``/``0``), else through one host copy.

    Examples
    --------
    ::

        loss.backward()                       # the ODE block's gradients are summed already
        allreduce_gradients(list(stem.parameters()) + list(head.parameters()))
        optimizer.step()
    """
    import torch
    comm = resolve_comm(comm)
    mpi = comm.tompi4py()
    parameters = list(parameters)
    if mpi.Get_size() == 1:
        return
    # A phase check too: a rank still in a backward pass (its loss used a solve's outputs, this
    # rank's did not) meets this one in an InputError, not in a mismatched collective.
    held = raise_collectively(comm, None, same={"phase": "allreduce_gradients"},
                              share=[p.grad is not None for p in parameters])
    params = [p for i, p in enumerate(parameters) if any(h[i] for h in held)]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.detach().reshape(-1).to(torch.float64) for p in params])
    allreduce_sum(flat, mpi)
    if average:
        flat /= mpi.Get_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def broadcast_parameters(module, comm=None, root=0):
    """Copy rank ``root``'s parameters and buffers to every rank (identical replicas).

    Call it once at the start of training, on every rank (collective), so that every rank
    starts from the same weights.

    Parameters
    ----------
    module : nn.Module
        The model; its parameters and buffers are overwritten in place (through a host copy).
    comm : optional
        None (PETSc's world), ``'world'``, ``'self'``, or an mpi4py or petsc4py communicator.
    root : int, optional
        The rank whose values are copied.

    Raises
    ------
    InputError
        For a ``comm`` that is not a communicator.
    """
    import torch
    mpi = _mpi(comm)
    if mpi.Get_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            buf = tensor.detach().cpu().contiguous().numpy().copy()
            mpi.Bcast(buf, root=root)
            tensor.copy_(torch.from_numpy(buf))
