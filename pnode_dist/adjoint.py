"""The autograd bridge: forward = TS solve, backward = TSAdjointSolve (no autograd through the
solver). Gradients reach y0 (this rank's shard) and every parameter of func (summed over ranks).
How the forward states are kept for the adjoint is the run's business (runs.py)."""
import torch

from .device import SOLVER_DTYPE
from .parallel import check_phase


class OdeintFunction(torch.autograd.Function):
    """apply(problem, y0, *params) -> outputs [len(t), *y0.shape]; problem.new_run() gives the
    StoredRun or CheckpointedRun of this solve, problem.rerun(y0) the run of a further backward
    pass (the first one consumed the stored states)."""

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
        ctx.y0 = y0.detach()
        ctx.versions = [p._version for p in (y0,) + params]
        return outputs.to(y0.dtype)

    @staticmethod
    def backward(ctx, grad_outputs):
        problem, rerun = ctx.problem, ctx.run is None
        run, ctx.run = ctx.run or problem.rerun(ctx.y0), None
        try:
            # Before any other collective: every rank must be in this same backward pass.
            check_phase(problem.comm, f"backward of odeint call {problem.call}",
                        _unusable(ctx, problem.params, rerun))
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
        grads = [None, grad_y0.to(ctx.y0.dtype)]
        offset = 0
        for p in problem.params:
            grads.append(grad_params[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return tuple(grads)


def _unusable(ctx, params, rerun):
    """Why this backward pass cannot give exact gradients (None if it can). A further
    backward pass re-runs the solve from y0, so y0 must be unchanged too."""
    if torch.is_grad_enabled():
        return ("a second derivative through odeint (backward with create_graph=True) is not "
                "supported: the discrete adjoint runs outside autograd")
    if rerun and ctx.y0._version != ctx.versions[0]:
        return ("y0 was modified in place after odeint's forward pass: a further backward "
                "pass re-runs the solve from y0 and cannot")
    if [p._version for p in params] != ctx.versions[1:]:
        return ("a tensor func differentiates was modified in place between odeint's forward "
                "and backward passes (an optimizer step before backward?): the gradient "
                "would not be the solve's; call backward first")
    return None
