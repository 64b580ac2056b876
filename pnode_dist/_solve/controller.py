"""torchdiffeq's step-size rule for adaptive explicit steps, on top of PETSc's TSAdapt.

PETSc's basic TSAdapt and torchdiffeq's controller share the formula (the next step is the
last one times safety * error^(-1/order), clipped), and dopri5's error estimate is the same
formula as torchdiffeq's (tableaus.DOPRI5_EMBEDDED). Two rules still differ, and with PETSc's
the same rtol/atol took up to 10% more steps than torchdiffeq's on DETEST-like problems:

- The error weights. PETSc weighs a step's error by atol + rtol * max(|y1|, |y1_embedded|),
  the step's end values only (TSErrorWeightedNorm); torchdiffeq by atol + rtol * max(|y0|,
  |y1|). PETSc takes a per-element absolute tolerance, and one of atol + rtol * max(0, |y0| -
  |y1|) turns its rule into torchdiffeq's. y1 is not known before the step: it is extrapolated
  from the step before (the weight is off by a term of second order in the step).
- After an accepted step, PETSc may shorten the next one (down to safety = 0.9 of it);
  torchdiffeq shortens steps only after a rejection.

The rule only chooses the steps: the steps taken, the outputs and the gradients are exact for
whatever steps it chooses.
"""
import torch

from .views import touch, vec_view


class ExplicitController:
    """torchdiffeq's rule for one adaptive explicit TS: its per-element absolute tolerance
    Vec, updated after each accepted step for the next one, and the step after an accepted
    one no shorter than it."""

    def __init__(self, like, shape):
        self.vec = like.duplicate()
        self.view = vec_view(self.vec, shape)
        self.rtol = self.atol = None

    def begin(self, ts, rtol, atol, weights=None):
        """The first step of a solve: `weights` continuing a solve, else PETSc's own (no step
        before it)."""
        self.rtol, self.atol = rtol, atol
        if weights is None:
            self.vec.set(atol)
        else:
            touch(self.vec, "w")
            self.view.copy_(weights)
        ts.setTolerances(rtol=rtol, atol=self.vec)

    @staticmethod
    def next_step(h, proposed):
        """The step after an accepted step of size h, TSAdapt having proposed `proposed`."""
        return max(proposed, h)

    def weigh(self, y_before, y, h, dt):
        """The error weights of the step of size dt from y, after the step of size h from
        y_before."""
        touch(self.vec, "w")
        predicted = torch.add(y, y - y_before, alpha=dt / h)
        torch.sub(y.abs(), predicted.abs_(), out=self.view)
        self.view.clamp_(min=0).mul_(self.rtol).add_(self.atol)
