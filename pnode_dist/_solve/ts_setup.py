"""The TS of an Integrator set up: the method's parts as PETSc callbacks (RHSFunction and its
Jacobians; IFunction, IJacobian and the exact Newton's PC), Newton's tolerances, the step
adaptor (or cn's own control), and the options database read last (setFromOptions)."""
import torch

from .._distributed.startup import PETSc
from ..errors import InputError
from .device import SOLVER_DTYPE, vec_type
from .explicit import ParamJacobianMat, StateJacobianMat
from .implicit import BlockJacobianPC, IJacobianMat, IJacobianPMat
from .options import layered_options

# Newton and Krylov tolerances within reach of the solver precision (PETSc options override).
_NEWTON_TOLERANCES = {torch.float64: {"snes_rtol": 1e-10, "snes_atol": 1e-12, "ksp_rtol": 1e-10},
                      torch.float32: {"snes_rtol": 1e-5, "snes_atol": 1e-6, "ksp_rtol": 1e-5}}


def option_given(prefix, name, petsc_options):
    """Whether the user chose PETSc option `name`: in petsc_options or on the command line."""
    return (name in dict(petsc_options or ())
            or PETSc.Options().hasName(f"{prefix or ''}{name}"))


def configure(integrator, ts, setup, prefix, petsc_options, nparams):
    """Set `ts` up for the Integrator (its method, parts, adaptivity and trajectory) with the
    options layered over our defaults; returns (linear_solver, trapezoid): Newton's linear
    solver ('exact', 'gmres' or None) and whether cn's own error control is to run."""
    method, adaptive, adjoint = integrator.method, integrator.adaptive, integrator.adjoint
    if integrator.rhs is not None:
        _set_explicit_part(integrator, ts, nparams)
    defaults = {"ts_adapt_type": "basic" if adaptive else "none"}
    linear_solver = None         # Newton's: 'exact' or 'gmres' (implicit methods)
    if integrator.ifun is not None:
        linear_solver = "exact" if setup.linear_solver == "exact" else "gmres"
        defaults.update(_set_implicit_part(integrator, ts, nparams, linear_solver))
        if adaptive:         # a failed Newton solve rejects the step: retried 4x smaller
            defaults["ts_max_snes_failures"] = -1
    # The trapezoidal rule's own error estimate (trapezoid_control.py) unless the options
    # choose a TSAdapt.
    trapezoid = (adaptive and method.trapezoidal(setup)
                 and not option_given(prefix, "ts_adapt_type", petsc_options))
    if trapezoid:
        defaults["ts_adapt_type"] = "none"
    if adjoint:
        ts.setSaveTrajectory()
    ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
    ts.setErrorIfStepFails(False)
    ts.setPreStep(integrator._pre_step)
    ts.setPostStep(integrator._post_step)
    # The trajectory reads only unprefixed options; without a type PETSc would pick 'basic',
    # which writes files into the working directory.
    trajectory = {"ts_trajectory_type": "memory"} if adjoint else {}
    with layered_options(prefix, defaults, petsc_options), \
            layered_options("", trajectory, ()):
        ts.setFromOptions()
    if ts.getType() not in method.ts_types:
        raise InputError(f"TS type {ts.getType()!r} (from the PETSc options) does not match "
                         f"method {method.name!r} ({'/'.join(method.ts_types)}): choose the "
                         "method with odeint's method argument and its variant with "
                         "-ts_rk_type / -ts_arkimex_type")
    return linear_solver, trapezoid


def _python_mat(integrator, sizes, context):
    """A matrix-free Mat whose products are torch callbacks (Vecs of the state's type); PETSc
    holds its context, which the Integrator keeps (see Integrator.destroy)."""
    integrator._contexts.append(context)
    mat = PETSc.Mat().createPython(sizes, context, comm=integrator.layout.comm)
    mat.setVecType(vec_type(integrator.layout.device))
    mat.setUp()
    return mat


def _set_explicit_part(integrator, ts, nparams):
    """RHSFunction (and for the adjoint RHSJacobian and RHSJacobianP)."""
    rhs, layout = integrator.rhs, integrator.layout
    ts.setRHSFunction(rhs.rhs, integrator.x.duplicate())
    if not integrator.adjoint:
        return
    J = _python_mat(integrator, layout.state_mat_sizes(), StateJacobianMat(rhs))
    ts.setRHSJacobian(rhs.linearize, J, J)
    if nparams:
        Jp = _python_mat(integrator, layout.param_mat_sizes(nparams), ParamJacobianMat(rhs))
        ts.setRHSJacobianP(rhs.linearize_params, Jp)


def _set_implicit_part(integrator, ts, nparams, linear_solver):
    """IFunction, IJacobian (and IJacobianP); returns the Newton/Krylov option defaults."""
    ifun, layout = integrator.ifun, integrator.layout
    ts.setIFunction(ifun.ifunction, integrator.x.duplicate())
    A = _python_mat(integrator, layout.state_mat_sizes(), IJacobianMat(ifun))
    ts.setIJacobian(ifun.ijacobian, A, A)
    if integrator.adjoint and nparams:
        Jp = _python_mat(integrator, layout.param_mat_sizes(nparams), IJacobianPMat(ifun))
        ts.setIJacobianP(ifun.ijacobian_params, Jp)
    defaults = dict(_NEWTON_TOLERANCES[SOLVER_DTYPE])
    pc = ts.getSNES().getKSP().getPC()
    if linear_solver == "exact":
        pc.setType(PETSc.PC.Type.PYTHON)
        integrator._contexts.append(BlockJacobianPC(ifun))
        pc.setPythonContext(integrator._contexts[-1])
        # Exact Newton directions: full steps, no line search (which would cost a jvp).
        defaults.update(ksp_type="preonly", snes_linesearch_type="basic")
    else:
        defaults.update(ksp_type="gmres", pc_type="none")
    return defaults
