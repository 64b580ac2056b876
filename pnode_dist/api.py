"""Public API: odeint (torchdiffeq's signature) and ODEBlock, with argument checking whose
errors say what to do. Every check is collective: a bad argument on one rank raises on all."""
import collections
import math
import warnings
from dataclasses import replace as dc_replace
from types import SimpleNamespace

import torch
from torch import nn

from ._distributed.collective import next_call, raise_collectively, resolve_comm
from ._distributed.layout import BatchLayout
from ._reversal.autograd import OdeintFunction
from ._reversal.event_time import reroute
from ._reversal.strategies import ReplayAll, solve_without_gradient
from ._solve import conventions, dense
from ._solve.device import SOLVER_DTYPE, check_device
from ._solve.events import EventLocator
from ._solve.integrator import IntegratorPool, StepControl
from ._solve.lifetime import at_finalize
from ._solve.options import freeze
from .checkpointing import Checkpointing
from .errors import InputError
from .grid import Grid, GridLayout
from .methods import METHODS, SETUP_OPTIONS, get_method

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


_CACHE_SIZE = 32
# Integrator pools by (id(func), configuration), least recently used first. A pool holds func
# itself, so an id cannot be reused by another object while its entry lives; the bound keeps
# PETSc objects of models that are gone from piling up.
_pools = collections.OrderedDict()


@at_finalize
def _close_grid_pools():
    """Pools on a DMDA are freed before PETSc finalizes (lifetime.py's rule 2)."""
    for key, pool in list(_pools.items()):
        if isinstance(pool.layout, GridLayout):
            pool.close()
            del _pools[key]


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
        warnings.warn(_INTERP_NOTE, UserWarning, stacklevel=4)
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
    if not isinstance(steps, int) or steps < 1:
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
                      UserWarning, stacklevel=4)


def _check_y0(y0):
    """A (packed) tensor state: dtype, device, finite values."""
    if y0.dtype not in (torch.float32, torch.float64):
        raise InputError(f"y0 must be float32 or float64; got {y0.dtype}")
    check_device(y0)
    if not bool(torch.isfinite(y0).all()):
        raise InputError("y0 holds NaN or Inf values; check the data or the layer before the "
                         "ODE block")


def _pool(func, layout, method, adaptive, prefix, frozen_options, params, dtype, setup):
    """The cached IntegratorPool of this configuration (created on first use)."""
    key = (id(func), layout.key, method.name, adaptive, prefix, frozen_options, dtype,
           tuple(id(p) for p in params), setup.key)
    pool = _pools.get(key)
    if pool is None:
        pool = IntegratorPool(layout, method, func, params, dtype, prefix, frozen_options,
                              adaptive, setup)
        _pools[key] = pool
        while len(_pools) > _CACHE_SIZE:
            _pools.popitem(last=False)[1].close()
    _pools.move_to_end(key)
    return pool


