"""The autograd bridge: forward = TS solve, backward = TSAdjointSolve (no autograd through the
solver). Gradients reach y0 (this rank's shard) and every parameter of func (summed over ranks)."""
import torch

from .solver import Lease


class OdeintFunction(torch.autograd.Function):
    """apply(problem, y0, *params) -> outputs [len(t), *y0.shape]."""

    @staticmethod
    def forward(ctx, problem, y0, *params):
        solver = problem.solver
        integrator = solver.acquire(adjoint=True)
        lease = Lease(solver, integrator)
        try:
            outputs, record = integrator.forward(y0.detach(), problem.t_out, problem.control)
        finally:
            if problem.stats is not None:
                problem.stats.update(integrator.stats)
        ctx.lease, ctx.record, ctx.problem = lease, record, problem
        ctx.y0_dtype = y0.dtype
        return outputs.to(y0.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        lease, problem = ctx.lease, ctx.problem
        if lease.integrator is None:
            raise RuntimeError("odeint's backward cannot run twice on one forward solve (the "
                               "discrete adjoint consumed its trajectory): run the forward again")
        grad_outputs = grad_outputs.to(torch.float64)
        try:
            grad_y0, grad_params = lease.integrator.backward(ctx.record, grad_outputs)
            lease.adjoint_done = True
            if problem.stats is not None:
                problem.stats.update(lease.integrator.stats)
        finally:
            lease.close()
        grads = [None, grad_y0.to(ctx.y0_dtype)]
        offset = 0
        for p in problem.params:
            grads.append(grad_params[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return tuple(grads)
