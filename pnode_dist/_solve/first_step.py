"""The first step of an adaptive explicit solve, chosen from f at the start (instead of a
fixed fraction of the interval, which made PETSc reject and shrink its way down)."""
import math


def initial_step(f, t0, y0, span, order, rtol, atol, total=float):
    """The first step of an adaptive solve from two evaluations of f (Hairer, Norsett and
    Wanner, Solving ODEs I, II.4): a step whose explicit Euler change and whose estimated
    second-derivative error are small in the weighted RMS norm of rtol/atol. `total(x)` sums a
    float over the ranks the state is split across (every rank makes the same calls, so f must
    not raise: a failed evaluation returns NaN). Returns (step or None, evaluations made): None
    where f was not finite on some rank."""
    scale = atol + rtol * y0.abs()
    count = total(float(y0.numel()))

    def norm(v):
        return math.sqrt(total(float(((v / scale) ** 2).sum())) / count)

    f0 = f(t0, y0)
    d0, d1 = norm(y0), norm(f0)
    if not math.isfinite(d1):
        return None, 1
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, span)
    f1 = f(t0 + h0, y0 + h0 * f0)
    d2 = norm(f1 - f0) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    step = min(100 * h0, h1, span)
    return (step if math.isfinite(step) and step > 0 else None), 2