def _policy(checkpointing):
    if checkpointing is None:
        return Checkpointing()
    if not isinstance(checkpointing, Checkpointing):
        raise InputError("checkpointing must be a pnode_dist.Checkpointing(...) policy; got "
                         f"{type(checkpointing).__name__}")
    return checkpointing


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, comm=None,
           prefix=None, petsc_options=None, store_graphs=None, checkpointing=None, stats=None,
           grid=None, adjoint_params=None, event_fn=None):
    """Solve dy/dt = func(t, y) from y(t[0]) = y0; returns y at every time of t,
    shape [len(t), *y0.shape]. Same signature and meaning as torchdiffeq.odeint (y0 may be a
    tuple of tensors, t increasing or decreasing; a t requiring grad gets dL/dt as
    torchdiffeq's odeint_adjoint defines it, see adjoint.time_gradient), plus:

    comm:          communicator over which the batch is split (default: PETSc's world; 'self'
                   for a rank-local solve). Each rank passes its own shard of the batch as y0.
    prefix:        PETSc options prefix of this solve's TS (e.g. 'block1_' -> -block1_ts_rk_type).
    petsc_options: dict of PETSc options (without prefix) such as {'ts_rk_type': '5bs'};
                   the command line overrides them.
    options:       step_size (fixed steps, at most this long, landing on every output time),
                   first_step (default: chosen from f at t[0] for explicit methods),
                   min_step, max_step (adaptive: TSAdapt's limits), max_num_steps;
                   outputs: 'interpolate' (the default for dopri5, tsit5, bosh3,
                   adaptive_heun, fehlberg2: steps follow the error control alone, each output time is
                   evaluated by the method's dense output, its gradient exact through it) or
                   'land' (every output time ends a step: right when f jumps there; the
                   default for the other methods); for implicit methods linear_solver
                   ('gmres' or 'exact'),
                   mass ([d, d]), theta (method='theta') and tableau (method='arkimex').
    store_graphs:  keep f's autograd graph of every stage from the forward solve, so that the
                   adjoint does not re-evaluate f (about 1/4 less time; memory grows with the
                   number of stages like backprop's). None (default): the checkpointing
                   policy keeps them when they fit its budget; False: never. Gradients are
                   identical either way.
    checkpointing: a pnode_dist.Checkpointing policy: what the forward keeps for the backward
                   pass (schedule, slots, byte budgets, disk directory). By default, per solve,
                   the fastest strategy whose memory fits half the free memory (see
                   Checkpointing: 'auto').
    grid:          a pnode_dist.Grid: y0 is this rank's patch of a field on a DMDA-distributed
                   grid (instead of a batch shard), func is written for whole fields and
                   evaluated on patches with halos (see pnode_dist.grid).
    adjoint_params: the tensors to differentiate (torchdiffeq's keyword). Default: func's
                   parameters (and buffers) that require grad if func is an nn.Module, else
                   every leaf tensor requiring grad that func's graph reaches (tensors a
                   lambda or closure captures), found by one evaluation of func at t[0].
    event_fn:      a terminating event (torchdiffeq's): event_fn(t, y) -> a tensor of one or
                   several event functions (y this rank's part, in y0's structure); t must
                   hold two times, the start and one giving the direction. The solve runs
                   until the first event function reaches zero from its sign at the start
                   (located on the dense output to options['event_tol'] in time, default
                   round-off) and returns (event_t, solution [y0, y(event_t)]). The solution's
                   gradient treats event_t as fixed and event_t has none, as torchdiffeq's:
                   odeint_event adds the event time's dependence. Methods with a dense output
                   (dopri5, tsit5, bosh3, adaptive_heun, fehlberg2), adaptive steps.
    stats:         a dict that receives this rank's counts: steps, rejected_steps,
                   newton_iterations, linear_iterations, f_evaluations, jvps, vjps... of the
                   forward solve,
                   adjoint_* counts once the backward pass ran; checkpoint_schedule (the
                   strategy), memory_budget, memory_estimate and memory_used (bytes held at
                   most, counted at the measured sizes), spilled_at_step (a solve that
                   outgrew its plan), and for checkpoints recomputed_steps, bytes per tier,
                   disk read/write seconds.
    The solver state has PETSc's precision (float64, or float32 with PNODE_PRECISION=single)
    and lives where y0 does: on this rank's GPU (pnode_dist.rank_device()) in CUDA Vecs. func
    is evaluated in its own dtype (a cast per call if it differs from the solver's).
    """
    return _odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, comm=comm,
                   prefix=prefix, petsc_options=petsc_options, store_graphs=store_graphs,
                   checkpointing=checkpointing, stats=stats, grid=grid,
                   adjoint_params=adjoint_params, event_fn=event_fn)


