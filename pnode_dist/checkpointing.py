"""The checkpointing policy users pass to odeint / ODEBlock, and its resolution for one solve
into a reversal strategy (reversal.py) over checkpoint tiers (store.py)."""
import math
from dataclasses import dataclass
from typing import Optional

from . import _h5format as h5format
from ._reversal.store import DeviceTier, DiskTier, MemoryTier, PinnedHostTier, Tier  # noqa: F401
from ._reversal.strategies import Revolve, StoreAll, Uniform
from ._solve.device import SOLVER_ITEMSIZE
from .errors import InputError

STRATEGIES = {"binomial": Revolve, "uniform": Uniform}

SCHEDULES = ("auto", "all", "uniform", "binomial")


def _byte_count(name, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"Checkpointing({name}=...) must be a number of bytes >= 0 (or None "
                         f"for no limit); got {value!r}")


@dataclass(frozen=True)
class Checkpointing:
    """How the forward solve keeps states for the backward pass.

    schedule:     'all'      PETSc's memory trajectory: every step with its stages (fastest)
                  'uniform'  `slots` checkpoints evenly spread; each segment between them is
                             re-run once, recorded, and its adjoint applied
                  'binomial' revolve (Griewank-Walther): the fewest re-run steps for `slots`
                  'auto'     'all' when it fits host_bytes (or no budget is given), else
                             'binomial' (or 'binomial' whenever slots is given); for a state
                             on a GPU, whose 'all' trajectory is in GPU memory, device_bytes
                             takes host_bytes' place in this choice
    slots:        checkpoint states kept at once (y0's included); by default as many as the
                  byte budgets hold
    host_bytes, device_bytes, disk_bytes: budget of each tier (None: unlimited). The device
                  tier serves states on a GPU when device_bytes is given, and is also bounded
                  by the free GPU memory; host memory is then page-locked, with copies that
                  overlap the solve
    disk_dir:     directory of the HDF5 tier (one file per rank and solve); None: no disk tier
    keep_files:   keep the HDF5 files after the backward pass (for pnode-inspect)
    prefetch:     checkpoints read ahead from disk while the adjoint runs
    """
    schedule: str = "auto"
    slots: Optional[int] = None
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
        for name in ("host_bytes", "device_bytes", "disk_bytes"):
            _byte_count(name, getattr(self, name))
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

    def capacities(self, on_device):
        """Byte budget of each tier in use, fastest first: [(name, bytes or None)]."""
        tiers = [("device", self.device_bytes)] if on_device and self.device_bytes is not None \
            else []
        tiers.append(("host", self.host_bytes))
        if self.disk_dir is not None:
            tiers.append(("disk", self.disk_bytes))
        return tiers

    def resolve(self, state_bytes, expected_steps, states_per_step, on_device=False):
        """(schedule, slots) for one solve: the schedule 'auto' stands for, and the slot count
        the budgets allow. Raises InputError if the budgets cannot hold what is asked."""
        caps = self.capacities(on_device)
        all_cap = self.device_bytes if on_device else self.host_bytes    # where 'all' keeps it
        schedule = self.schedule
        if schedule == "auto":
            if self.slots is not None:
                schedule = "binomial"
            elif all_cap is None:
                schedule = "all"
            elif expected_steps and expected_steps * states_per_step * state_bytes <= all_cap:
                schedule = "all"
            else:
                schedule = "binomial"
        if schedule == "all":
            return "all", None
        fits = None
        if all(cap is not None for _, cap in caps):
            fits = sum(cap // state_bytes for _, cap in caps)
        slots = self.slots if self.slots is not None else fits
        if fits is not None and slots > fits:
            raise InputError(f"Checkpointing: {slots} slots of {state_bytes} bytes do not fit "
                             f"the tier budgets {dict(caps)} (room for {fits}): raise a budget "
                             "or lower slots")
        if slots < 1:
            raise InputError(f"Checkpointing: the budgets {dict(caps)} hold no checkpoint of "
                             f"{state_bytes} bytes (the largest rank's state); at least one "
                             "(y0) is needed")
        return schedule, slots

    def strategy(self, pool, t_out, control):
        """The reversal strategy of one solve of `pool`'s problem. The schedule depends only on
        values every rank shares (the largest shard's bytes, step counts), so all ranks take
        the same steps."""
        layout = pool.layout
        state_bytes = SOLVER_ITEMSIZE * max(math.prod(s) for s in layout.all_local_shapes)
        schedule, slots = self.resolve(
            state_bytes, pool.history.expected_steps(pool.adaptive, t_out, control),
            pool.method.states_per_step, on_device=layout.device.type == "cuda")
        if schedule == "all":
            return StoreAll(pool, control)
        return STRATEGIES[schedule](pool, self.tiers(pool), slots, state_bytes)

    def tiers(self, pool):
        """The checkpoint tiers of one solve, fastest first (as `capacities` lists them)."""
        layout = pool.layout
        on_device = layout.device.type == "cuda"
        tiers = []
        for name, capacity in self.capacities(on_device):
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
