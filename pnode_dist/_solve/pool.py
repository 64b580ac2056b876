"""The Integrators of one problem configuration, pooled between calls, and the problem's
history (the last solve's step count, checkpoint file tags)."""
import uuid

from .integrator import Integrator, capacity_for
from .stepping import fixed_steps

# An idle Integrator stays pooled while what it holds (work Vecs, trajectory) is at most this:
# re-creating one costs about 3 ms, more than a small solve; a larger one is freed at once.
KEEP_IDLE_BYTES = 1 << 20


class ProblemHistory:
    """What successive solves of one problem share: the last solve's step count (checkpoint
    placement for adaptive steps), a solve counter and a tag for checkpoint file names."""

    def __init__(self, comm):
        self.comm = comm
        self.last_steps = None
        self.solves = 0
        self._file_tag = None

    def solved(self, steps):
        self.last_steps = steps

    def expected_steps(self, adaptive, t_out, control):
        """Steps the coming solve should take: exact for fixed steps, the last solve's count
        for adaptive ones (None before the first)."""
        if adaptive:
            return self.last_steps
        return fixed_steps(t_out, control.step_size)

    def next_file(self):
        """(tag shared by all ranks, number of this solve) for a checkpoint file name
        (collective on first use: rank 0's random tag, broadcast)."""
        if self._file_tag is None:
            self._file_tag = self.comm.tompi4py().bcast(uuid.uuid4().hex[:12], root=0)
        self.solves += 1
        return self._file_tag, self.solves


class IntegratorPool:
    """A pool of Integrators for one problem configuration (several forward passes may await
    their backward at once), and the problem's history."""

    def __init__(self, layout, method, func, params, dtype, prefix, petsc_options, adaptive,
                 setup):
        self.args = (layout, method, func, params, dtype, prefix, petsc_options)
        self.layout, self.method, self.prefix, self.dtype = layout, method, prefix, dtype
        self.adaptive = adaptive
        self.setup = setup
        self._idle = {}
        self.closed = False
        self.history = ProblemHistory(layout.comm)
        self.sizes = None            # the problem's measured Sizes (set by checkpointing)

    def acquire(self, adjoint, adaptive=None, nsteps=0):
        """An idle Integrator (trajectory or not; adaptive steps or replayed ones) whose
        trajectory holds `nsteps` steps (pooled ones that are too small are destroyed)."""
        adaptive = self.adaptive if adaptive is None else adaptive
        pool = self._idle.setdefault((adjoint, adaptive), [])
        integrator = None
        while pool and integrator is None:
            integrator = pool.pop()
            if integrator.capacity is not None and integrator.capacity < nsteps:
                integrator.destroy()
                integrator = None
        if integrator is None:
            integrator = Integrator(*self.args, adaptive=adaptive, adjoint=adjoint,
                                    setup=self.setup)
        integrator.reserve(capacity_for(nsteps))
        return integrator

    def release(self, integrator):
        """Back to the pool if it is small (KEEP_IDLE_BYTES, by a size every rank computes
        alike, so that the pools stay alike); one whose last solve failed, a
        large one, or any after the pool closed, is destroyed. (A TSTHETA one whose trajectory
        re-ran segments stays pooled whatever its size: Integrator.destroy would keep it alive
        for good.)"""
        kept_anyway = integrator.replayed and integrator.method.keep_after_replay
        if self.closed or not integrator.healthy or (
                integrator.held_bytes(agreed=True) > KEEP_IDLE_BYTES and not kept_anyway):
            integrator.destroy()
        else:
            self._idle.setdefault((integrator.adjoint, integrator.adaptive), []).append(integrator)

    def held_bytes(self):
        """About what the idle Integrators hold (between calls)."""
        return sum(i.held_bytes() for idle in self._idle.values() for i in idle)

    def close(self):
        """Destroy the idle Integrators (the cache dropped this pool); leased ones are
        destroyed when their strategy returns them."""
        self.closed = True
        for pool in self._idle.values():
            while pool:
                pool.pop().destroy()