def _odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, comm=None,
            prefix=None, petsc_options=None, store_graphs=None, checkpointing=None, stats=None,
            grid=None, adjoint_params=None, event_fn=None, event_out=None):
    """odeint; with event_out (a dict) an event solve leaves its slope there."""
    if grid is not None:             # the same on every rank: raised directly
        if not isinstance(grid, Grid):
            raise InputError(f"grid must be a pnode_dist.Grid; got {type(grid).__name__}")
        if comm is not None:
            raise InputError("pass either comm or grid (the grid has its communicator), not both")
    comm = resolve_comm(comm) if grid is None else grid.comm
    error, signature, method_obj, control, t_out, frozen = None, None, None, None, None, ()
    setup, needs_grad, spec, user_func, decreasing = None, False, None, func, False
    try:
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
        if method_obj.kind == "imex" and func is not user_func:
            raise InputError("method='arkimex' takes a tensor y0 and increasing t")
        control = _control(options, rtol, atol, store_graphs, method_obj)
        if event_fn is not None:
            if not (control.interpolate or control.step_size is not None
                    or method_obj.adaptive):
                raise InputError(
                    f"events with method {method_obj.name!r} need options['step_size']: the "
                    f"step that crosses is retaken to end on the event")
            t_out = [t_out[0], math.inf]             # until the event
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
    except InputError as exc:
        error = str(exc)
    call = next_call(comm)
    if error is None:
        signature = {"phase": f"odeint call {call} "
                              f"({'with' if needs_grad else 'without'} gradient)",
                     "t": t_out, "method": method_obj.name, "options": (control, setup.key),
                     "prefix": prefix, "petsc_options": frozen,
                     "checkpointing": (policy.schedule, policy.slots, policy.host_bytes,
                                       policy.device_bytes, policy.disk_bytes, policy.memory,
                                       policy.disk_dir is None),
                     "the shape of y0 after its leading dimension": tuple(y0.shape[1:])
                     if grid is None else grid.global_shape,
                     "the dtype of y0": str(y0.dtype), "the device type of y0": y0.device.type,
                     "the shapes of the tensors func differentiates":
                         tuple(tuple(p.shape) for p in params),
                     "the structure of y0": None if spec is None else spec.key,
                     "whether t requires grad": isinstance(t, torch.Tensor) and t.requires_grad}
    shapes = raise_collectively(comm, error, InputError, same=signature,
                                share=tuple(y0.shape) if error is None else None)
    if len(t_out) == 1:                  # torchdiffeq's convention: y0 itself, as [1, ...]
        return _restore(y0.unsqueeze(0), spec)
    adaptive = method_obj.adaptive and control.step_size is None
    if grid is None:
        layout = BatchLayout(comm, y0.shape, shapes, device=y0.device)
        solved_func, y_start = func, y0
    else:
        layout, solved_func, y_start = grid.layout, grid.wrap(func), grid.to_vec_order(y0)
    pool = _pool(solved_func, layout, method_obj, adaptive, prefix, frozen, params, y0.dtype,
                 setup)
    time_sign = -1.0 if decreasing else 1.0
    observers = conventions.StepCallbacks.of(
        user_func, lambda y: _restore(y if grid is None else grid.from_vec_order(y), spec),
        time_sign, y0.dtype)
    locator = None
    if event_fn is not None:
        locator = EventLocator(
            event_fn, lambda y: _restore(y if grid is None else grid.from_vec_order(y), spec),
            time_sign, layout.comm, y0.dtype, (options or {}).get("event_tol"))
        if _event_at_start(locator, t_out[0], y_start, comm) == 0:
            return (torch.as_tensor(t, dtype=getattr(t, "dtype", None))[0].detach(),
                    _restore(torch.stack([y0, y0]), spec))
        if control.interpolate:
            observers = tuple(observers) + (locator,)
        else:
            retake = pool if not adaptive else _pool(solved_func, layout, method_obj, False,
                                                     prefix, frozen, params, y0.dtype, setup)
            t_out, control = _land_on_event(pool, retake, locator, y_start, t_out[0], control,
                                            solved_func)
            pool = retake
    problem = SimpleNamespace(params=params, t_out=t_out, control=control, stats=stats,
                              strategy=lambda: policy.strategy(pool, t_out, control, y_start),
                              replay=lambda y: ReplayAll(pool, y), comm=comm, call=call,
                              func=solved_func, time_sign=time_sign, observers=observers,
                              gradient_comm=layout.gradient_comm, method=method_obj.name,
                              distributed=layout.nranks > 1 or grid is not None,
                              event=locator is not None)
    if needs_grad:
        outputs = OdeintFunction.apply(problem, y_start, t if t_grad else None, *params)
    else:
        outputs = solve_without_gradient(pool, y_start.detach(), t_out, control, observers,
                                         stats).to(y0.dtype)
    if locator is not None and len(outputs) > 2:     # a retaken step: [t0, ..., t_n, event]
        outputs = outputs[[0, -1]]
    solution = _restore(outputs if grid is None else grid.from_vec_order(outputs), spec)
    if locator is None:
        return solution
    if stats is not None:
        stats["event_evaluations"] = locator.evaluations
    if event_out is not None:            # for odeint_event: the dense output's d/dt there
        event_out["slope"] = locator.to_user(locator.slope.to(y0.dtype))
        event_out["mpi"] = layout.comm.tompi4py() if layout.nranks > 1 else None
    like = t if isinstance(t, torch.Tensor) else torch.tensor(0.0, dtype=torch.float64)
    event_t = torch.tensor(time_sign * locator.time, dtype=like.dtype, device=like.device)
    return event_t, solution


