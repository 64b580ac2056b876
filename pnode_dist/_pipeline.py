"""The steps below odeint's face, for one normalised Request (_request.py): the problem's
layout (a batch split over ranks, or a grid), its cached IntegratorPool, an event solve's
landing (_events), and the solve: differentiable through the reversal strategy
(_reversal/autograd.py) or without gradient; the outputs back in the user's structure."""
import collections
import warnings
from dataclasses import replace as dc_replace
from types import SimpleNamespace

import torch

from ._distributed.layout import BatchLayout
from ._distributed.startup import MPI
from ._events import landing
from ._reversal.autograd import OdeintFunction
from ._reversal.strategies import ReplayAll, solve_without_gradient
from ._solve import conventions
from ._solve.device import SOLVER_DTYPE
from ._solve.lifetime import at_finalize
from ._solve.pool import IntegratorPool
from .grid import GridLayout
from .methods import AUTO_EXACT_SIZE

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


def run(r, event_out=None):
    """Solve Request r: the outputs at r.t_out in the user's structure, or for an event solve
    (event time, [y0, y(event)]); event_out: see landing.finish."""
    if len(r.t_out) == 1:                # torchdiffeq's convention: y0 itself, as [1, ...]
        return _restore(r.y0.unsqueeze(0), r.spec)
    grid = r.grid
    if grid is None:
        layout = BatchLayout(r.comm, r.y0.shape, r.shapes, device=r.y0.device)
        func, y_start = r.func, r.y0
    else:
        layout, func, y_start = grid.layout, grid.wrap(r.func), grid.to_vec_order(r.y0)

    def pool_of(adaptive):
        return _pool(func, layout, r.method, adaptive, r.prefix, r.petsc_options, r.params,
                     r.y0.dtype, r.setup, y_start, r.t_out[0])

    def to_user(y):
        return _restore(y if grid is None else grid.from_vec_order(y), r.spec)
    pool = pool_of(r.adaptive)
    _note_precision(r.y0.dtype)
    time_sign = -1.0 if r.decreasing else 1.0
    observers = conventions.StepCallbacks.of(r.user_func, to_user, time_sign, r.y0.dtype)
    t_out, control, locator = r.t_out, r.control, None
    if r.event_fn is not None:
        started = landing.start(r, pool, layout, func, y_start, to_user, time_sign, observers,
                                lambda: pool_of(False))
        if started is None:
            event_t, outputs = landing.at_start(r)
            return event_t, _restore(outputs, r.spec)
        locator, pool, t_out, control, observers = started
    outputs = _solve(r, pool, layout, func, y_start, t_out, control, observers, time_sign,
                     locator is not None)
    if locator is None:
        return to_user(outputs)
    event_t, outputs = landing.finish(r, locator, outputs, layout.comm, time_sign, event_out)
    return event_t, to_user(outputs)


def _solve(r, pool, layout, func, y_start, t_out, control, observers, time_sign, event):
    """The outputs [len(t_out), *y_start.shape] of the solve on `pool`: differentiable (the
    reversal strategy of r's policy) or without gradient."""
    if not r.needs_grad:
        return solve_without_gradient(pool, y_start.detach(), t_out, control, observers,
                                      r.stats).to(r.y0.dtype)
    problem = SimpleNamespace(params=r.params, t_out=t_out, control=control, stats=r.stats,
                              strategy=lambda: r.policy.strategy(pool, t_out, control, y_start),
                              replay=lambda y: ReplayAll(pool, y), comm=r.comm, call=r.call,
                              func=func, time_sign=time_sign, observers=observers,
                              gradient_comm=layout.gradient_comm, method=r.method.name,
                              distributed=layout.nranks > 1 or r.grid is not None, event=event)
    return OdeintFunction.apply(problem, y_start, r.t if r.t_grad else None, *r.params)


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
        warnings.warn(_FLOAT32_NOTE, UserWarning, stacklevel=5)


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


def _restore(outputs, spec):
    """Outputs (or one state: no leading time dimension) in the user's structure."""
    if spec is None:
        return outputs
    return spec.unpack(outputs, lead=outputs.shape[:-2])
