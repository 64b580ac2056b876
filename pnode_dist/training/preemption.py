"""Stop cleanly before a batch system's time limit: catch SIGTERM/SIGUSR1 and let every rank
agree on the iteration at which to save the training state and exit.

    with StopSignals() as stop:
        for it in ...:
            train_one_iteration()
            if stop.requested(comm):          # collective: call it on every rank
                save_state(); sys.exit(REQUEUE_EXIT_CODE)

SLURM sends SIGTERM at the time limit (then SIGKILL after KillWait) and, with
`#SBATCH --signal=USR1@<seconds>`, SIGUSR1 ahead of it; srun and MPICH's mpiexec forward both
to every rank. A signal may reach the ranks at different moments: the one-integer allreduce in
`requested` makes them stop after the same iteration.
"""
import signal

from .._distributed.collective import MPI

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# EX_TEMPFAIL from sysexits.h: "try again later". The job scripts requeue on this status.
REQUEUE_EXIT_CODE = 75


class StopSignals:
    """Context manager: while active, SIGTERM/SIGUSR1 set a flag instead of killing the process."""

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
        """True on every rank once any rank has received a stop signal (collective)."""
        return bool(comm.allreduce(int(self.received is not None), op=MPI.MAX))
