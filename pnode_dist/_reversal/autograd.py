"""The autograd Function of odeint: forward = TS solve, backward = TSAdjointSolve (no autograd
through the solver). Gradients reach y0 (this rank's shard) and every parameter of func (summed
over ranks). How the forward states are kept for the adjoint is the business of the solve's
reversal strategy (strategies.py). A backward pass with create_graph=True instead redoes the
recorded steps in torch (torch_replay.py), so that its gradients are differentiable again."""
import torch

from .._distributed.collective import allreduce_sum, check_phase
from .._solve.device import SOLVER_DTYPE
from ..errors import SolverError
from .torch_replay import record_outputs


class OdeintFunction(torch.autograd.Function):
    """apply(problem, y0, t, *params) -> outputs [len(t), *y0.shape]; problem.strategy() gives
    the reversal strategy of this solve, problem.replay(y0) the one of a further backward pass
    (the first one consumed the stored states). t: the output times when their
    gradient is wanted (else None); see time_gradient."""

    @staticmethod
    def forward(ctx, problem, y0, t, *params):
        strategy = problem.strategy()
        try:
            outputs, record = strategy.forward(y0.detach(), problem.t_out, problem.control,
                                               problem.observers)
        except BaseException:
            strategy.close()
            raise
        finally:
            if problem.stats is not None:
                problem.stats.update(strategy.stats)
        ctx.strategy, ctx.record, ctx.problem = strategy, record, problem
        ctx.save_for_backward(y0)                # create_graph: the graph back to y0
        ctx.y0 = y0.detach()
        ctx.versions = [p._version for p in (y0,) + params]
        ctx.outputs = outputs.clone() if t is not None else None   # the user may change theirs
        ctx.t_like = t.detach() if t is not None else None
        return outputs.to(y0.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        problem, again = ctx.problem, ctx.strategy is None
        if torch.is_grad_enabled():              # create_graph=True: no adjoint needed
            if ctx.strategy is not None:
                ctx.strategy.close()
            ctx.strategy = None
            check_phase(problem.comm, f"backward of odeint call {problem.call}",
                        _unusable(ctx, problem, again))
            return _differentiable_backward(ctx, problem, grad_outputs)
        strategy, ctx.strategy = ctx.strategy or problem.replay(ctx.y0), None
        try:
            # Before any other collective: every rank must be in this same backward pass.
            check_phase(problem.comm, f"backward of odeint call {problem.call}",
                        _unusable(ctx, problem, again))
        except BaseException:
            strategy.close()
            raise
        grad_outputs = grad_outputs.to(SOLVER_DTYPE)
        try:
            grad_y0, grad_params = strategy.backward(ctx.record, grad_outputs, problem.control)
        finally:
            if problem.stats is not None:
                problem.stats.update(strategy.stats)
            strategy.close()
        if problem.stats is not None:        # what the problem keeps until its next call
            problem.stats["memory_held"] = strategy.pool.held_bytes()
        grad_t = None
        if ctx.needs_input_grad[2]:
            grad_t = time_gradient(problem, ctx.outputs, grad_outputs, grad_y0,
                                   ctx.y0.dtype).to(ctx.t_like)
        grads = [None, grad_y0.to(ctx.y0.dtype), grad_t]
        offset = 0
        for p in problem.params:
            grads.append(grad_params[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return tuple(grads)


def _differentiable_backward(ctx, problem, grad_outputs):
    """The gradients of a backward pass with create_graph=True, as a torch graph: autograd
    through the recorded steps redone in torch, in the solver precision with f in the user's
    (as the forward's callbacks evaluated it). Explicit methods on one rank (_unusable)."""
    y0, = ctx.saved_tensors
    dtype, params = ctx.y0.dtype, problem.params
    tableau, dense = ctx.record.scheme

    def f(t, y):
        time = torch.tensor(t, dtype=dtype, device=y.device)
        return problem.func(time, y.to(dtype)).to(SOLVER_DTYPE)

    with torch.enable_grad():
        # The start in the solver precision: connected to y0 if y0 is differentiated, else a
        # leaf of its own (dL/dt_0 needs dL/dy0 either way).
        start = (y0.to(SOLVER_DTYPE) if y0.requires_grad
                 else y0.detach().to(SOLVER_DTYPE).requires_grad_(True))
        wanted = [start] + [p for p, needed in zip(params, ctx.needs_input_grad[3:]) if needed]
        where = "func while the backward pass (create_graph=True) redid the solve's steps"
        try:
            outputs = record_outputs(f, start, ctx.record, tableau, dense)
        except Exception as exc:
            raise SolverError(f"{type(exc).__name__} in {where}: {exc}") from exc
        if not bool(torch.isfinite(outputs).all()):
            raise SolverError(f"NaN or Inf from {where}, although the forward pass's were "
                              "finite: func is not the same function as in the forward pass")
        found = torch.autograd.grad(outputs, wanted, grad_outputs.to(SOLVER_DTYPE),
                                    create_graph=True, allow_unused=True)
        grads = {id(x): (torch.zeros_like(x) if g is None else g)
                 for x, g in zip(wanted, found)}
        grad_t = None
        if ctx.needs_input_grad[2]:
            grad_t = time_gradient(problem, outputs, grad_outputs, grads[id(start)], dtype,
                                   differentiable=True).to(ctx.t_like)
    grad_y0 = grads[id(start)].to(dtype) if ctx.needs_input_grad[1] else None
    return (None, grad_y0, grad_t) + tuple(
        grads[id(p)].to(p.dtype) if id(p) in grads else None for p in params)


def time_gradient(problem, outputs, grad_outputs, grad_y0, dtype, differentiable=False):
    """dL/dt for the output times t_0 < ... (or >) t_N, defined by the ODE the solve
    approximates (as torchdiffeq's odeint_adjoint defines it, not by the discrete steps, whose
    placement depends on t): dL/dt_i = <dL/dy_i, f(t_i, y_i)> for i >= 1, and
    dL/dt_0 = -<dL/dy0 - dL/dy_0, f(t_0, y_0)> (the adjoint state at t_0 without the direct
    term). Summed over this rank's samples, then over the ranks (t is shared). Decreasing t is
    solved as s = -t: dL/dt = -dL/ds. differentiable: as a torch graph (one rank). An event
    solve's second time only gives the direction: its gradient is zero."""
    func, times = problem.func, problem.t_out
    terms = []
    with torch.set_grad_enabled(differentiable):
        for i, s in enumerate(times):
            if i > 0 and getattr(problem, "event", False):
                terms.append(torch.zeros((), dtype=torch.float64))
                continue
            weight = grad_outputs[i] if i > 0 else grad_outputs[0] - grad_y0
            f = func(torch.tensor(s, dtype=dtype, device=outputs.device),
                     outputs[i].to(dtype))
            terms.append((weight.to(torch.float64) * f.to(torch.float64)).sum().cpu())
        grad = torch.stack(terms)
    if not differentiable:
        allreduce_sum(grad, problem.gradient_comm.tompi4py())
    return problem.time_sign * grad


def _unusable(ctx, problem, again):
    """Why this backward pass cannot give exact gradients (None if it can). A further
    backward pass re-runs the solve from y0, so y0 must be unchanged too."""
    params = problem.params
    if torch.is_grad_enabled():
        if ctx.record.scheme is None:
            return (f"a second derivative through odeint (backward with create_graph=True) "
                    f"needs an explicit method; {problem.method} solves implicit stages with "
                    "PETSc's Newton and Krylov solvers, outside autograd: choose an explicit "
                    "method (dopri5, rk4...) for a solve you differentiate twice")
        if problem.distributed:
            return ("a second derivative through odeint (backward with create_graph=True) is "
                    "supported on one rank: this solve is split over several ranks or a grid "
                    "(comm='self' solves each rank's part alone)")
    if again and ctx.y0._version != ctx.versions[0]:
        return ("y0 was modified in place after odeint's forward pass: a further backward "
                "pass re-runs the solve from y0 and cannot")
    if [p._version for p in params] != ctx.versions[1:]:
        return ("a tensor func differentiates was modified in place between odeint's forward "
                "and backward passes (an optimizer step before backward?): the gradient "
                "would not be the solve's; call backward first")
    return None
