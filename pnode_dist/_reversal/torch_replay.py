"""A recorded explicit Runge-Kutta solve redone in torch operations: the same steps (the
recorded step times), the same tableau and dense output as PETSc integrated with, the outputs
as the solve made them. Autograd can then differentiate the outputs as often as asked: this is
how a backward pass with create_graph=True gets gradients that are themselves differentiable
(autograd.py), and pnode_dist.testing's reference for the reverse-accuracy checks.
"""
import torch

from .._solve.dense import interpolate_step, stages


def rk_step(func, t, y, h, tableau):
    """One explicit RK step of size h from (t, y); func(t: float, y)."""
    k = stages(func, t, h, y, tableau, [tableau.b])
    out = y
    for b, ki in zip(tableau.b, k):
        if b != 0.0:
            out = out + (h * b) * ki
    return out


def record_outputs(func, y0, record, tableau, dense):
    """The outputs of the recorded solve `record` (a ForwardRecord) from y0, [len(outputs),
    *y0.shape]: the state where an output ended a step, the dense output where it lies inside
    one. func(t: float, y) -> dy/dt."""
    states, y = [y0], y0
    last = max(record.output_steps)
    times = record.times
    for n in range(1, last + 1):
        y = rk_step(func, times[n - 1], y, times[n] - times[n - 1], tableau)
        states.append(y)
    outs = []
    for pos, t in zip(record.output_steps, record.dense_times):
        if t is None:
            outs.append(states[pos])
        else:
            outs.append(interpolate_step(func, times[pos], times[pos + 1], states[pos], [t],
                                         tableau, dense)[0])
    return torch.stack(outs)
