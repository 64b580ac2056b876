"""One odeint call's arguments, checked and normalised into a Request: the user's func and y0
made a solved func and a packed tensor state (tuples, decreasing t: _solve/conventions.py),
the output times as floats, the method and its set-up, the step control, the tensors to
differentiate and the checkpointing policy. Every check is collective: a bad argument on one
rank is an InputError on every rank, and the ranks' calls must agree (the same method,
options, shapes after the batch dimension...)."""
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, List, Optional

import torch
from torch import nn

from ._distributed.collective import next_call, raise_collectively, resolve_comm
from ._solve import conventions
from ._solve.device import check_device
from ._solve.options import freeze
from ._solve.stepping import StepControl, fixed_steps
from .checkpointing import Checkpointing
from .errors import InputError
from .grid import Grid
from .methods import IMEX, METHODS, SETUP_OPTIONS, KenCarp, Method, SetupConfig, get_method

OPTION_KEYS = ("step_size", "first_step", "min_step", "max_step", "max_num_steps",
               "outputs", "event_tol") + SETUP_OPTIONS
OUTPUT_MODES = ("interpolate", "land")
# torchdiffeq's options with no counterpart here, and what to do instead.
_STEPS_LAND = ("with options['outputs']='land' the steps land on every time of t: add the "
               "times there")
REFUSED_OPTIONS = {
    "jump_t": _STEPS_LAND, "step_t": _STEPS_LAND, "grid_constructor": _STEPS_LAND,
    "perturb": "func is never called with perturb=: with options['outputs']='land' the steps "
               "land on every time of t, so a discontinuity placed there is met from both "
               "sides",
    "norm": "PETSc's TSAdapt measures the local error in its own weighted norm of rtol/atol",
    "safety": "use petsc_options={'ts_adapt_safety': ...}",
    "ifactor": "use petsc_options={'ts_adapt_clip': 'low,high'}",
    "dfactor": "use petsc_options={'ts_adapt_clip': 'low,high'}",
    "dtype": "the solver works in PETSc's precision (float64, or PNODE_PRECISION=single)",
}


@dataclass
class Request:
    """What the steps below odeint's face need of one call (this rank's view)."""
    user_func: Any               # func as given
    func: Any                    # func as solved: on the packed state, in increasing time
    y0: torch.Tensor             # the packed state (this rank's part)
    t: Any                       # t as given (its dtype, device and gradient)
    t_out: List[float]           # output times, increasing ([t0, inf] for an event solve)
    decreasing: bool             # t decreased (solved in -t)
    spec: Any                    # the structure of a tuple y0, or None
    method: Method
    control: StepControl
    setup: SetupConfig
    petsc_options: tuple         # frozen
    prefix: Optional[str]
    params: list                 # the tensors whose gradients the backward pass computes
    t_grad: bool                 # t requires grad
    needs_grad: bool             # the solve is differentiated
    policy: Checkpointing
    comm: Any                    # the communicator (petsc4py)
    grid: Optional[Grid]
    stats: Optional[dict]
    event_fn: Any
    event_tol: Optional[float]
    call: int = 0                # this odeint call's number (the same on every rank)
    shapes: tuple = ()           # every rank's packed y0 shape

    @property
    def adaptive(self):
        return self.method.adaptive and self.control.step_size is None


def normalise(func, y0, t, *, rtol, atol, method, options, comm, prefix, petsc_options,
              store_graphs, checkpointing, stats, grid, adjoint_params, event_fn):
    """The Request of an odeint call, its arguments checked on every rank (collective)."""
    if grid is not None:             # the same on every rank: raised directly
        if not isinstance(grid, Grid):
            raise InputError(f"grid must be a pnode_dist.Grid; got {type(grid).__name__}")
        if comm is not None:
            raise InputError("pass either comm or grid (the grid has its communicator), not both")
    comm = resolve_comm(comm) if grid is None else grid.comm
    request, error = None, None
    try:
        request = _checked(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                           comm=comm, prefix=prefix, petsc_options=petsc_options,
                           store_graphs=store_graphs, checkpointing=checkpointing, stats=stats,
                           grid=grid, adjoint_params=adjoint_params, event_fn=event_fn)
    except InputError as exc:
        error = str(exc)
    call = next_call(comm)
    shapes = raise_collectively(comm, error, InputError,
                                same=None if error else _signature(request, call),
                                share=None if error else tuple(request.y0.shape))
    return replace(request, call=call, shapes=shapes)


