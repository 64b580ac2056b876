"""The checkpointing policy users pass to odeint / ODEBlock (:class:`Checkpointing`), and its
resolution for one solve into a reversal strategy (``StoreAll``, ``Spill``, ``Revolve``,
``Uniform``) over checkpoint tiers (:class:`Tier`: GPU memory, host memory, HDF5 files)."""
import math
from dataclasses import dataclass
from typing import Optional

from . import _h5format as h5format
from ._reversal import budget
from ._reversal.disk_tier import DiskTier
from ._reversal.store import DeviceTier, MemoryTier, PinnedHostTier, Tier  # noqa: F401
from ._reversal.strategies import Revolve, Spill, StoreAll, Uniform
from ._solve.device import SOLVER_ITEMSIZE, VEC_OVERHEAD
from .errors import InputError

STRATEGIES = {"states": Revolve, "binomial": Revolve, "uniform": Uniform}

SCHEDULES = ("auto", "all", "uniform", "binomial")
_UNKNOWN_STEPS = 1_000_000       # slots of an unbounded tier before any step count is known


@dataclass(frozen=True)
class StepCost:
    """Bytes a solve keeps per step, from the measured sizes: `state` one state, `graph` one
    stored stage graph of f; `per_step` states PETSc's trajectory keeps per step, `graphs` f
    evaluations per step whose graphs can be kept."""
    state: int
    graph: int
    per_step: int
    graphs: int

    @property
    def state_step(self):
        """One step in PETSc's memory trajectory (its solution and stages, each a Vec)."""
        return self.per_step * (self.state + VEC_OVERHEAD)

    @property
    def graph_step(self):
        """One step with f's stage graphs."""
        return self.state_step + self.graphs * self.graph

    @property
    def record(self):
        """What reversing one step from a checkpoint holds besides the checkpoints: the step
        re-run with its graphs and the one-state tail buffer."""
        return self.graph_step + self.state


