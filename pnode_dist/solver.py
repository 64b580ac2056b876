"""The PETSc side of one ODE problem: TS set-up, the forward solve through the output times, and
the discrete adjoint between output times.

An Integrator owns one TS with its Vecs and Jacobian Mats. A Solver keeps a pool of them for one
problem configuration, so that several forward passes may await their backward at once (an ODE
block used twice in a network); each forward that needs a gradient leases an Integrator until
its backward pass (or the graph's destruction) returns it.
"""
import math
from dataclasses import dataclass, field
from typing import List

import torch

from .bridge import GraphStore, ParamJacobianMat, StateJacobianMat, TorchRHS, vec_view
from .errors import InputError, SolverError
from .implicit import BlockJacobianPC, IJacobianMat, IJacobianPMat, TorchIFunction
from .methods import EXPLICIT, IMPLICIT
from .options import layered_options
from .parallel import MPI, PETSc, raise_collectively

_REL_TIME_TOL = 1e-12
_THETA_TYPES = {"beuler", "cn", "theta"}


def _reason_name(enum, value):
    """PETSc's name of a converged/diverged reason, e.g. DIVERGED_MAX_IT."""
    names = [k for k in dir(enum) if k.isupper() and getattr(enum, k) == value]
    return names[0] if names else f"reason {value}"


@dataclass(frozen=True)
class SetupConfig:
    """Choices fixed when a TS is built (part of the solver cache key)."""
    theta: float = 0.5
    linear_solver: str = "gmres"     # Newton's linear solver: 'gmres' (matrix-free) or 'exact'
    tableau: str = None              # ARKIMEX tableau name (None: the method's default)
    mass: object = None              # constant mass matrix [d, d] (torch tensor) or None

    @property
    def key(self):
        mass = None if self.mass is None else (tuple(self.mass.shape), self.mass.double().tolist())
        return (self.theta, self.linear_solver, self.tableau, str(mass))


@dataclass
class StepControl:
    """How the steps are chosen for one solve."""
    step_size: float = None      # fixed steps no longer than this; None with adaptive -> TSAdapt
    first_step: float = None     # initial step of an adaptive solve
    max_num_steps: int = 1_000_000
    rtol: float = 1e-7
    atol: float = 1e-9
    store_graphs: bool = False   # keep f's stage graphs for the adjoint (faster, more memory)


@dataclass
class ForwardRecord:
    """What a forward solve leaves for its adjoint: the accepted step times and the step index
    that ends at each output time."""
    times: List[float] = field(default_factory=list)
    output_steps: List[int] = field(default_factory=list)

    @property
    def steps(self):
        return len(self.times) - 1


class _Run:
    """Bookkeeping of one forward solve, driven by the post-step callback."""

    def __init__(self, t_out, control, adaptive, outputs):
        self.t_out = t_out
        self.control = control
        self.adaptive = adaptive
        self.outputs = outputs
        self.k = 1                                   # next output index
        self.record = ForwardRecord(times=[t_out[0]], output_steps=[0])
        self.done = False
        scale = max(1.0, max(abs(t_out[0]), abs(t_out[-1])))
        self.tol = _REL_TIME_TOL * scale

    def fixed_steps(self, t):
        """Number of equal steps from t to the next output time (at most step_size each)."""
        remaining = self.t_out[self.k] - t
        h = self.control.step_size
        if h is None:
            return 1
        return max(1, math.ceil(remaining / h * (1 - 1e-12)))

    def first_dt(self):
        span = self.t_out[1] - self.t_out[0]
        if not self.adaptive:
            return span / self.fixed_steps(self.t_out[0])
        dt = self.control.first_step or (self.t_out[-1] - self.t_out[0]) * 1e-2
        return min(dt, span)