def _checked(func, y0, t, *, rtol, atol, method, options, comm, prefix, petsc_options,
             store_graphs, checkpointing, stats, grid, adjoint_params, event_fn):
    """This rank's Request (InputError where an argument is wrong)."""
    user_func, spec = func, None
    if not callable(func):
        raise InputError("func must be callable as func(t, y), typically an nn.Module")
    if event_fn is not None and not callable(event_fn):
        raise InputError("event_fn must be callable as event_fn(t, y)")
    _warn_callbacks(func)
    if conventions.needs_packing(y0):
        if grid is not None:
            raise InputError("with a grid, y0 is this rank's patch: a tensor")
        spec = conventions.Spec(y0)
        y0 = spec.pack(y0)
        func = conventions.wrapped("packed", func, spec)
    _check_y0(y0)
    t_out, decreasing = _times(t)
    if event_fn is not None and len(t_out) != 2:
        raise InputError(f"with event_fn, t holds two times as in torchdiffeq: the start, and "
                         f"a time after it (or before, to solve backward) that only gives "
                         f"the direction; got {len(t_out)} times")
    if decreasing:
        t_out = [-v for v in t_out]
        func = conventions.wrapped("reversed", func)
    method_obj = get_method(method)
    if func is not user_func and (method_obj.kind == "imex" or (
            isinstance(user_func, IMEX) and isinstance(method_obj, KenCarp))):
        raise InputError(f"method={method_obj.name!r} with an IMEX func takes a tensor y0 "
                         "and increasing t")
    control = _control(options, rtol, atol, store_graphs, method_obj)
    t_out = _event_times(event_fn, options, control, method_obj, t_out)
    setup = method_obj.setup(options or {}, func, y0)
    frozen = freeze(petsc_options)
    if prefix is not None and not (isinstance(prefix, str) and prefix.replace("_", "").isalnum()):
        raise InputError(f"prefix must be letters, digits and underscores such as 'block1_'; "
                         f"got {prefix!r}")
    params = _parameters(func, y0, t_out[0], adjoint_params,
                         module=isinstance(user_func, nn.Module))
    t_grad = isinstance(t, torch.Tensor) and t.requires_grad
    needs_grad = torch.is_grad_enabled() and (y0.requires_grad or t_grad or
                                              any(p.requires_grad for p in params))
    policy = _policy(checkpointing)
    if grid is not None:
        _check_grid(grid, func, y0, method_obj, setup)
    return Request(user_func=user_func, func=func, y0=y0, t=t, t_out=t_out,
                   decreasing=decreasing, spec=spec, method=method_obj, control=control,
                   setup=setup, petsc_options=frozen, prefix=prefix, params=params,
                   t_grad=t_grad, needs_grad=needs_grad, policy=policy, comm=comm, grid=grid,
                   stats=stats, event_fn=event_fn, event_tol=(options or {}).get("event_tol"))


def _event_times(event_fn, options, control, method, t_out):
    """The output times of the solve: [t0, inf] for an event solve (checked), else t_out (a
    fixed-step solve within max_num_steps)."""
    if event_fn is None and (options or {}).get("event_tol") is not None:
        raise InputError("options['event_tol'] is the tolerance of an event's time: it "
                         "needs event_fn")
    if event_fn is not None:
        if not (control.interpolate or control.step_size is not None or method.adaptive):
            raise InputError(
                f"events with method {method.name!r} need options['step_size']: the "
                f"step that crosses is retaken to end on the event")
        return [t_out[0], math.inf]             # until the event
    if not (method.adaptive and control.step_size is None):
        _check_step_count(t_out, control)
    return t_out


def _signature(r, call):
    """What every rank's call must agree on (compared collectively)."""
    policy = r.policy
    return {"phase": f"odeint call {call} ({'with' if r.needs_grad else 'without'} gradient)",
            "t": r.t_out, "method": r.method.name, "options": (r.control, r.setup.key),
            "prefix": r.prefix, "petsc_options": r.petsc_options,
            "checkpointing": (policy.schedule, policy.slots, policy.host_bytes,
                              policy.device_bytes, policy.disk_bytes, policy.memory,
                              policy.disk_dir is None),
            "the shape of y0 after its leading dimension": tuple(r.y0.shape[1:])
            if r.grid is None else r.grid.global_shape,
            "the dtype of y0": str(r.y0.dtype), "the device type of y0": r.y0.device.type,
            "the shapes of the tensors func differentiates":
                tuple(tuple(p.shape) for p in r.params),
            "the structure of y0": None if r.spec is None else r.spec.key,
            "whether t requires grad": r.t_grad}


