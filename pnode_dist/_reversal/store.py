"""The checkpoint store: tiers of memory for the states the forward solve keeps.

A checkpoint goes to the fastest tier with room: device memory (a GPU-resident state), host
memory, then an HDF5 file (disk_tier.py). Each tier counts the bytes it holds against its
budget. The disk tier writes behind the solve on a worker thread and, on the way back, reads the
checkpoints the backward pass needs next while the adjoint of the current segment runs. For a
state on a GPU, host memory is page-locked and filled (and read back ahead of need) by copies
on a side CUDA stream, so that the solve goes on meanwhile.
"""
import collections
import zlib

import torch

from .._distributed.collective import CAUSE, SYMPTOM
from ..errors import InputError


class Tier:
    """Where checkpoints are kept, up to ``capacity`` bytes: the extension point for tiers.

    A tier of your own (remote memory, compression) subclasses it, sets ``name`` (the prefix of
    its ``stats`` keys) and implements :meth:`put`, :meth:`get` and :meth:`drop` by step
    position. The :class:`CheckpointStore` does the rest: it counts each tier's checkpoints and
    bytes (``bytes``, ``peak``, ``stored``), verifies what every :meth:`get` returns (the shape
    and dtype put, and for a tier that is not ``trusted`` a CRC-32 of the bytes kept at put
    time), and turns an exception in a tier's method or a wrong restore into ``SolverError``
    on every rank, naming the tier and the step. A ``pnode_dist.Checkpointing`` subclass whose
    ``tiers(pool, capacities=None)`` returns it puts it to use. A checkpoint goes to the first
    tier (fastest first) whose :meth:`has_room` says yes. Calling ``Tier.__init__`` is
    optional (without it: no byte budget).

    Where a tier's puts or restores can fail on one rank only (``fallible = True``, the
    default: a tier of your own, a disk, GPU memory), every rank checks for a failure on any
    rank after each restore and each put of the backward pass (the forward's puts: after the
    solve), one allgather each on several ranks, so that all learn of it at the same point. A
    tier whose failures come later (a disk tier writing behind) records its first one in
    ``error``.

    Parameters
    ----------
    capacity : int or None
        The tier's byte budget (None: unbounded).

    Attributes
    ----------
    bytes : int
        Bytes held now (counted by the store).
    peak : int
        The most bytes held at once (``<name>_bytes_peak`` in stats).
    stored : int
        Checkpoints put so far (``<name>_checkpoints`` in stats).
    error : tuple or None
        The first failure a tier records itself, as (severity, message), or None.
    fallible : bool
        Whether a put or a restore can fail on one rank only (see above).
    trusted : bool
        Whether :meth:`get` returns exactly the bytes :meth:`put` was given by construction
        (the built-in tiers; the disk tier checks its own SHA-256): then the store keeps no
        CRC-32 of them (about 0.3 ms per MiB at put and at get). False for a tier of your own.

    Examples
    --------
    ``tests/test_extension.py`` holds a complete one: ``BytesTier`` keeps checkpoints as raw
    bytes and a ``Checkpointing`` subclass lists it in ``tiers``; its gradients equal the
    built-in tiers'.
    """
    name = None
    fallible = True
    trusted = False
    capacity = None              # (class defaults: a subclass may skip Tier.__init__)
    bytes = peak = stored = 0
    error = None

    def __init__(self, capacity=None):
        self.capacity = capacity

    def has_room(self, nbytes):
        """Whether a checkpoint of ``nbytes`` bytes fits the budget now."""
        return self.capacity is None or self.bytes + nbytes <= self.capacity

    def put(self, pos, state, meta):
        """Keep a copy of the state at step position ``pos``.

        Parameters
        ----------
        pos : int
            The step position (0: y0).
        state : Tensor
            This rank's state, in the solver's dtype and on its device; its memory is
            overwritten by the next step, so keep a copy.
        meta : dict
            ``time``, ``step`` and ``step_size`` (of the step that reached it).
        """
        raise NotImplementedError

    def get(self, pos):
        """The state kept at ``pos``: a tensor of the shape, dtype and bytes it was put with
        (the store checks them), on any device."""
        raise NotImplementedError

    def drop(self, pos):
        """Forget the state at ``pos``."""
        raise NotImplementedError

    def prefetch(self, pos):
        """Start reading `pos` back ahead of need (no-op where reads are immediate)."""

    def settle(self):
        """Wait for the writes in flight."""

    def finish_forward(self, times):
        """The forward solve ended with these step times."""

    def stats(self):
        return {f"{self.name}_bytes_peak": self.peak, f"{self.name}_checkpoints": self.stored}

    def close(self):
        self.bytes = 0


