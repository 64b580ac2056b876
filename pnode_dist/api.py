"""Public API: :func:`odeint` (torchdiffeq's signature), :func:`odeint_adjoint`,
:func:`odeint_event` and the :class:`ODEBlock` layer, with argument checking whose errors say
what to do. Every check is collective: a bad argument on one rank raises on all."""
import collections
import math
import warnings
from dataclasses import replace as dc_replace
from types import SimpleNamespace

import torch
from torch import nn

from ._distributed.collective import next_call, raise_collectively, resolve_comm
from ._distributed.layout import BatchLayout
from ._distributed.startup import MPI
from ._reversal.autograd import OdeintFunction
from ._reversal.event_time import reroute
from ._reversal.strategies import ReplayAll, solve_without_gradient
from ._solve import conventions, dense
from ._solve.device import SOLVER_DTYPE, check_device
from ._solve.events import EventLocator
from ._solve.integrator import IntegratorPool, StepControl, fixed_steps
from ._solve.lifetime import at_finalize
from ._solve.options import freeze
from .checkpointing import Checkpointing
from .errors import InputError, SolverError
from .grid import Grid, GridLayout
from .methods import AUTO_EXACT_SIZE, IMEX, METHODS, SETUP_OPTIONS, KenCarp, get_method

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
                      UserWarning, stacklevel=4)


def _check_y0(y0):
    """A (packed) tensor state: dtype, device, finite values."""
    if y0.dtype not in (torch.float32, torch.float64):
        raise InputError(f"y0 must be float32 or float64; got {y0.dtype}")
    check_device(y0)
    if not bool(torch.isfinite(y0).all()):
        raise InputError("y0 holds NaN or Inf values; check the data or the layer before the "
                         "ODE block")


_FLOAT32_NOTE = (
    "pnode_dist: this float32 state is integrated in float64, the precision of the PETSc "
    "build in use: the solver's state, checkpoints and work vectors take twice the memory of "
    "float32 and each call of func a cast. For a float32 solver, install the single-precision "
    "build (`make setup-single`) and run with PNODE_PRECISION=single in the environment.")
_warned_float32 = []


def _note_precision(dtype):
    """Warn once per process when float32 states are solved in float64."""
    if dtype == torch.float32 and SOLVER_DTYPE == torch.float64 and not _warned_float32:
        _warned_float32.append(True)
        warnings.warn(_FLOAT32_NOTE, UserWarning, stacklevel=4)


def _samples_independent(func, y0, t0):
    """Whether func's output for the other samples stays bitwise the same when sample 0 of y0
    changes (batch norm in training mode, attention over the batch... couple them). One batch
    of one sample is independent; an exception says no (the solve reports it)."""
    if y0.shape[0] < 2:
        return True
    bumped = y0.detach().clone()
    bumped[0] += torch.randn(bumped[0].shape, generator=torch.Generator().manual_seed(0),
                             dtype=bumped.dtype).to(bumped.device) * (1 + bumped[0].abs())
    time = torch.tensor(t0, dtype=y0.dtype, device=y0.device)
    try:
        with torch.no_grad():
            before, after = func(time, y0.detach()), func(time, bumped)
        return bool(torch.equal(before[1:], after[1:]))
    except Exception:            # noqa: BLE001 - the solve itself raises it, collectively
        return False


def resolve_setup(setup, method, func, y0, t0, layout):
    """linear_solver='auto' made 'exact' (the per-sample Newton) where it applies and is cheap:
    a batch layout, at most AUTO_EXACT_SIZE elements per sample, and a func whose samples are
    independent on every rank; 'gmres' otherwise. Collective (one allreduce)."""
    implicit = method.implicit_func(func)
    if setup.linear_solver != "auto" or implicit is None:
        return setup
    exact = (not layout.evaluates_collectively and y0.dim() >= 1
             and y0[0].numel() <= AUTO_EXACT_SIZE and _samples_independent(implicit, y0, t0))
    if layout.nranks > 1:
        exact = bool(layout.comm.tompi4py().allreduce(int(exact), op=MPI.MIN))
    return dc_replace(setup, linear_solver="exact" if exact else "gmres")


