"""The autograd bridge: forward = TS solve, backward = TSAdjointSolve (no autograd through the
solver). Gradients reach y0 (this rank's shard) and every parameter of func (summed over ranks).
How the forward states are kept for the adjoint is the run's business (runs.py)."""
import torch

from .device import SOLVER_DTYPE
from .parallel import check_phase


class OdeintFunction(torch.autograd.Function):
    """apply(problem, y0, *params) -> outputs [len(t), *y0.shape]; problem.new_run() gives the
    StoredRun or CheckpointedRun of this solve."""

    @staticmethod
    def forward(ctx, problem, y0, *params):
        run = problem.new_run()
        try:
            outputs, record = run.forward(y0.detach(), problem.t_out, problem.control)
        except BaseException:
            run.close()
            raise
        finally:
            if problem.stats is not None:
                problem.stats.update(run.stats)
        ctx.run, ctx.record, ctx.problem = run, record, problem
        ctx.y0_dtype = y0.dtype
        return outputs.to(y0.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        run, problem = ctx.run, ctx.problem
        if run is None:
            raise RuntimeError("odeint's backward cannot run twice on one forward solve (the "
                               "discrete adjoint consumed its trajectory): run the forward again")
        ctx.run = None
        try:
            # Before any other collective: every rank must be in this same backward pass.
            check_phase(problem.comm, f"backward of odeint call {problem.call}")
        except BaseException:
            run.close()
            raise
        grad_outputs = grad_outputs.to(SOLVER_DTYPE)
        try:
            grad_y0, grad_params = run.backward(ctx.record, grad_outputs, problem.control)
        finally:
            if problem.stats is not None:
                problem.stats.update(run.stats)
            run.close()
        grads = [None, grad_y0.to(ctx.y0_dtype)]
        offset = 0
        for p in problem.params:
            grads.append(grad_params[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return tuple(grads)