def _times(t):
    """(output times as a list of floats, whether they decrease), checked. One time is
    allowed (the output is y0 itself); times must be strictly monotonic."""
    if isinstance(t, torch.Tensor):
        if t.dim() != 1:
            raise InputError(f"t must be one-dimensional; got shape {tuple(t.shape)}")
        values = [float(v) for v in t.detach().cpu().tolist()]
    else:
        try:
            values = [float(v) for v in t]
        except TypeError:
            raise InputError("t must be a 1-D tensor or a sequence of times") from None
    if not values:
        raise InputError("t must hold at least one time")
    if not all(math.isfinite(v) for v in values):
        raise InputError("t holds a non-finite value")
    decreasing = len(values) > 1 and values[1] < values[0]
    for a, b in zip(values, values[1:]):
        if not (b < a if decreasing else b > a):
            raise InputError(f"t must be strictly increasing or strictly decreasing; got {a:g} "
                             f"followed by {b:g}")
    return values, decreasing


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _output_mode(options, method, adaptive):
    """Whether the output times are interpolated (see odeint's options['outputs'])."""
    mode = options.get("outputs")
    if mode is None:
        return method.interpolates and adaptive
    if mode not in OUTPUT_MODES:
        raise InputError(f"options['outputs'] must be one of {list(OUTPUT_MODES)}; got {mode!r}")
    if mode == "interpolate" and not (method.interpolates and adaptive):
        usable = sorted(m.name for m in METHODS.values() if m.interpolates)
        raise InputError(f"options['outputs']='interpolate' needs adaptive steps (no "
                         f"step_size) and a method with a dense output of its order: "
                         f"{', '.join(usable)}; {method.name!r} steps onto the output times")
    return mode == "interpolate"


_INTERP_NOTE = ("options['interp'] (torchdiffeq's interpolation between fixed steps) has no "
                "effect here: fixed steps land on every output time and on events, and "
                "adaptive methods interpolate with their own dense output")


def _control(options, rtol, atol, store_graphs, method):
    options = dict(options or {})
    if "interp" in options:
        if options.pop("interp") not in ("linear", "cubic"):
            raise InputError("options['interp'] must be 'linear' or 'cubic' (torchdiffeq's; it "
                             "has no effect here)")
        warnings.warn(_INTERP_NOTE, UserWarning, stacklevel=6)
    unknown = sorted(set(options) - set(OPTION_KEYS), key=str)
    refused = [k for k in unknown if k in REFUSED_OPTIONS]
    if refused:
        raise InputError(f"options[{refused[0]!r}] (torchdiffeq's) is not supported: "
                         f"{REFUSED_OPTIONS[refused[0]]}")
    if unknown:
        raise InputError(f"unknown options {unknown}: valid keys are {list(OPTION_KEYS)}; PETSc "
                         "settings go in petsc_options={...} or on the command line")
    for key in ("step_size", "first_step", "event_tol"):
        v = options.get(key)
        if v is not None and not (_number(v) and math.isfinite(v) and v > 0):
            raise InputError(f"options[{key!r}] must be a positive number; got {v!r}")
    # TSAdapt's step limits; torchdiffeq's defaults (0, inf) mean none.
    low, high = options.get("min_step") or 0.0, options.get("max_step", math.inf)
    if not (_number(low) and math.isfinite(low) and low >= 0):
        raise InputError(f"options['min_step'] must be a number >= 0; got {low!r}")
    if not (_number(high) and high > 0):
        raise InputError(f"options['max_step'] must be a positive number; got {high!r}")
    if low > high:
        raise InputError(f"options['min_step'] {low:g} exceeds options['max_step'] {high:g}")
    steps = options.get("max_num_steps", StepControl.max_num_steps)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"options['max_num_steps'] must be a positive integer; got {steps!r}")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InputError(f"{name} must be a positive number; got {v!r}")
    if store_graphs is not None and not isinstance(store_graphs, bool):
        raise InputError(f"store_graphs must be True, False or None (the checkpointing policy "
                         f"decides); got {store_graphs!r}")
    limits = {k: float(v) for k, v in (("min_step", low), ("max_step", high))
              if 0 < v < math.inf}
    adaptive = method.adaptive and options.get("step_size") is None
    return StepControl(step_size=options.get("step_size"), first_step=options.get("first_step"),
                       max_num_steps=steps, rtol=float(rtol), atol=float(atol),
                       store_graphs=store_graphs,
                       interpolate=_output_mode(options, method, adaptive), **limits)


def _check_step_count(t_out, control):
    """A fixed-step solve longer than max_num_steps is refused before it takes a step."""
    steps = fixed_steps(t_out, control.step_size)
    if steps > control.max_num_steps:
        size = ("steps (one per interval of t)" if control.step_size is None else
                f"steps of options['step_size']={control.step_size:g}")
        count = f"{steps:.4g}" if steps < math.inf else "more than 1e308"
        raise InputError(f"t spans {count} {size}, more than options['max_num_steps']="
                         f"{control.max_num_steps}: raise max_num_steps, or take larger steps")