def _pool(func, layout, method, adaptive, prefix, frozen_options, params, dtype, setup, y0,
          t0):
    """The cached IntegratorPool of this configuration (created on first use; its linear
    solver resolved then)."""
    key = (id(func), layout.key, method.name, adaptive, prefix, frozen_options, dtype,
           tuple(id(p) for p in params), setup.key)
    pool = _pools.get(key)
    if pool is None:
        pool = IntegratorPool(layout, method, func, params, dtype, prefix, frozen_options,
                              adaptive, resolve_setup(setup, method, func, y0, t0, layout))
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
    """Solve dy/dt = func(t, y) from y(t[0]) = y0 and return y at every time of ``t``.

    Same signature and meaning as ``torchdiffeq.odeint``, with more keyword arguments: the
    forward pass is a PETSc ``TS`` solve and the backward pass PETSc's discrete adjoint, so
    gradients equal, to round-off, backpropagation through the same discrete steps (adaptive
    steps and interpolated outputs included). Each rank passes its own shard of the batch as
    ``y0`` (shards may be uneven), or its patch of a field with ``grid``; the parameter
    gradients are summed over all ranks in one allreduce per backward pass. Every argument check
    is collective: a bad argument on one rank raises on all.

    Parameters
    ----------
    func : callable
        ``func(t, y)``, typically an ``nn.Module``; returns dy/dt in the structure of ``y``.
        For ``method='arkimex'`` a :class:`pnode_dist.IMEX` pair (for ``kencarp3/4/5``
        one runs the whole ARK pair). torchdiffeq's step callbacks on it are called in the
        forward solve only (not in the re-runs of a backward pass):
        ``callback_step(t0, y0, dt)`` before every step and ``callback_accept_step(t0, y0, dt)``
        after it, with the step's start in your time and state structure (this rank's part);
        a step PETSc rejects and retries is one ``callback_step``. ``callback_reject_step`` and
        the ``*_adjoint`` callbacks are not called (a warning names them).
    y0 : Tensor or tuple of Tensor
        This rank's part of the initial state, float32 or float64, finite, on the CPU or on
        this rank's GPU (:func:`pnode_dist.rank_device`). A (nested) tuple of tensors works as
        in torchdiffeq (``func`` then returns the same structure; the leaves share their
        leading, batch dimension, which is split over the ranks); a 0-d tensor too.
    t : Tensor or sequence of float
        Output times, 1-D, strictly increasing or strictly decreasing (solved as s = -t). One
        time returns ``y0[None]``. A ``t`` that requires grad gets dL/dt as torchdiffeq's
        ``odeint_adjoint`` defines it, that of the ODE the solve approximates (not of the
        discrete steps): dL/dt_i = <dL/dy_i, f(t_i, y_i)> for i >= 1 and
        dL/dt_0 = -<a_0, f(t_0, y0)>, a_0 being the adjoint at t_0 without the direct dL/dy_0
        term; summed over the ranks.
    rtol, atol : float, optional
        Tolerances of the adaptive step control (PETSc TSAdapt with torchdiffeq's step-size
        rule: the error of a step is weighed by ``atol + rtol * max(|y0|, |y1|)`` per element).
    method : str, optional
        Explicit ``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4`` (classic), ``rk4_38``
        (the 3/8 rule: torchdiffeq's ``rk4``); adaptive ``adaptive_heun``, ``fehlberg2``,
        ``bosh3``, ``dopri5`` (the default), ``tsit5``, ``verner6``, ``verner7``, ``verner8``;
        implicit, for stiff problems, adaptive ``kencarp3``, ``kencarp4``, ``kencarp5``
        (L-stable, with an embedded error estimate: the ones to pick), ``beuler``, ``cn``,
        ``theta`` (adaptive; cn with the trapezoidal rule's own error estimate), ``sdirk2``,
        ``trbdf2`` (fixed steps); IMEX ``arkimex``. torchdiffeq's ``implicit_euler``,
        ``trapezoid``, ``implicit_midpoint`` are the same schemes as ``beuler``, ``cn``,
        ``theta``; ``dopri8`` runs ``verner8`` (a warning says so once). Any other PETSc RK tableau: ``-[prefix]ts_rk_type`` on the
        command line or in ``petsc_options``.
    options : dict, optional
        Step and solver options:

        - ``step_size``: fixed steps of at most this length; every interval between output
          times is split into equal steps that land exactly on every output time (torchdiffeq
          instead interpolates). Without it the adaptive methods (and the implicit ``beuler``,
          ``cn``, ``theta``, ``kencarp3/4/5``, ``arkimex``) adapt the step to ``rtol``/``atol``
          and the fixed-step ones take one step per output interval.
        - ``first_step``: the first step of an adaptive solve (default: chosen from f at t[0]
          by two evaluations; without a mass matrix for implicit methods).
        - ``min_step``, ``max_step``: TSAdapt's step limits; ``max_num_steps`` (default
          1,000,000).
        - ``outputs``: ``'interpolate'`` (the default for ``dopri5``, ``tsit5``, ``bosh3``,
          ``adaptive_heun``, ``fehlberg2``, adaptive steps only) lets the steps follow the error
          control alone and evaluates each output time by the method's dense output, its
          gradient exact through it; ``'land'`` (the default for the other methods) ends a step
          on every output time: choose it when f jumps there.
        - ``event_tol``: see Notes.
        - Implicit methods: ``linear_solver`` (``'auto'``, the default: ``'exact'`` for
          batches of samples of at most 32 elements that func keeps independent, else
          ``'gmres'``; ``'gmres'``, matrix-free; ``'exact'``, per-sample Jacobian blocks
          LU-factored; ``stats['linear_solver']`` says which ran), ``mass`` (a [d, d] matrix
          M for M y' = f with a state [batch, d]; ``beuler``, ``cn``, ``theta``; M may be
          singular: an index-1 DAE), ``theta`` (``method='theta'``, in (0, 1], default 0.5) and
          ``tableau`` (``method='arkimex'``: ``'a2'``, ``'l2'``, ``'3'`` (default), ``'4'``...).
        - torchdiffeq's ``interp`` is accepted with no effect (a warning says so); its
          ``jump_t``, ``step_t``, ``grid_constructor``, ``perturb``, ``norm``, ``safety``,
          ``ifactor``, ``dfactor`` and ``dtype`` are refused with what to do instead.
    comm : optional
        Communicator over which the batch is split: None (PETSc's world), ``'world'``,
        ``'self'`` (a rank-local solve), or an mpi4py or petsc4py communicator.
    prefix : str, optional
        PETSc options prefix of this solve's TS (``'block1_'`` -> ``-block1_ts_rk_type``);
        letters, digits and underscores.
    petsc_options : dict, optional
        PETSc options without dash or prefix, such as ``{'ts_rk_type': '5bs'}``; the command
        line overrides them.
    store_graphs : bool or None, optional
        Keep f's autograd graph of every stage from the forward solve, so that the adjoint
        does only vector-Jacobian products instead of re-evaluating f first (about 1/4 less
        time; memory grows with steps x stages like backprop's). None (default): the
        checkpointing policy keeps them when they fit its budget; True: always; False: never.
        Gradients are identical either way.
    checkpointing : Checkpointing, optional
        A :class:`pnode_dist.Checkpointing` policy: what the forward keeps for the backward pass
        (schedule, slots, byte budgets, disk directory). By default, per solve, the fastest
        strategy whose memory fits half the free memory (``schedule='auto'``).
    stats : dict, optional
        Receives this rank's counts of the forward solve: ``steps``, ``rejected_steps``,
        ``newton_iterations``, ``linear_iterations``, ``f_evaluations``, ``jvps``, ``vjps``,
        ``interpolated_outputs``...; ``adjoint_*`` counts once the backward pass ran;
        ``checkpoint_schedule`` (the strategy), ``memory_budget``, ``memory_estimate`` (the
        plan's bytes), ``memory_used`` (bytes held at most, counted at the measured sizes),
        ``spilled_at_step`` (a solve that outgrew its plan), ``checkpoint_slots``,
        ``recomputed_steps``, the bytes per tier (``host_bytes_peak``, ``disk_bytes_peak``...),
        the disk's read/write seconds and prefetch hits/misses; ``event_evaluations``.
    grid : Grid, optional
        A :class:`pnode_dist.Grid`: ``y0`` is this rank's patch of a field on a DMDA-distributed
        grid (``grid.scatter(field)``) instead of a batch shard; ``func`` is written for whole
        fields and evaluated on patches with halos. Not together with ``comm`` (the grid has its
        communicator).
    adjoint_params : sequence of Tensor, optional
        The tensors to differentiate (torchdiffeq's keyword). Default: func's parameters (and
        buffers) that require grad if func is an ``nn.Module``, else every leaf tensor requiring
        grad that func's graph reaches (tensors a lambda or closure captures), found by one
        evaluation of func at t[0].
    event_fn : callable, optional
        A terminating event (torchdiffeq's): ``event_fn(t, y)`` returns a tensor of one or
        several event functions (``y``: this rank's part, in y0's structure). ``t`` then holds
        two times: the start, and a second one that only gives the direction. The solve runs
        until the first event function reaches zero from the sign it had at the start. See
        Notes.

    Returns
    -------
    solution : Tensor or tuple of Tensor
        y at every time of ``t``, shape ``[len(t), *y0.shape]`` (in y0's structure for a tuple
        state), with y0's dtype and device. With ``event_fn``, the pair ``(event_t, solution)``
        instead, ``solution`` being ``[y0, y(event_t)]``; every rank gets the same event time.

    Raises
    ------
    InputError
        On every rank, when an argument is bad on any rank (the message says how to fix it),
        when the ranks are at different points of the program, when a backward pass with
        ``create_graph=True`` is refused (implicit methods, solves split over several ranks or
        a grid), when a tensor func differentiates was modified in place between the forward
        and backward passes, when ``event_fn`` fails at t[0], and when the ``checkpointing``
        budgets cannot hold what a solve needs.
    SolverError
        On every rank, when the solve or its backward pass fails on any rank: a blow-up (NaN
        or Inf), ``max_num_steps`` reached (also: no event within it), a Newton failure, an
        exception in ``func``, a step callback or ``event_fn`` (chained to yours), a damaged
        checkpoint file or a full checkpoint disk.

    Warns
    -----
    UserWarning
        ``method='dopri8'`` (runs ``verner8``), ``options['interp']`` (no effect), and step
        callbacks on ``func`` that are not called.

    Notes
    -----
    Events are located after each step, where the event functions are evaluated at the step's
    end: the crossing inside the step is found (Illinois' regula falsi) to
    ``options['event_tol']`` in time (default: 8 float64 machine epsilons of the event time, or
    of 1 for times below 1: far below any solve's own error; a tolerance that is not below the
    crossing step's length would not locate it at all: a SolverError). Every method works:
    ``dopri5``, ``tsit5``, ``bosh3``, ``adaptive_heun`` and ``fehlberg2`` with interpolated
    outputs locate it on their dense output; every other method (adaptive, or with fixed steps given
    ``options['step_size']``, which the fixed-step methods need) retakes the crossing step from
    its start with shorter sizes until it ends on the event, and the differentiable solve takes
    the same steps and the shortened one. A step over which an event function crosses zero twice
    is not seen: bound the steps with ``options['max_step']``. The gradient of ``solution``
    treats ``event_t`` as fixed and ``event_t`` has none, as in torchdiffeq:
    :func:`odeint_event` adds the event time's dependence. On several ranks the event is the
    first crossing on any rank; every rank's loss must use the event's outputs.

    A second backward pass through one solve re-runs the recorded steps from ``y0``. A backward
    pass with ``create_graph=True`` gives differentiable gradients (backprop's through the same
    steps) for explicit methods on one rank (or ``comm='self'``).

    The solver state has PETSc's precision (float64, or float32 with PNODE_PRECISION=single)
    and lives where y0 does: on this rank's GPU in CUDA Vecs. func is evaluated in its own
    dtype (a cast per call if it differs from the solver's).

    Examples
    --------
    ::

        from pnode_dist import odeint        # instead of: from torchdiffeq import odeint
        ys = odeint(func, y0, t, method="rk4", options={"step_size": 0.05})
        ys.pow(2).mean().backward()          # discrete adjoint; grads summed over ranks
        event_t, sol = odeint(func, y0, torch.tensor([0.0, 1.0]), event_fn=hit_ground)
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
        if func is not user_func and (method_obj.kind == "imex" or (
                isinstance(user_func, IMEX) and isinstance(method_obj, KenCarp))):
            raise InputError(f"method={method_obj.name!r} with an IMEX func takes a tensor y0 "
                             "and increasing t")
        control = _control(options, rtol, atol, store_graphs, method_obj)
        if event_fn is None and (options or {}).get("event_tol") is not None:
            raise InputError("options['event_tol'] is the tolerance of an event's time: it "
                             "needs event_fn")
        if event_fn is not None:
            if not (control.interpolate or control.step_size is not None
                    or method_obj.adaptive):
                raise InputError(
                    f"events with method {method_obj.name!r} need options['step_size']: the "
                    f"step that crosses is retaken to end on the event")
            t_out = [t_out[0], math.inf]             # until the event
        elif not (method_obj.adaptive and control.step_size is None):
            _check_step_count(t_out, control)
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
                 setup, y_start, t_out[0])
    _note_precision(y0.dtype)
    time_sign = -1.0 if decreasing else 1.0
    observers = conventions.StepCallbacks.of(
        user_func, lambda y: _restore(y if grid is None else grid.from_vec_order(y), spec),
        time_sign, y0.dtype)
    locator = None
    if event_fn is not None:
        locator = EventLocator(
            event_fn, lambda y: _restore(y if grid is None else grid.from_vec_order(y), spec),
            time_sign, layout.comm, y0.dtype, (options or {}).get("event_tol"))
        if _event_at_start(locator, t_out[0], y_start) == 0:
            return (torch.as_tensor(t, dtype=getattr(t, "dtype", None))[0].detach(),
                    _restore(torch.stack([y0, y0]), spec))
        if control.interpolate:
            observers = tuple(observers) + (locator,)
        else:
            retake = pool if not adaptive else _pool(solved_func, layout, method_obj, False,
                                                     prefix, frozen, params, y0.dtype, setup,
                                                     y_start, t_out[0])
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
        event_out["comm"], event_out["call"] = layout.comm, call
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

    try:
        t_event = locator.root(start, end, step_to)
    except Exception as exc:
        if not locator.failed:           # the retaken step's own (raised on every rank)
            raise
        locator.raise_failure(exc, "while the crossing step was retaken", SolverError)
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


def _event_at_start(locator, t0, y0):
    """The event combination at the start (collective); event_fn's failure there is an error
    on every rank."""
    try:
        return locator.start(t0, y0.detach().to(SOLVER_DTYPE))
    except Exception as exc:
        locator.raise_failure(exc, "at the start", InputError)


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=None,
                 **kwargs):
    """Solve from t0 until event_fn(t, y) reaches zero, with the event time's gradients.

    torchdiffeq's ``odeint_event``, same signature. Unlike ``odeint(..., event_fn=...)``, the
    returned event time and state are differentiable through the event: their gradients include
    the event time's dependence on ``y0``, func's parameters, ``t0`` and the tensors
    ``event_fn`` uses, by the implicit-function relation at the event with the discrete
    solution's own slope there (the dense output's, or the retaken step's in its size: exact by
    torch for explicit methods, by central differences of Newton-solved steps for implicit
    ones), so they are exact for the discrete solve.

    Parameters
    ----------
    func : callable
        ``func(t, y)``, as for :func:`odeint`.
    y0 : Tensor or tuple of Tensor
        This rank's part of the initial state, as for :func:`odeint`.
    t0 : float or Tensor
        The start time (a tensor that requires grad gets its gradient).
    event_fn : callable
        ``event_fn(t, y)`` returns a tensor of one or several event functions (``y``: this
        rank's part); the solve stops where the first of them reaches zero from the sign it had
        at the start (see :func:`odeint`'s Notes for how the crossing is located).
    reverse_time : bool, optional
        Solve backward in time from ``t0``.
    odeint_interface : callable, optional
        :func:`pnode_dist.odeint` by default; another odeint (torchdiffeq's) works too, with f
        at the event for the slope, as torchdiffeq does.
    **kwargs
        Go to the solve: ``rtol``, ``atol``, ``method``, ``options``, ``comm``, ...

    Returns
    -------
    event_t : Tensor
        The event time, the same on every rank.
    solution : Tensor or tuple of Tensor
        ``[y0, y(event_t)]`` (in y0's structure for a tuple state).

    Raises
    ------
    InputError
        As :func:`odeint`; also for a second derivative through the event time (a backward pass
        with ``create_graph=True``), which is refused.
    SolverError
        As :func:`odeint`; also when the event function's rate of change along the solution is
        zero at the event (a tangential crossing: the event time has no derivative).

    Notes
    -----
    On several ranks every rank's loss must use the event time or the state at the event (either
    will do: both lead every rank through the same backward pass, the event time's sum over the
    ranks and then the solve's); a rank whose loss uses neither while the others' do is an
    :class:`~pnode_dist.InputError` on every rank. A tensor ``event_fn`` uses gets its gradient
    on the rank whose event stopped the solve (None elsewhere):
    :func:`pnode_dist.allreduce_gradients` sums it.

    Examples
    --------
    ::

        def hit_ground(t, y):                          # y: [batch, (height, velocity)]
            return y[..., 0]                           # the first height to reach 0 stops
        event_t, sol = odeint_event(func, y0, 0.0, event_fn=hit_ground, method="rk4",
                                    options={"step_size": 0.1})
        (event_t - observed_t).pow(2).backward()       # d(event_t)/d(parameters, y0)
    """
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
    event_t, state = reroute(event_fn, event_t, state, slope, found.get("comm"),
                             found.get("call"))
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
    """torchdiffeq's ``odeint_adjoint`` signature: the same solve as :func:`odeint`.

    It exists so that ``from pnode_dist import odeint_adjoint as odeint`` works unchanged. It is
    odeint: pnode_dist's backward pass is always the discrete adjoint of the forward solve
    (exact gradients, memory bounded by checkpointing), so the ``adjoint_rtol``,
    ``adjoint_atol``, ``adjoint_method`` and ``adjoint_options`` of torchdiffeq's continuous
    adjoint are accepted and have no effect: the adjoint reuses the forward's steps and tableau.

    Parameters
    ----------
    func, y0, t
        As for :func:`odeint`.
    adjoint_params : sequence of Tensor, optional
        The tensors to differentiate, as for :func:`odeint`.
    adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options : optional
        Accepted, no effect.
    **kwargs
        :func:`odeint`'s other keyword arguments. With ``event_fn``, the event time has its
        gradient as in torchdiffeq's ``odeint_adjoint`` (:func:`odeint_event`'s).

    Returns
    -------
    solution : Tensor or tuple of Tensor
        As :func:`odeint`: y at every time of ``t``, or ``(event_t, solution)`` with
        ``event_fn``.

    Raises
    ------
    InputError
        As :func:`odeint` (and :func:`odeint_event` with ``event_fn``).
    SolverError
        As :func:`odeint` (and :func:`odeint_event` with ``event_fn``).
    """
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
    """A network layer y -> y(t1) with dy/dt = func(t, y), y(t0) = y.

    Wraps :func:`odeint` for use inside networks; each forward pass is one solve, and what it
    keeps for the backward pass is planned per solve by ``checkpointing``.

    Parameters
    ----------
    func : callable
        ``func(t, y)``, typically an ``nn.Module`` (then a submodule of the block, so that its
        parameters are the block's).
    t : sequence of float or Tensor, optional
        The times (t0, ..., t1), default (0.0, 1.0); kept as a float64 buffer (not saved in
        the state dict).
    method, rtol, atol, options, comm, prefix, petsc_options, store_graphs, checkpointing, grid
        As for :func:`odeint` (keyword-only).
    return_all : bool, optional
        Return the states at every time of ``t`` (``[len(t), *y.shape]``) instead of the last.

    Attributes
    ----------
    stats : dict
        This rank's counts of the last forward (and, once it ran, backward) pass, as odeint's
        ``stats``.

    Raises
    ------
    InputError
        From :meth:`forward`, as :func:`odeint` (the constructor checks nothing: a bad
        argument is an error at the first forward pass).
    SolverError
        From :meth:`forward`, as :func:`odeint`.

    Examples
    --------
    ::

        block = ODEBlock(func, t=(0, 1), method="rk4", options={"step_size": 0.1},
                         checkpointing=Checkpointing(memory=2**30))
        model = nn.Sequential(stem, block, head)
    """

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
        """Solve from y(t0) = ``y0``; returns y(t1) (every time of ``t`` with ``return_all``).

        Parameters
        ----------
        y0 : Tensor or tuple of Tensor
            This rank's shard of the batch (or its patch with ``grid``), as odeint's ``y0``.

        Returns
        -------
        Tensor or tuple of Tensor
            The state at the last time of ``t``, or ``[len(t), *y0.shape]`` with
            ``return_all``.

        Raises
        ------
        InputError
            As :func:`odeint`, on every rank.
        SolverError
            As :func:`odeint`, on every rank.
        """
        self.stats = {}
        ys = odeint(self.func, y0, self.t, stats=self.stats, **self.kwargs)
        return ys if self.return_all else _last(ys)

    def extra_repr(self):
        return f"t={self.t.tolist()}, method={self.kwargs['method'] or 'dopri5'}"
