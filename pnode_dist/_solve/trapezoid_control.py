"""Local error control for the trapezoidal rule (cn, and theta with theta = 0.5).

PETSc's TSTHETA estimates a step's local error from the second difference of the last three
states: h^2 y''/2, the local error of backward Euler. For the trapezoidal rule (local error
h^3 y'''/12) that overestimates the error wherever y'' is large and y''' small, so cn took
beuler's step counts (free fall from 10 m over 0.6 s, where the trapezoidal rule is exact: 42
steps at rtol 1e-4, 1270 at 1e-7; with this estimate 6 and 8). Here the estimate is the
method's own: h^3/12 times y''' taken from the third divided difference of the last four
accepted states, weighed as PETSc weighs errors (RMS of error / (atol + rtol max(|y_n|,
|y_n+1|))). The second step, with three states, uses the second difference (PETSc's estimate);
the first is taken as it is, as PETSc does.

It runs after each step in TSSetPostEvaluate (through ctypes: petsc4py does not bind it), with
TSAdapt 'none': a rejected step is rolled back (TSRollBack) and retried shorter; an accepted one
proposes the next step to the post-step callback, which lands it on the output times. Every
rank takes the same decision (the norm is summed over the ranks).
"""
import ctypes
import math

import numpy as np
import torch

from .._distributed.startup import PETSc
from .guard import guarded
from .rk_register import petsc_library
from .views import touch

_POST_EVALUATE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class TrapezoidControl:
    """Step-size control with the trapezoidal rule's local error estimate, for one TS."""
    SAFETY, GROW, SHRINK, MAX_REJECTIONS = 0.9, 10.0, 0.1, 10     # TSAdapt basic's clip

    def __init__(self, integrator):
        self.integrator = integrator
        self.mpi = integrator.layout.comm.tompi4py() if integrator.layout.nranks > 1 else None
        self.history = []            # (t, state) of the last accepted states, at most 3
        self.rtol = self.atol = None
        self.rejected = 0            # steps rejected by this control in the current solve
        self._in_a_row = 0
        self._rolled_back = False
        self._callback = _POST_EVALUATE(self._post_evaluate)
        self._set = petsc_library().TSSetPostEvaluate
        code = self._set(ctypes.c_void_p(integrator.ts.handle), self._callback)
        if code != 0:
            raise RuntimeError(f"TSSetPostEvaluate failed with PETSc error {code}")

    def detach(self):
        """Remove the callback from the TS (before the TS outlives this object)."""
        self._set(ctypes.c_void_p(self.integrator.ts.handle), None)
        self.integrator = None

    def begin(self, t0, y0, rtol, atol):
        """A new solve from (t0, y0)."""
        self.history = [(t0, y0.clone())]
        self.rtol, self.atol = rtol, atol
        self.rejected = self._in_a_row = 0
        self._rolled_back = False

    def _weighted_rms(self, error, y_before, y_after):
        """PETSc's weighted 2-norm of `error` over every rank's elements."""
        scale = torch.maximum(y_before.abs(), y_after.abs()).mul_(self.rtol).add_(self.atol)
        sums = np.array([float(((error / scale) ** 2).sum()), error.numel()])
        if self.mpi is not None:
            sums = self.mpi.allreduce(sums)
        return math.sqrt(sums[0] / max(sums[1], 1.0))

    def _estimate(self, t, y):
        """(weighted error, order of the estimate) of the step that ended at (t, y), or None
        for the first step."""
        points = self.history + [(t, y)]
        if len(points) < 3:
            return None
        h = t - points[-2][0]
        (ta, ya), (tb, yb), (tc, yc) = points[-3:]
        d2 = ((yc - yb) / (tc - tb) - (yb - ya) / (tb - ta)) / (tc - ta)
        if len(points) == 3:         # y''/2 ~ d2: backward Euler's local error h^2 y''/2
            return self._weighted_rms(h * h * d2, points[-2][1], y), 1
        t0, y0 = points[-4]
        d2_before = ((yb - ya) / (tb - ta) - (ya - y0) / (ta - t0)) / (tb - t0)
        d3 = (d2 - d2_before) / (tc - t0)       # y'''/6
        return self._weighted_rms(h ** 3 * d3 / 2, points[-2][1], y), 2

    def _post_evaluate(self, handle):
        integrator = self.integrator
        with guarded(integrator.parts[0], "cn's step-size control") as call:
            self._decide(integrator.ts)
        if call.failed:
            integrator.ts.setConvergedReason(PETSc.TS.ConvergedReason.DIVERGED_STEP_REJECTED)
        return 0

    def _decide(self, ts):
        """Accept the step just taken (propose the next one) or roll it back (retry shorter).
        PETSc calls this a second time right after a rollback (its rule for events): then
        there is nothing to decide."""
        if self._rolled_back:
            self._rolled_back = False
            return
        if ts.getConvergedReason() < 0 or self.rtol is None:
            return
        t, h = ts.getTime(), ts.getTime() - ts.getPrevTime()
        if self.integrator.on_gpu:
            touch(self.integrator.x, "r")
        y = self.integrator.x_view
        found = self._estimate(t, y)
        if found is None:            # the first step: taken as it is (PETSc's rule too)
            self._accept(t, y)
            return
        error, order = found
        factor = self.SAFETY * (error ** (-1.0 / (order + 1)) if error > 0 else math.inf)
        low, high = ts.getStepLimits()           # this solve's (min_step, max_step)
        if error <= 1.0:
            self._accept(t, y)
            ts.setTimeStep(min(h * min(self.GROW, factor), high))
            return
        self.rejected += 1
        self._in_a_row += 1
        next_h = h * max(self.SHRINK, factor)
        ts.rollBack()
        self._rolled_back = True
        if self._in_a_row > self.MAX_REJECTIONS or next_h < low:
            ts.setConvergedReason(PETSc.TS.ConvergedReason.DIVERGED_STEP_REJECTED)
            return
        ts.setTimeStep(next_h)

    def _accept(self, t, y):
        self._in_a_row = 0
        self.history = (self.history + [(t, y.clone())])[-3:]