def _land_on_event(pool, retake, locator, y0, t0, control, func):
    """Without a dense output: a solve without gradient (on `pool`) stops after the step over
    which the event functions crossed zero, and that step is retaken from its start (on
    `retake`, a fixed-step pool) with the sizes the locator tries (PETSc's own step of the
    method: any family) until it ends on the event. Returns the output times and StepControl
    of the differentiable solve that takes the same steps and then the shortened one (fixed
    steps: [t0, t_n, event]; adaptive: every step time, one step each); the locator gets the
    event time and the slope of the shortened step's end in its size: exact for explicit
    methods (torch), by central differences of the retaken step for the implicit ones."""
    solve_without_gradient(pool, y0.detach(), [t0, math.inf], control, (locator,))
    start, end, y_start, times = locator.crossing
    t_start = start[0]

    def step_to(s):
        return solve_without_gradient(retake, y_start, [t_start, s],
                                      dc_replace(control, step_size=s - t_start))[1]

    t_event = locator.root(start, end, step_to)
    if pool.method.kind == "explicit":
        dtype = pool.dtype

        def f(time, y):
            return func(time.to(dtype), y.to(dtype)).to(SOLVER_DTYPE)
        slope = dense.step_slope(f, t_start, y_start, t_event - t_start, pool.method.tableau)
    else:
        delta = 1e-4 * (end[0] - t_start)
        if t_event - delta > t_start:
            slope = (step_to(t_event + delta) - step_to(t_event - delta)) / (2 * delta)
        else:
            slope = (4 * step_to(t_event + delta) - step_to(t_event + 2 * delta)
                     - 3 * step_to(t_event)) / (2 * delta)
    locator.time, locator.slope = t_event, slope
    if control.step_size is not None:
        return ([t0, t_start, t_event] if t_start > t0 else [t0, t_event]), control
    times = times + [t_event]
    widest = max(b - a for a, b in zip(times, times[1:]))
    return times, dc_replace(control, step_size=widest * (1 + 1e-9))


def _event_at_start(locator, t0, y0, comm):
    """The event combination at the start (collective); event_fn's failure there is an error
    on every rank."""
    try:
        return locator.start(t0, y0.detach().to(SOLVER_DTYPE))
    except Exception as exc:
        raise_collectively(comm, f"event_fn failed at t[0]: {type(exc).__name__}: {exc}",
                           InputError, cause=exc)


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=None,
                 **kwargs):
    """Solve from t0 until event_fn(t, y) reaches zero (torchdiffeq's odeint_event, same
    signature); returns (event_t, solution [y0, y(event_t)]) whose gradients include the event
    time's dependence on y0, func's parameters, t0 and the tensors event_fn uses (the
    implicit-function relation at the event, with the dense output's own slope there: exact for
    the discrete solve). kwargs go to the solve (rtol, atol, method, options, comm, ...).
    odeint_interface: pnode_dist.odeint by default; another odeint (torchdiffeq's) works too,
    with f at the event for the slope, as torchdiffeq. On several ranks every rank's loss must
    use the event's outputs (the event time's backward pass is one allreduce). Second
    derivatives through the event time are refused."""
    t0 = torch.as_tensor(t0)
    t = torch.cat([t0.reshape(-1), t0.reshape(-1).detach() + (-1.0 if reverse_time else 1.0)])
    return _through_event(func, y0, t, event_fn, odeint_interface, kwargs)