def _in_memory(caps, state):
    """Slots the memory tiers of `caps` hold."""
    return sum(cap // state for name, cap in caps if name != "disk" and cap is not None)


def _sizes(pool, state, t, y):
    """The problem's measured Sizes (`state`: the largest shard's bytes), measured at its
    first differentiable solve, at (t, y) (collective: every rank is in the same solve)."""
    if pool.sizes is None:
        layout, method, func, params = pool.args[:4]
        graphed = func if method.graphs_per_step else None
        graphed = getattr(graphed, "explicit", graphed)          # an IMEX pair's RHS part
        pool.sizes = budget.measure(layout, state, graphed, params, t,
                                    y.detach().to(pool.dtype))
    return pool.sizes


def _plan_stats(plan):
    return {"checkpoint_schedule": plan.schedule, "memory_budget": plan.budget,
            "memory_estimate": plan.estimate}


def _byte_count(name, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"Checkpointing({name}=...) must be a number of bytes >= 0 (or None "
                         f"for no limit); got {value!r}")


@dataclass(frozen=True)
class Plan:
    """What one solve keeps for its backward pass (Checkpointing.plan)."""
    schedule: str                # 'graphs', 'all', 'states', 'binomial' or 'uniform'
    slots: Optional[int] = None  # checkpoint slots (states, binomial, uniform)
    budget: Optional[int] = None     # bytes the reversal may hold in memory (None: no limit)
    estimate: Optional[int] = None   # bytes it should hold (None: the step count is unknown)
    head_limit: Optional[int] = None     # graphs/all: bytes after which the forward spills


@dataclass(frozen=True)
class Checkpointing:
    """How the forward solve keeps states for the backward pass: a policy for odeint/ODEBlock.

    Pass it as ``checkpointing=`` to :func:`pnode_dist.odeint` or :class:`pnode_dist.ODEBlock`;
    it is resolved per solve into a reversal strategy over checkpoint tiers. A checkpoint goes
    to the fastest tier with room: GPU memory, host memory, then HDF5 files. Gradients are the
    same as with ``'all'`` to round-off and bitwise the same whatever tiers hold the
    checkpoints. The policy is immutable (a frozen dataclass).

    Parameters
    ----------
    schedule : {'auto', 'all', 'uniform', 'binomial'}, optional
        ``'auto'`` (default): the fastest of these whose memory fits the budget, per solve:
        ``'graphs'`` (every step, its stages and f's stage graphs: no f re-evaluation in the
        adjoint), ``'all'``, ``'states'`` (every state without stages: each step re-run once,
        with its graphs, right before its adjoint), ``'binomial'`` with as many slots as fit;
        ``'binomial'`` whenever ``slots`` is given.
        ``'all'``: PETSc's memory trajectory: every step with its stages.
        ``'uniform'``: ``slots`` checkpoints evenly spread; each segment between them is re-run
        once, recorded, and its adjoint applied.
        ``'binomial'``: revolve (Griewank-Walther): the fewest re-run steps for ``slots``.
    slots : int, optional
        Checkpoint states kept at once (y0's included, >= 1); by default as many as the byte
        budgets hold (``host_bytes`` in memory, ``disk_bytes`` in the HDF5 tier). With slots,
        'auto' means 'binomial'.
    memory : int, optional
        The budget of 'auto' in bytes per rank: what the kept states and graphs may take (GPU
        memory for a state on a GPU). Default: ``host_bytes`` (``device_bytes`` on a GPU) if
        given, else half the memory free when the problem is first solved (MemAvailable shared
        by this solve's ranks on the node; torch's free GPU memory). An adaptive solve is
        planned for the previous solve's step count in 3/4 of it; a solve that outgrows its
        plan stops keeping graphs, then continues with binomial checkpoints in what is left
        (``spilled_at_step`` in stats). Only with ``schedule='auto'`` and no ``slots``.
    host_bytes, device_bytes, disk_bytes : int, optional
        Budget of each tier in bytes (None: unlimited). The device tier serves states on a GPU
        when ``device_bytes`` is given, and is also bounded by the free GPU memory; host memory
        is then page-locked, with copies on a side CUDA stream that overlap the solve (read
        back ahead of the adjoint). ``disk_bytes`` needs ``disk_dir``.
    disk_dir : str, optional
        Directory of the HDF5 tier (one file per rank and solve,
        ``<disk_dir>/<prefix or ode>-<run tag>-<solve>.rank<r>-of-<n>.h5``); None: no disk
        tier. The files are removed after the backward pass unless ``keep_files``.
    keep_files : bool, optional
        Keep the HDF5 files after the backward pass, with every checkpoint written (for
        ``pnode-inspect``).
    prefetch : int, optional
        Checkpoints read ahead from disk by a worker thread while the adjoint runs (default 2,
        >= 0); writes also happen behind the solve, and the last ``prefetch`` written stay in
        memory for the restores that often follow them.

    Raises
    ------
    InputError
        At construction: an unknown schedule; ``slots`` not an integer >= 1; a byte budget that
        is not an integer >= 0; ``memory`` with another schedule or with ``slots``; a
        ``disk_dir`` that is not a str; ``disk_bytes`` without ``disk_dir``; ``prefetch`` not
        an integer >= 0; ``'uniform'`` or ``'binomial'`` without ``slots`` or a byte budget on
        every tier; ``'all'`` with ``slots``. In a solve (on every rank): budgets that cannot
        reverse a step or hold the slots asked for.

    Notes
    -----
    With adaptive steps the accepted step times are recorded and replayed exactly when a
    segment is re-run; the previous solve's step count places the checkpoints, and before that,
    or past it, an online rule keeps them evenly spread. A checkpoint that changed on disk
    between the forward and the backward pass is never used (its restore is checked against the
    SHA-256 the writer kept): the backward pass raises ``SolverError`` on every rank, naming the
    file and the step. A full disk is a ``SolverError`` too (a write that would leave less than
    1 MiB free is refused), and the partial file is removed. ``stats`` reports what a solve
    chose (``checkpoint_schedule``, ``memory_budget``, ``memory_estimate``, ``memory_used``,
    ``checkpoint_slots``, ``recomputed_steps``, the tiers' bytes and disk seconds). A tier of
    your own is a :class:`Tier` subclass that an override of :meth:`tiers` lists.

    Examples
    --------
    ::

        policy = Checkpointing(memory=2**30)                                # fastest in 1 GiB
        policy = Checkpointing(schedule="binomial", slots=20)               # 20 states
        policy = Checkpointing(host_bytes=2**30, disk_dir="/scratch/ckpt")  # then HDF5 files
        ys = odeint(func, y0, t, method="rk4", options={"step_size": 1e-3},
                    checkpointing=policy)
    """
    schedule: str = "auto"
    slots: Optional[int] = None
    memory: Optional[int] = None
    host_bytes: Optional[int] = None
    device_bytes: Optional[int] = None
    disk_dir: Optional[str] = None
    disk_bytes: Optional[int] = None
    keep_files: bool = False
    prefetch: int = 2

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise InputError(f"Checkpointing(schedule={self.schedule!r}): choose one of "
                             f"{list(SCHEDULES)}")
        if self.slots is not None and (isinstance(self.slots, bool)
                                       or not isinstance(self.slots, int) or self.slots < 1):
            raise InputError(f"Checkpointing(slots=...) must be an integer >= 1 (y0 takes one "
                             f"slot); got {self.slots!r}")
        for name in ("memory", "host_bytes", "device_bytes", "disk_bytes"):
            _byte_count(name, getattr(self, name))
        if self.memory is not None and (self.schedule != "auto" or self.slots is not None):
            raise InputError("Checkpointing(memory=...) is the budget of schedule='auto' "
                             "without slots; the other schedules take slots or tier budgets")
        if self.disk_dir is not None and not isinstance(self.disk_dir, str):
            raise InputError(f"Checkpointing(disk_dir=...) must be a directory path (str); got "
                             f"{type(self.disk_dir).__name__}")
        if self.disk_bytes is not None and self.disk_dir is None:
            raise InputError("Checkpointing(disk_bytes=...) needs disk_dir=... (where the HDF5 "
                             "files go)")
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise InputError(f"Checkpointing(prefetch=...) must be an integer >= 0; got "
                             f"{self.prefetch!r}")
        unbounded = self.host_bytes is None or (self.disk_dir is not None
                                                and self.disk_bytes is None)
        if self.schedule in ("uniform", "binomial") and self.slots is None and unbounded:
            raise InputError(f"Checkpointing(schedule={self.schedule!r}) needs slots=... or a "
                             "byte budget on every tier (host_bytes=..., and disk_bytes=... "
                             "with disk_dir)")
        if self.schedule == "all" and self.slots is not None:
            raise InputError("Checkpointing(schedule='all') stores every step: slots applies "
                             "to 'uniform' and 'binomial'")

    @property
    def measures(self):
        """Whether plans need the problem's measured sizes ('auto' without slots)."""
        return self.schedule == "auto" and self.slots is None

    def capacities(self, on_device):
        """Byte budget of each tier in use, fastest first: ``[(name, bytes or None)]``.

        ``'device'`` (a GPU state with ``device_bytes``), ``'host'``, then ``'disk'`` (with
        ``disk_dir``); None is unlimited.
        """
        tiers = [("device", self.device_bytes)] if on_device and self.device_bytes is not None \
            else []
        tiers.append(("host", self.host_bytes))
        if self.disk_dir is not None:
            tiers.append(("disk", self.disk_bytes))
        return tiers

    def budget(self, on_device, sizes):
        """The byte budget of 'auto' (see ``memory``): ``memory``, else ``device_bytes`` (GPU) or
        ``host_bytes`` if given, else the measured free memory in ``sizes``."""
        if self.memory is not None:
            return self.memory
        given = self.device_bytes if on_device else self.host_bytes
        if given is not None:
            return given
        return sizes.device_free if on_device else sizes.host_free

    def _checkpoint_capacities(self, on_device, sizes, cost, budget):
        """Tier budgets of 'auto''s checkpoints: an unbounded host tier gets the budget (on a
        GPU: the default host budget) less, on the CPU, the step being re-run."""
        caps = self.capacities(on_device)
        if self.host_bytes is None:
            host = sizes.host_free if on_device else max(0, budget - cost.record)
            caps = [(name, host if name == "host" else cap) for name, cap in caps]
        return caps

    def plan(self, cost, expected_steps, adaptive, on_device, sizes=None, graphs=None):
        """The Plan of one solve: which schedule, how many slots, within which budget.

        Parameters
        ----------
        cost : StepCost
            The method's bytes per step at the agreed sizes.
        expected_steps : int or None
            Exact for fixed steps, the previous solve's count for adaptive ones (None before
            the first).
        adaptive : bool
            Whether the steps are adaptive (a quarter of the budget is then reserved for the
            binomial tail of a solve that outgrows its plan).
        on_device : bool
            Whether the state is on a GPU.
        sizes : optional
            The problem's measured Sizes (needed by 'auto' only without a memory or
            host/device_bytes budget).
        graphs : bool or None, optional
            The user's ``store_graphs`` (None: the plan decides).

        Returns
        -------
        Plan

        Raises
        ------
        InputError
            If the budgets cannot hold what is asked (a step cannot be reversed in the budget,
            the slots do not fit the tier budgets, or the tiers hold no checkpoint).
        """
        if self.schedule == "all":
            return Plan("all")
        if not self.measures:
            schedule = "binomial" if self.schedule == "auto" else self.schedule
            return Plan(schedule, self._slots(cost, self.capacities(on_device)))
        budget = self.budget(on_device, sizes)
        # What a solve that outgrows its plan keeps for its binomial tail: with adaptive steps
        # a quarter of the budget, and at least the re-run step and four checkpoints.
        reserve = max(budget // 4 if adaptive else 0, cost.record + 4 * cost.state)
        room = budget - reserve
        n = expected_steps
        ladder = [("all", cost.state_step)]
        if graphs is not False and cost.graph_step > cost.state_step:
            ladder.insert(0, ("graphs", cost.graph_step))
        for schedule, per_step in ladder:
            if (n is None and room >= per_step) or (n is not None and n * per_step <= room):
                return Plan(schedule, budget=budget, head_limit=room,
                            estimate=None if n is None else n * per_step)
        if not on_device and self.host_bytes is None and budget < cost.record + cost.state:
            raise InputError(f"Checkpointing: a budget of {budget} bytes cannot reverse a step: "
                             f"that holds {cost.record + cost.state} bytes (y0, the step re-run "
                             "with its graphs, one more state): raise Checkpointing(memory=...)")
        caps = self._checkpoint_capacities(on_device, sizes, cost, budget)
        steps = n if n is not None else _UNKNOWN_STEPS
        slots = min(self._slots(cost, caps, fill=steps + 1), steps + 1)
        return Plan("states" if slots == steps + 1 else "binomial", slots, budget=budget,
                    estimate=min(slots, _in_memory(caps, cost.state)) * cost.state
                    + cost.record)

    def _slots(self, cost, caps, fill=None):
        """The slot count: `slots` if given, else what the tiers hold (`fill` if a tier is
        unbounded); an InputError if they hold none."""
        fits = fill
        if all(cap is not None for _, cap in caps):
            fits = sum(cap // cost.state for _, cap in caps)
        slots = self.slots if self.slots is not None else fits
        if fits is not None and slots > fits:
            raise InputError(f"Checkpointing: {slots} slots of {cost.state} bytes do not fit "
                             f"the tier budgets {dict(caps)} (room for {fits}): raise a budget "
                             "or lower slots")
        if slots is None or slots < 1:
            raise InputError(f"Checkpointing: the budgets {dict(caps)} hold no checkpoint of "
                             f"{cost.state} bytes (the largest rank's state); at least one "
                             "(y0) is needed")
        return slots

    def strategy(self, pool, t_out, control, y0):
        """The reversal strategy of one solve of ``pool``'s problem (called by odeint).

        The plan depends only on values every rank shares (the agreed sizes, step counts), so
        all ranks take the same steps.

        Returns
        -------
        StoreAll, Spill, Revolve or Uniform
            ``StoreAll`` (with or without graphs), ``Spill`` (a StoreAll continued by a
            Revolve), ``Revolve`` (binomial or every state) or ``Uniform``.

        Raises
        ------
        InputError
            If the budgets cannot hold what is asked (see :meth:`plan`).
        """
        layout = pool.layout
        on_device = layout.device.type == "cuda"
        state = SOLVER_ITEMSIZE * max(math.prod(s) for s in layout.all_local_shapes)
        sizes = _sizes(pool, state, t_out[0], y0) if self.measures else None
        cost = StepCost(state, sizes.graph if sizes is not None else 0,
                        pool.method.states_per_step, pool.method.graphs_per_step)
        expected = pool.history.expected_steps(pool.adaptive, t_out, control)
        plan = self.plan(cost, expected, pool.adaptive, on_device, sizes, control.store_graphs)
        if plan.schedule in ("graphs", "all"):
            if plan.head_limit is None or control.store_graphs:  # graphs whatever they take
                head = StoreAll(pool, control, plan.schedule == "graphs" or
                                bool(control.store_graphs), expected=expected)
            else:
                head = StoreAll(pool, control, plan.schedule == "graphs", cost, plan.head_limit,
                                expected)
                head.stats.update(_plan_stats(plan))
            return Spill(head, lambda head, record: self._tail(
                pool, cost, plan, sizes, on_device, control, head, record), expected)
        if self.measures:
            tiers = self.tiers(pool, self._checkpoint_capacities(on_device, sizes, cost,
                                                                 plan.budget))
        else:
            tiers = self.tiers(pool)
        strategy = STRATEGIES[plan.schedule](pool, tiers, plan.slots, state,
                                             overhead=cost.record if self.measures else 0)
        strategy.stats.update(_plan_stats(plan))
        return strategy

    def _tail(self, pool, cost, plan, sizes, on_device, control, head, record, before=0):
        """The strategy that continues a solve whose StoreAll `head` stopped (`before` bytes
        held by the heads before it): if its trajectory was full, another StoreAll (the same
        graphs and byte limit) reserving every step left; else, the solve outgrew its plan: a
        binomial one in the budget the heads left."""
        used = before + head.used
        if head.full(record):
            if head.limit is None:
                return StoreAll(pool, control, head.graphs, capacity=control.max_num_steps)
            rest = StoreAll(pool, control, head.graphs, cost, head.limit.limit - head.used,
                            capacity=control.max_num_steps)
            return Spill(rest, lambda h, r: self._tail(pool, cost, plan, sizes, on_device,
                                                       control, h, r, used), None)
        left = max(0, plan.budget - used - cost.record)
        caps = [(name, left if name == "host" and not on_device else cap)
                for name, cap in self._checkpoint_capacities(on_device, sizes, cost, 0)]
        slots = self._slots(cost, caps, fill=control.max_num_steps + 1)
        return Revolve(pool, self.tiers(pool, caps), slots, cost.state, overhead=cost.record)

    def tiers(self, pool, capacities=None):
        """The checkpoint tiers of one solve, fastest first: the extension point for tiers.

        A policy subclass that overrides it (keeping this signature) stores checkpoints in
        tiers of its own (:class:`Tier` subclasses).

        Parameters
        ----------
        pool
            The solve's integrator pool (its ``layout`` says the device, ranks and shapes).
        capacities : list of (str, int or None), optional
            ``[(name, bytes)]`` with name ``'device'``, ``'host'`` or ``'disk'``; by default
            the policy's own (as :meth:`capacities` lists them).

        Returns
        -------
        list of Tier
            A device tier (GPU memory), a host tier (page-locked for a GPU state) and an HDF5
            disk tier, as the capacities name them.
        """
        layout = pool.layout
        on_device = layout.device.type == "cuda"
        tiers = []
        for name, capacity in capacities or self.capacities(on_device):
            if name == "device":
                tiers.append(DeviceTier(capacity, layout.device))
            elif name == "host":
                tiers.append(PinnedHostTier(capacity, layout.device, self.prefetch) if on_device
                             else MemoryTier("host", capacity))
            else:
                tiers.append(self._disk_tier(pool, capacity))
        return tiers

    def _disk_tier(self, pool, capacity):
        layout = pool.layout
        tag, solve = pool.history.next_file()
        name = (pool.prefix or "ode").rstrip("_") or "ode"
        path = h5format.checkpoint_file_name(self.disk_dir, name, tag, solve, layout.rank,
                                             layout.nranks)
        attrs = dict(rank=layout.rank, nranks=layout.nranks, method=pool.method.name,
                     local_shape=layout.local_shape, global_shape=layout.global_shape,
                     dtype=str(pool.dtype).replace("torch.", ""))
        return DiskTier(path, capacity, attrs, pool.method.name, self.prefetch, self.keep_files)
