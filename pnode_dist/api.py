"""Public API: :func:`odeint` (torchdiffeq's signature), :func:`odeint_adjoint`,
:func:`odeint_event` and the :class:`ODEBlock` layer: signatures and docstrings. Each call's
arguments become one Request (_request.py: checked on every rank, errors that say what to
do), which _pipeline.run solves; events go through _events."""
import torch
from torch import nn

from ._events import through_event
from ._pipeline import run
from ._request import normalise


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
        implicit, for stiff problems, adaptive ``kencarp3``, ``kencarp4``, ``kencarp5``,
        ``kvaerno3``, ``kvaerno4``, ``kvaerno5`` (L-stable, with an embedded error estimate:
        the ones to pick), ``beuler``, ``cn``,
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
          ``cn``, ``theta``, ``kencarp3/4/5``, ``kvaerno3/4/5``, ``arkimex``) adapt the step
          to ``rtol``/``atol`` and the fixed-step ones take one step per output interval.
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
    request = normalise(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                        comm=comm, prefix=prefix, petsc_options=petsc_options,
                        store_graphs=store_graphs, checkpointing=checkpointing, stats=stats,
                        grid=grid, adjoint_params=adjoint_params, event_fn=event_fn)
    return run(request, event_out)


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
    """(event_t, solution) of an event solve over t, with the event time's gradients (ours, or
    another odeint's such as torchdiffeq's)."""
    if interface in (None, odeint, odeint_adjoint):
        def solve(found):
            return _odeint(func, y0, t, event_fn=event_fn, event_out=found, **kwargs)
    else:
        def solve(found):
            return interface(func, y0, t, event_fn=event_fn, **kwargs)
    return through_event(solve, func, event_fn)


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