class Integrator:
    """One PETSc TS for a problem; with `adjoint=True` it records a memory trajectory and
    carries the Jacobian Mats the discrete adjoint applies."""

    def __init__(self, layout, method, func, params, dtype, prefix, petsc_options, adaptive,
                 adjoint, setup):
        self.layout, self.method = layout, method
        self.adaptive, self.adjoint = adaptive, adjoint
        shape = layout.local_shape
        self.rhs = self.ifun = None      # explicit part (RHS form) / implicit part (IFunction)
        if method.kind == EXPLICIT:
            self.rhs = TorchRHS(func, params, shape, dtype)
        elif method.kind == IMPLICIT:
            self.ifun = TorchIFunction(func, params, shape, dtype, setup.mass)
        else:
            self.ifun = TorchIFunction(func.implicit, params, shape, dtype)
            self.rhs = TorchRHS(func.explicit, params, shape, dtype)
        self.parts = [p for p in (self.rhs, self.ifun) if p is not None]
        nparams = self.parts[0].nparams
        comm = layout.comm
        ts = PETSc.TS().create(comm=comm)
        if prefix:
            ts.setOptionsPrefix(prefix)
        ts.setProblemType(PETSc.TS.ProblemType.NONLINEAR)
        ts.setType(method.ts_type)
        if method.ts_type == "rk":
            ts.setRKType(method.subtype)
        elif method.ts_type == "arkimex":
            ts.setARKIMEXType(setup.tableau or method.subtype)
        elif method.ts_type == "theta":
            ts.setTheta(setup.theta)
        self.x = layout.create_state_vec()
        self.x_view = vec_view(self.x, shape)
        self.mu = None
        if adjoint:
            self.lam = self.x.duplicate()
            self.lam_view = vec_view(self.lam, shape)
            if nparams:
                self.mu = layout.create_param_vec(nparams)
        if self.rhs is not None:
            self._set_explicit_part(ts, nparams)
        defaults = {"ts_adapt_type": "basic" if adaptive else "none"}
        if self.ifun is not None:
            defaults.update(self._set_implicit_part(ts, nparams, setup.linear_solver))
        if adjoint:
            ts.setSaveTrajectory()
        ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
        ts.setErrorIfStepFails(False)
        ts.setPostStep(self._post_step)
        # The trajectory reads only unprefixed options; without a type PETSc would pick 'basic',
        # which writes files into the working directory.
        trajectory = {"ts_trajectory_type": "memory"} if adjoint else {}
        with layered_options(prefix, defaults, petsc_options), \
                layered_options("", trajectory, ()):
            ts.setFromOptions()
        if ts.getType() != method.ts_type and not {ts.getType(), method.ts_type} <= _THETA_TYPES:
            raise InputError(f"TS type {ts.getType()!r} (from the PETSc options) does not match "
                             f"method {method.name!r} ({method.ts_type}): choose the method with "
                             "odeint's method argument and its variant with -ts_rk_type / "
                             "-ts_arkimex_type")
        self.ts = ts
        self._run = None
        self.stats = {}

    def _set_explicit_part(self, ts, nparams):
        rhs, comm = self.rhs, self.layout.comm
        ts.setRHSFunction(rhs.rhs, self.x.duplicate())
        if not self.adjoint:
            return
        J = PETSc.Mat().createPython(self.layout.state_mat_sizes(), StateJacobianMat(rhs),
                                     comm=comm)
        J.setUp()
        ts.setRHSJacobian(rhs.linearize, J, J)
        if nparams:
            Jp = PETSc.Mat().createPython(self.layout.param_mat_sizes(nparams),
                                          ParamJacobianMat(rhs), comm=comm)
            Jp.setUp()
            ts.setRHSJacobianP(rhs.linearize_params, Jp)

    def _set_implicit_part(self, ts, nparams, linear_solver):
        """IFunction, IJacobian (and IJacobianP); returns the Newton/Krylov option defaults."""
        ifun, comm = self.ifun, self.layout.comm
        ts.setIFunction(ifun.ifunction, self.x.duplicate())
        A = PETSc.Mat().createPython(self.layout.state_mat_sizes(), IJacobianMat(ifun), comm=comm)
        A.setUp()
        ts.setIJacobian(ifun.ijacobian, A, A)
        if self.adjoint and nparams:
            Jp = PETSc.Mat().createPython(self.layout.param_mat_sizes(nparams),
                                          IJacobianPMat(ifun), comm=comm)
            Jp.setUp()
            ts.setIJacobianP(ifun.ijacobian_params, Jp)
        defaults = {"snes_rtol": 1e-10, "snes_atol": 1e-12, "ksp_rtol": 1e-10}
        pc = ts.getSNES().getKSP().getPC()
        if linear_solver == "exact":
            pc.setType(PETSc.PC.Type.PYTHON)
            pc.setPythonContext(BlockJacobianPC(ifun))
            # Exact Newton directions: full steps, no line search (which would cost a jvp).
            defaults.update(ksp_type="preonly", snes_linesearch_type="basic")
        else:
            defaults.update(ksp_type="gmres", pc_type="none")
        return defaults

    def _counts(self):
        """Callback counters summed over the parts (f evaluations, jvps, vjps...)."""
        total = {}
        for p in self.parts:
            for k, v in p.counts.items():
                total[k] = total.get(k, 0) + v
        return total

    def _counts_since(self, before):
        names = {"rhs": "f_evaluations", "linearize": "linearizations", "reused": "graphs_reused",
                 "vjp": "vjps", "jvp": "jvps", "blocks": "jacobian_blocks"}
        return {names[k]: v - before.get(k, 0) for k, v in self._counts().items()}

    @property
    def error(self):
        """The first error recorded by a callback since the last reset."""
        return next((p.error for p in self.parts if p.error is not None), None)

    def _reset_errors(self):
        for p in self.parts:
            p.error = None

    # ---------------------------------------------------------------- forward
    def _post_step(self, ts):
        if ts.getConvergedReason() < 0:      # PETSc calls it after a failed step too
            return
        run = self._run
        if self.rhs is not None and self.rhs.store is not None:
            self.rhs.store.accept_step()
        t = ts.getTime()
        run.record.times.append(t)
        target = run.t_out[run.k]
        if t >= target - run.tol:
            run.outputs[run.k].copy_(self.x_view)
            run.record.output_steps.append(len(run.record.times) - 1)
            run.k += 1
            if run.k == len(run.t_out):
                run.done = True
                ts.setConvergedReason(PETSc.TS.ConvergedReason.CONVERGED_USER)
                return
            target = run.t_out[run.k]
        remaining = target - t
        if not run.adaptive:
            ts.setTimeStep(remaining / run.fixed_steps(t))
            return
        dt = ts.getTimeStep()
        if remaining <= 1.01 * dt:
            ts.setTimeStep(remaining)
        elif remaining < 2 * dt:
            ts.setTimeStep(remaining / 2)

    def forward(self, y0, t_out, control: StepControl):
        """Solve from t_out[0] through every output time; returns (outputs, record).
        outputs has shape [len(t_out), *local_shape] in float64 (the solver precision)."""
        ts = self.ts
        outputs = torch.empty((len(t_out),) + self.layout.local_shape, dtype=torch.float64)
        outputs[0].copy_(y0)
        self.x_view.copy_(y0)
        self.x.stateIncrease()
        run = _Run(t_out, control, self.adaptive, outputs)
        self._run = run
        self._reset_errors()
        if self.rhs is not None:
            self.rhs.store = GraphStore() if (self.adjoint and control.store_graphs) else None
        if self.adaptive:
            ts.setTolerances(rtol=control.rtol, atol=control.atol)
        ts.setTime(t_out[0])
        ts.setStepNumber(0)
        ts.setMaxTime(t_out[-1])
        ts.setMaxSteps(control.max_num_steps)
        ts.setTimeStep(run.first_dt())
        ts.setConvergedReason(PETSc.TS.ConvergedReason.CONVERGED_ITERATING)
        before = self._counts()
        ts.solve(self.x)
        self._run = None
        self.stats = {"steps": run.record.steps, "newton_iterations": ts.getSNESIterations(),
                      "linear_iterations": ts.getKSPIterations(), **self._counts_since(before)}
        self._check_forward(run, outputs)
        return outputs, run.record

    def _check_forward(self, run, outputs):
        error = self.error
        reason = self.ts.getConvergedReason()
        if error is None and not run.done:
            t = run.record.times[-1]
            if reason == PETSc.TS.ConvergedReason.CONVERGED_ITS:
                error = (f"reached max_num_steps={run.control.max_num_steps} at t={t:g} before "
                         f"t={run.t_out[-1]:g}: raise options['max_num_steps'] or loosen rtol/atol")
            elif reason == PETSc.TS.ConvergedReason.DIVERGED_NONLINEAR_SOLVE:
                snes = self.ts.getSNES()
                error = (f"Newton's method failed in step {len(run.record.times)} from t={t:g} "
                         f"(step size {self.ts.getTimeStep():g}): "
                         f"{_reason_name(PETSc.SNES.ConvergedReason, snes.getConvergedReason())}"
                         f", residual norm {snes.getFunctionNorm():.3e}"
                         f" after {snes.getIterationNumber()} iterations; try a smaller step, "
                         "linear_solver='exact', or looser -snes_rtol/-snes_atol")
            else:
                error = (f"the time integration failed at t={t:g} "
                         f"({_reason_name(PETSc.TS.ConvergedReason, reason)}): "
                         "the step was rejected too often; try a smaller first_step, looser "
                         "rtol/atol, or check f for blow-up")
        if error is None and not bool(torch.isfinite(outputs).all()):
            bad = int((~torch.isfinite(outputs.reshape(len(run.t_out), -1))).any(1).nonzero()[0])
            error = (f"the solution became non-finite by t={run.t_out[bad]:g}: the dynamics blew "
                     "up; use smaller steps (step_size or rtol/atol) or rescale the problem")
        raise_collectively(self.layout.comm, error, SolverError)

    # ---------------------------------------------------------------- adjoint
    def backward(self, record: ForwardRecord, grad_outputs):
        """Discrete adjoint of the last forward solve. grad_outputs: [len(t), *local_shape].
        Returns (dL/dy0 for this rank's shard, dL/dtheta summed over all ranks)."""
        ts = self.ts
        self._reset_errors()
        before = self._counts()
        self.lam_view.copy_(grad_outputs[-1])
        self.lam.stateIncrease()
        if self.mu is not None:
            self.mu.zeroEntries()
            ts.setCostGradients([self.lam], [self.mu])
        else:
            ts.setCostGradients([self.lam])
        steps = record.output_steps
        for i in range(len(steps) - 1, 0, -1):
            if i < len(steps) - 1:
                self.lam_view.add_(grad_outputs[i])
                self.lam.stateIncrease()
            ts.adjointSetSteps(steps[i] - steps[i - 1])
            ts.adjointSolve()
        error = self.error
        self.stats.update({f"adjoint_{k}": v for k, v in self._counts_since(before).items()})
        if self.rhs is not None:
            self.rhs.store = None
        grad_y0 = self.lam_view + grad_outputs[0]
        if error is None and not bool(torch.isfinite(grad_y0).all()):
            error = "the adjoint produced a non-finite gradient with respect to y0"
        raise_collectively(self.layout.comm, error, SolverError)
        grad_params = None
        if self.mu is not None:
            grad_params = torch.from_numpy(self.mu.getArray().copy())
            mpi = self.layout.comm.tompi4py()
            if mpi.Get_size() > 1:
                mpi.Allreduce(MPI.IN_PLACE, grad_params.numpy(), op=MPI.SUM)
        return grad_y0, grad_params

    def destroy(self):
        for p in self.parts:
            p.forget_views()
        self.ts.destroy()


class Solver:
    """A pool of Integrators for one problem configuration."""

    def __init__(self, layout, method, func, params, dtype, prefix, petsc_options, adaptive,
                 setup):
        self.args = (layout, method, func, params, dtype, prefix, petsc_options, adaptive)
        self.setup = setup
        self._idle = {True: [], False: []}

    def acquire(self, adjoint):
        pool = self._idle[adjoint]
        return pool.pop() if pool else Integrator(*self.args, adjoint=adjoint, setup=self.setup)

    def release(self, integrator):
        self._idle[integrator.adjoint].append(integrator)


class Lease:
    """An Integrator lent to one forward pass. After its adjoint ran, the Integrator goes back to
    the pool; if the graph is dropped without a backward pass, its trajectory still holds the
    forward steps (a memory trajectory cannot be reset from petsc4py), so it is destroyed."""

    def __init__(self, solver, integrator):
        self.solver, self.integrator = solver, integrator
        self.adjoint_done = False

    def close(self):
        if self.integrator is None:
            return
        if self.adjoint_done:
            self.solver.release(self.integrator)
        else:
            self.integrator.destroy()
        self.integrator = None

    def __del__(self):
        self.close()
