"""Output times inside a step.

An adaptive explicit solve steps where its error control wants and evaluates each output time
inside a step by the tableau's dense output (PETSc's TSInterpolate in the forward). In the
backward pass, such an output's cotangent enters the discrete adjoint at the start of its step:
the vector-Jacobian product of a torch replay of that one step and its interpolant (the same
formula), for the state there and for the parameters. The gradient is therefore backprop's
through the same steps and the same interpolation. Where the forward kept f's graph at every
stage (the `graphs` plan), the same vjp walks those graphs back instead of replaying the step,
for all such steps together (one vjp per stage index).
"""
import torch


def theta(t, t_start, t_end):
    """Where t lies in the step [t_start, t_end], computed as PETSc's TSInterpolate does."""
    return (t - t_end) / (t_end - t_start) + 1.0


def stages(f, t_start, h, y, tableau, weights):
    """The stage derivatives k_i of the step from (t_start, y) of size h (a number, or a
    tensor to differentiate in), as far as any of `weights` (one list per output) uses them."""
    used = [i for i in range(tableau.stages) if any(w[i] != 0.0 for w in weights)]
    k = []
    for i in range(used[-1] + 1 if used else 0):
        yi = y
        for j, a in enumerate(tableau.a[i]):
            if a != 0.0:
                yi = yi + (h * a) * k[j]
        k.append(f(t_start + tableau.c[i] * h, yi))
    return k


def dense_slope(f, t_start, t_end, y, t, tableau, dense):
    """d/dt of the step's dense output at t (sum_i b_i'(theta) k_i): how an output inside the
    step moves with its time. f(t: float, y) -> dy/dt."""
    slopes = dense.slopes(theta(t, t_start, t_end))
    k = stages(f, t_start, t_end - t_start, y, tableau, [slopes])
    out = torch.zeros_like(y)
    for s, ki in zip(slopes, k):
        if s != 0.0:
            out = out + s * ki
    return out


def step_slope(f, t_start, y, size, tableau):
    """d/d(size) of the end of the explicit RK step of `size` from (t_start, y): how a step
    retaken to end on an event moves with its size. f(t: tensor, y), differentiable twice (the
    derivative is taken as a vjp's derivative in its cotangent)."""
    with torch.enable_grad():
        h = torch.tensor(size, dtype=y.dtype, device=y.device, requires_grad=True)
        k = stages(f, t_start, h, y, tableau, [tableau.b])
        end = y + h * sum(b * ki for b, ki in zip(tableau.b, k) if b != 0.0)
        u = torch.zeros_like(end, requires_grad=True)
        along, = torch.autograd.grad(end, h, u, create_graph=True)
        slope, = torch.autograd.grad(along, u)
    return slope.detach()


def interpolate_step(f, t_start, t_end, y, out_times, tableau, dense):
    """The step's stages from y in torch, and its dense output at each of `out_times`:
    [len(out_times), *y.shape]. f(t: float, y) -> dy/dt."""
    h = t_end - t_start
    weights = [dense.weights(theta(t, t_start, t_end)) for t in out_times]
    k = stages(f, t_start, h, y, tableau, weights)
    outs = []
    for w in weights:
        out = y
        for wi, ki in zip(w, k):
            if wi != 0.0:
                out = out + (h * wi) * ki
        outs.append(out)
    return torch.stack(outs)


def step_cotangent(f, params, t_start, t_end, y_start, out_times, grads, tableau, dense):
    """(dL/dy at the step's start, [dL/dparam]) of the interpolated outputs at `out_times` with
    cotangents `grads` [len(out_times), *y.shape]: one replay of the step with f's graph."""
    y = y_start.detach().requires_grad_(True)
    with torch.enable_grad():
        outs = interpolate_step(f, t_start, t_end, y, out_times, tableau, dense)
    grad = grads.to(outs.dtype)
    if not outs.requires_grad:
        return grad.sum(0), [None] * len(params)
    got = torch.autograd.grad(outs, [y] + list(params), grad, allow_unused=True)
    return (got[0] if got[0] is not None else grad.sum(0)), list(got[1:])


def stage_graph_cotangents(steps, params, tableau, dense):
    """step_cotangent of several steps at once, from f's graphs at their stages kept by the
    forward. steps: [(graphs [(Y_i leaf, k_i's edge)], t_start, t_end, out_times, grads)]. The
    cotangent of k_i is h sum_o b_i(theta_o) g_o plus what later stages pass back through
    Y_l = y + h sum_i a_li k_i; the steps are independent (none needs the adjoint), so each
    stage index takes one vjp for all of them, from the last. Returns ([dL/dy at each step's
    start], [dL/dparam summed over the steps])."""
    s = min(len(g) for g, *_ in steps)
    direct, grad_y, hs = [], [], []
    for graphs, t_start, t_end, out_times, grads in steps:
        h = t_end - t_start
        weights = torch.tensor([dense.weights(theta(t, t_start, t_end))[:s] for t in out_times],
                               dtype=grads.dtype, device=grads.device) * h
        direct.append((weights.T @ grads.reshape(len(out_times), -1))
                      .view((s,) + grads.shape[1:]))
        grad_y.append(grads.sum(0))
        hs.append(h)
    grad_params = [None] * len(params)
    back = [[None] * s for _ in steps]       # dL/dY_i of each step
    for i in reversed(range(s)):
        outs, leaves, cots, which = [], [], [], []
        for n, (graphs, *_) in enumerate(steps):
            c = direct[n][i]
            for l in range(i + 1, s):
                a = tableau.a[l][i]
                if a != 0.0 and back[n][l] is not None:
                    c = c + (hs[n] * a) * back[n][l]
            y_leaf, k = graphs[i]            # k: f's output edge (None: no gradient)
            if k is not None:
                outs.append(k)
                leaves.append(y_leaf)
                cots.append(c)
                which.append(n)
        if not outs:
            continue
        got = torch.autograd.grad(outs, leaves + list(params), cots, retain_graph=True,
                                  allow_unused=True)
        for n, g in zip(which, got[:len(leaves)]):
            back[n][i] = g
            if g is not None:
                grad_y[n] = grad_y[n] + g
        for j, g in enumerate(got[len(leaves):]):
            if g is not None:
                grad_params[j] = g if grad_params[j] is None else grad_params[j] + g
    return grad_y, grad_params