def _through_event(func, y0, t, event_fn, interface, kwargs):
    """(event_t, solution) of an event solve over t, with the event time's gradients."""
    found = {}
    if interface in (None, odeint, odeint_adjoint):
        event_t, solution = _odeint(func, y0, t, event_fn=event_fn, event_out=found, **kwargs)
    else:
        event_t, solution = interface(func, y0, t, event_fn=event_fn, **kwargs)
    state = tuple(s[-1] for s in solution) if isinstance(solution, tuple) else solution[-1]
    slope = found.get("slope")
    if slope is None:
        with torch.no_grad():
            slope = func(event_t, state)
    event_t, state = reroute(event_fn, event_t, state, slope, found.get("mpi"))
    if isinstance(solution, tuple):
        solution = tuple(torch.cat([s[:-1], e[None]]) for s, e in zip(solution, state))
    else:
        solution = torch.cat([solution[:-1], state[None]])
    return event_t, solution


def _restore(outputs, spec):
    """Outputs (or one state: no leading time dimension) in the user's structure."""
    if spec is None:
        return outputs
    return spec.unpack(outputs, lead=outputs.shape[:-2])


def odeint_adjoint(func, y0, t, *, adjoint_params=None, adjoint_rtol=None, adjoint_atol=None,
                   adjoint_method=None, adjoint_options=None, **kwargs):
    """torchdiffeq.odeint_adjoint's signature, so that `from pnode_dist import odeint_adjoint
    as odeint` works unchanged. It is odeint: pnode_dist's backward pass is always the discrete
    adjoint of the forward solve (exact gradients, memory bounded by checkpointing), so the
    adjoint_rtol/atol/method/options of torchdiffeq's continuous adjoint are accepted and have
    no effect: the adjoint reuses the forward's steps and tableau. With event_fn, the event
    time has its gradient as in torchdiffeq's odeint_adjoint (odeint_event's)."""
    if kwargs.get("event_fn") is not None:
        event_fn = kwargs.pop("event_fn")
        return _through_event(func, y0, t, event_fn, None,
                              dict(kwargs, adjoint_params=adjoint_params))
    return odeint(func, y0, t, adjoint_params=adjoint_params, **kwargs)


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


def _last(ys):
    """The state at the last time, for a tensor or a (nested) tuple state."""
    return tuple(_last(y) for y in ys) if isinstance(ys, tuple) else ys[-1]


class ODEBlock(nn.Module):
    """A network layer y -> y(t1) with dy/dt = func(t, y), y(t0) = y; see odeint for the
    keyword arguments. `return_all=True` returns the states at every time of `t`; `stats` holds
    the counts of the last forward (and, once it ran, backward) pass."""

    def __init__(self, func, t=(0.0, 1.0), *, method=None, rtol=1e-7, atol=1e-9, options=None,
                 comm=None, prefix=None, petsc_options=None, store_graphs=None,
                 checkpointing=None, return_all=False, grid=None):
        super().__init__()
        self.func = func
        self.register_buffer("t", torch.as_tensor(t, dtype=torch.float64), persistent=False)
        self.kwargs = dict(method=method, rtol=rtol, atol=atol, options=options, comm=comm,
                           prefix=prefix, petsc_options=petsc_options, store_graphs=store_graphs,
                           checkpointing=checkpointing, grid=grid)
        self.return_all = return_all
        self.stats = {}              # this rank's statistics of the last solve (see odeint)

    def forward(self, y0):
        self.stats = {}
        ys = odeint(self.func, y0, self.t, stats=self.stats, **self.kwargs)
        return ys if self.return_all else _last(ys)

    def extra_repr(self):
        return f"t={self.t.tolist()}, method={self.kwargs['method'] or 'dopri5'}"