def _parameters(func, y0, t0, adjoint_params=None, module=True):
    """The tensors whose gradients the backward pass computes: `adjoint_params` when given,
    else a module's parameters (and buffers) that require grad (`module`: the user's func is
    an nn.Module; func may be our wrapper around it), else, for a plain function or lambda,
    the leaf tensors requiring grad that func's autograd graph reaches (found by one
    evaluation at t0): tensors a closure captures get their gradients as with backprop."""
    if adjoint_params is not None:
        params = list(adjoint_params)
        bad = [type(p).__name__ for p in params if not isinstance(p, torch.Tensor)]
        if bad:
            raise InputError(f"adjoint_params must be tensors; got {bad[0]}")
        params = [p for p in params if p.requires_grad]
    elif module:
        params = [p for p in list(func.parameters()) + list(func.buffers()) if p.requires_grad]
    else:
        params = _captured_leaves(func, y0, t0)
    unique = []
    for p in params:
        if all(p is not q for q in unique):
            unique.append(p)
    for p in unique:
        if p.dtype != y0.dtype:
            raise InputError(f"y0 is {y0.dtype} but func has {p.dtype} parameters: use "
                             f"y0.to({p.dtype}) or func.to({y0.dtype})")
        if p.device != y0.device:
            raise InputError(f"y0 is on {y0.device} but func has parameters on {p.device}: move "
                             "both to pnode_dist.rank_device()")
    return unique


def _captured_leaves(func, y0, t0):
    """Leaf tensors requiring grad that func(t0, y0) depends on, in the order its graph
    reaches them (the same on every rank: same code)."""
    y = y0.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = func(torch.tensor(t0, dtype=y0.dtype, device=y0.device), y)
    except Exception as exc:  # noqa: BLE001 - reported on every rank
        raise InputError(f"func raised {type(exc).__name__} when first evaluated at t={t0:g} "
                         f"(to find the tensors it differentiates): {exc}") from exc
    leaves, seen = [], set()
    stack = [out.grad_fn] if isinstance(out, torch.Tensor) else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)          # an AccumulateGrad node
        if leaf is not None:
            if leaf is not y:
                leaves.append(leaf)
            continue
        stack.extend(reversed([n for n, _ in node.next_functions]))
    return leaves


_warned_callbacks = set()


def _warn_callbacks(func):
    """torchdiffeq's step callbacks that are not called here: say so, once per func type."""
    found = [name for name in conventions.NOT_CALLED if callable(getattr(func, name, None))]
    if found and type(func) not in _warned_callbacks:
        _warned_callbacks.add(type(func))
        warnings.warn(f"{type(func).__name__}.{found[0]} (a torchdiffeq step callback) is not "
                      "called by pnode_dist: the backward pass is PETSc's discrete adjoint, "
                      "and rejected steps are retried inside PETSc (stats['rejected_steps'] "
                      "counts them); callback_step and callback_accept_step are called",
                      UserWarning, stacklevel=6)


def _check_y0(y0):
    """A (packed) tensor state: dtype, device, finite values."""
    if y0.dtype not in (torch.float32, torch.float64):
        raise InputError(f"y0 must be float32 or float64; got {y0.dtype}")
    check_device(y0)
    if not bool(torch.isfinite(y0).all()):
        raise InputError("y0 holds NaN or Inf values; check the data or the layer before the "
                         "ODE block")


def _policy(checkpointing):
    if checkpointing is None:
        return Checkpointing()
    if not isinstance(checkpointing, Checkpointing):
        raise InputError("checkpointing must be a pnode_dist.Checkpointing(...) policy; got "
                         f"{type(checkpointing).__name__}")
    return checkpointing


def _check_grid(grid, func, y0, method, setup):
    """A grid solve's extra conditions (InputError on the rank where one fails)."""
    if y0.device.type != "cpu":
        raise InputError("grids keep their fields in host memory in this version: move func and "
                         "the patch to the CPU")
    if tuple(y0.shape) != grid.local_shape:
        raise InputError(f"with a grid, y0 is this rank's patch of shape {grid.local_shape} (of "
                         f"the field {grid.global_shape}); got {tuple(y0.shape)}: use "
                         "grid.scatter(field)")
    if not method.on_grids or setup.linear_solver == "exact" or setup.mass is not None:
        raise InputError("on a grid, implicit methods use the matrix-free GMRES Newton "
                         "(linear_solver='gmres', no mass matrix); arkimex is not supported yet")
    grid.check_receptive_field(func, y0.dtype)