class MemoryTier(Tier):
    """Checkpoints held as tensors in host memory (or on `device`). On the host they are rows
    of slabs of about SLAB bytes, allocated as needed and reused once dropped: one small
    tensor per checkpoint, allocated between the solve's temporaries, fragmented the heap
    (resident memory 2-4x the checkpoints' bytes, measured at 1000 steps of 64 KiB)."""

    SLAB = 4 << 20
    fallible = False
    trusted = True

    def __init__(self, name, capacity, device="cpu"):
        super().__init__(capacity)
        self.name, self.device = name, device
        self.data = {}
        self.slabbed = torch.device(device).type == "cpu"
        self.free = []               # unused slab rows

    def _row(self, state):
        """A tensor to copy `state` into."""
        if not self.slabbed:
            return torch.empty_like(state, device=self.device)
        if self.free and (self.free[-1].shape, self.free[-1].dtype) == (state.shape,
                                                                        state.dtype):
            return self.free.pop()
        rows = max(1, self.SLAB // max(1, state.nbytes))
        self.free = list(torch.empty((rows,) + tuple(state.shape), dtype=state.dtype).unbind(0))
        return self.free.pop()

    def put(self, pos, state, meta):
        self.data[pos] = self._row(state).copy_(state)

    def get(self, pos):
        return self.data[pos]

    def drop(self, pos):
        row = self.data.pop(pos)
        if self.slabbed:
            self.free.append(row)

    def close(self):
        self.data.clear()
        self.free.clear()
        super().close()


class DeviceTier(MemoryTier):
    """GPU memory: room is the byte budget and what torch reports free (less a reserve)."""

    RESERVE = 256 << 20
    fallible = True              # room depends on each rank's free GPU memory

    def __init__(self, capacity, device):
        super().__init__("device", capacity, device=device)

    def has_room(self, nbytes):
        free, _ = torch.cuda.mem_get_info(self.device)
        return super().has_room(nbytes) and nbytes + self.RESERVE <= free


class PinnedHostTier(MemoryTier):
    """Page-locked host memory for checkpoints of a state on GPU `device`. put() snapshots the
    state on the compute stream (the TS overwrites it in the next step) and copies the snapshot
    to the host on a side stream; prefetch() copies upcoming checkpoints back to the GPU on that
    stream while the adjoint runs; get() makes the compute stream wait for the copy it uses."""

    def __init__(self, capacity, device, depth):
        super().__init__("host", capacity)
        self.slabbed = False         # page-locked tensors of its own (put)
        self.gpu, self.depth = device, depth
        self.stream = torch.cuda.Stream(device)
        self.copied = {}             # pos -> event: the device-to-host copy is done
        self.ahead = {}              # pos -> (GPU tensor, event) read back ahead of need
        self.hits = self.misses = 0

    def _on_side_stream(self, src, dst_device):
        """Copy `src` to `dst_device` on the side stream, after the work queued so far on the
        compute stream; returns (copy, event recorded after it)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.gpu))
        with torch.cuda.stream(self.stream):
            pinned = dst_device == "cpu"
            out = torch.empty(src.shape, dtype=src.dtype, device=dst_device, pin_memory=pinned)
            out.copy_(src, non_blocking=True)
            if src.is_cuda:          # not to be reused before this copy has read it
                src.record_stream(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def put(self, pos, state, meta):
        snapshot = state.clone()
        self.data[pos], self.copied[pos] = self._on_side_stream(snapshot, "cpu")

    def prefetch(self, pos):
        if pos in self.data and pos not in self.ahead and len(self.ahead) < self.depth:
            self.ahead[pos] = self._on_side_stream(self.data[pos], self.gpu)

    def get(self, pos):
        compute = torch.cuda.current_stream(self.gpu)
        ahead = self.ahead.pop(pos, None)
        if ahead is None:
            self.misses += 1
            compute.wait_event(self.copied[pos])
            return self.data[pos].to(self.gpu, non_blocking=True)
        self.hits += 1
        tensor, event = ahead
        compute.wait_event(event)
        tensor.record_stream(compute)
        return tensor

    def drop(self, pos):
        self.ahead.pop(pos, None)
        self.copied.pop(pos)
        super().drop(pos)

    def stats(self):
        return dict(super().stats(), host_prefetch_hits=self.hits,
                    host_prefetch_misses=self.misses)

    def close(self):
        self.stream.synchronize()
        self.ahead.clear()
        self.copied.clear()
        super().close()


_FAILED = object()               # what CheckpointStore._call returns for a failed call


class _Kept(collections.namedtuple("_Kept", "tier shape dtype device nbytes crc")):
    """What the store knows of a checkpoint it put: where it went and what get() must return
    (`crc`: CRC-32 of its bytes, None for a trusted tier)."""

    def problem(self, state):
        """Why `state` is not the checkpoint that was put (None: it is)."""
        if not isinstance(state, torch.Tensor):
            return f"get() returned a {type(state).__name__}, not a tensor"
        if tuple(state.shape) != self.shape or state.dtype != self.dtype:
            return (f"get() returned a {state.dtype} tensor of shape {tuple(state.shape)}, not "
                    f"the {self.dtype} tensor of shape {self.shape} it was given")
        if self.crc is not None and _crc32(state) != self.crc:
            return "get() returned other values than it was given (their CRC-32 differs)"
        return None


def _crc32(state):
    """CRC-32 of a tensor's bytes (copied to the host first if it is on a GPU)."""
    return zlib.crc32(state.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class CheckpointStore:
    """Tiers from fastest to slowest; `where` maps each held position to its tier and what was
    put there (_Kept). The store counts the tiers' checkpoints and bytes, checks every restore
    (shape, dtype; bytes by CRC-32 for tiers not `trusted`), and records the first failure of
    a tier (an exception in one of its methods, or a wrong restore) in `error` instead of
    raising: the strategy raises it on every rank (after each put and restore where a tier is
    `fallible`, else at the end of the pass)."""

    def __init__(self, tiers, state_bytes):
        for tier in tiers:
            if not isinstance(tier, Tier) or not isinstance(tier.name, str) or not tier.name:
                raise InputError(f"checkpoint tier {tier!r}: Checkpointing.tiers() must return "
                                 "pnode_dist.checkpointing.Tier instances, each with a name "
                                 "(the prefix of its stats keys)")
        self.tiers = tiers
        self.state_bytes = state_bytes
        self.where = {}
        self.overflow = None         # a checkpoint no tier had room for (then not kept)
        self.failure = None          # the first failure of a tier's method or restore

    def _failed(self, tier, doing, problem, severity=SYMPTOM):
        if self.failure is None:
            self.failure = (severity, f"checkpoint tier {tier.name!r} failed {doing}: {problem}")

    def _call(self, tier, doing, method, *args):
        """tier.method(*args), or _FAILED with its exception recorded as the tier's failure."""
        try:
            return method(*args)
        except Exception as exc:  # noqa: BLE001 - reported on every rank by the strategy
            self._failed(tier, doing, f"{type(exc).__name__}: {exc}", CAUSE)
            return _FAILED

    def held(self):
        return sorted(self.where)

    def __contains__(self, pos):
        return pos in self.where

    def put(self, pos, state, t, step_size):
        for tier in self.tiers:
            room = self._call(tier, f"placing the checkpoint of step {pos}", tier.has_room,
                              state.nbytes)
            if room is _FAILED:
                return
            if room:
                self.where[pos] = _Kept(tier, tuple(state.shape), state.dtype, state.device,
                                        state.nbytes, None if tier.trusted else _crc32(state))
                self._call(tier, f"storing the checkpoint of step {pos}", tier.put, pos, state,
                           {"time": float(t), "step": int(pos), "step_size": float(step_size)})
                tier.bytes += state.nbytes
                tier.stored += 1
                tier.peak = max(tier.peak, tier.bytes)
                return
        # Recorded, not raised (this may run in a step callback, on this rank only): the
        # strategy reports it on every rank.
        if self.overflow is None:
            self.overflow = (SYMPTOM, f"no checkpoint tier has room for the checkpoint of "
                             f"step {pos} (the slot count exceeds the byte budgets): raise a "
                             "budget or lower Checkpointing(slots=...)")

    def get(self, pos):
        """The checkpoint at `pos`, checked; NaN after a failure (see `error`)."""
        kept = self.where[pos]
        doing = f"restoring the checkpoint of step {pos}"
        state = self._call(kept.tier, doing, kept.tier.get, pos)
        if state is not _FAILED:
            problem = kept.problem(state)
            if problem is None:
                return state
            self._failed(kept.tier, doing, problem)
        return torch.full(kept.shape, float("nan"), dtype=kept.dtype, device=kept.device)

    def drop(self, pos):
        kept = self.where.pop(pos)
        self._call(kept.tier, f"dropping the checkpoint of step {pos}", kept.tier.drop, pos)
        kept.tier.bytes -= kept.nbytes

    def prefetch(self, upcoming):
        """Start reading the checkpoints the backward pass restores next."""
        for pos in upcoming:
            kept = self.where.get(pos)
            if kept is not None:
                self._call(kept.tier, f"prefetching step {pos}", kept.tier.prefetch, pos)

    @property
    def bytes(self):
        return sum(t.bytes for t in self.tiers)

    @property
    def fallible(self):
        """Whether a put or restore can fail on one rank only (a tier of the user's, a disk
        tier, GPU memory): then the strategy checks, on every rank, each one before going on
        (tier contents differ between ranks; this does not)."""
        return any(t.fallible for t in self.tiers)

    @property
    def error(self):
        """The first error of a tier or of placement, as (severity, message), or None."""
        return (next((t.error for t in self.tiers if t.error), None) or self.failure
                or self.overflow)

    def settle(self):
        """Wait for the writes in flight (their errors land in `error`)."""
        for tier in self.tiers:
            self._call(tier, "finishing its writes", tier.settle)

    def finish_forward(self, times):
        for tier in self.tiers:
            self._call(tier, "at the end of the forward solve", tier.finish_forward, times)

    def stats(self):
        out = {}
        for tier in self.tiers:
            out.update(tier.stats())
        return out

    def close(self):
        for tier in self.tiers:
            tier.close()
        self.where.clear()
