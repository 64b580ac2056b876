"""Pure-torch replay of an explicit Runge-Kutta solve, differentiable by ordinary backprop.

Given the tableau and the exact step times that a pnode_dist forward solve took (recorded by the
solver, adaptive steps included), backprop through this replay is the gradient the discrete
adjoint must reproduce to round-off. Used by the tests and the benchmarks; not on the hot path.
"""
import torch

from .methods import ButcherTableau


def rk_step(func, t, y, h, tableau: ButcherTableau):
    """One explicit RK step from (t, y) with step h."""
    k = []
    for i in range(tableau.stages):
        yi = y
        for j, a in enumerate(tableau.a[i]):
            if a != 0.0:
                yi = yi + (h * a) * k[j]
        k.append(func(torch.tensor(t + tableau.c[i] * h, dtype=y.dtype), yi))
    out = y
    for b, ki in zip(tableau.b, k):
        if b != 0.0:
            out = out + (h * b) * ki
    return out


def rk_replay(func, y0, times, output_steps, tableau: ButcherTableau):
    """Integrate through the step times `times` (times[0] is the start); return the states at
    the step indices `output_steps`, stacked as [len(output_steps), *y0.shape]."""
    outs = {0: y0}
    y = y0
    for n in range(1, len(times)):
        y = rk_step(func, times[n - 1], y, times[n] - times[n - 1], tableau)
        outs[n] = y
    return torch.stack([outs[k] for k in output_steps])
