"""Stop cleanly before a batch system's time limit: :class:`StopSignals` catches
SIGTERM/SIGUSR1 and lets every rank agree on the iteration at which to save the training state
and exit with :data:`REQUEUE_EXIT_CODE`, on which the job scripts requeue.
"""
import signal

from .._distributed.collective import MPI

#: The signals :class:`StopSignals` catches by default.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: The exit status after a stop (75, EX_TEMPFAIL from sysexits.h: "try again later"). The job
#: scripts requeue on this status.
REQUEUE_EXIT_CODE = 75


class StopSignals:
    """Context manager: while active, SIGTERM/SIGUSR1 set a flag instead of killing the process.

    On exit the previous signal handlers are restored. :meth:`requested` makes every rank see
    the flag after the same iteration.

    Parameters
    ----------
    signals : iterable of signal.Signals, optional
        The signals to catch (default :data:`STOP_SIGNALS`: SIGTERM and SIGUSR1).

    Attributes
    ----------
    received : str or None
        The name of the last signal this rank received (``'SIGTERM'``...), or None.

    Notes
    -----
    SLURM sends SIGTERM at the time limit (then SIGKILL after KillWait) and, with
    ``#SBATCH --signal=USR1@<seconds>``, SIGUSR1 ahead of it; srun and MPICH's mpiexec forward
    both to every rank. A signal may reach the ranks at different moments: the one-integer
    allreduce in :meth:`requested` makes them stop after the same iteration.

    Examples
    --------
    ::

        with StopSignals() as stop:
            for it in ...:
                train_one_iteration()
                if stop.requested(comm):          # collective: call it on every rank
                    save_state(); sys.exit(REQUEUE_EXIT_CODE)
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __enter__(self):
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False

    def requested(self, comm):
        """True on every rank once any rank has received a stop signal (collective).

        Parameters
        ----------
        comm : mpi4py communicator
            The ranks that stop together; call it on every one of them, at the same point of
            every iteration (one small allreduce).

        Returns
        -------
        bool
            The same value on every rank.
        """
        return bool(comm.allreduce(int(self.received is not None), op=MPI.MAX))
