"""torchdiffeq's input conventions, mapped onto one batch-shaped tensor and increasing times.

- A state that is a tuple of tensors (nested tuples too), such as FFJORD's (z, logp), or a 0-d
  tensor, is packed into one [rows, n] tensor: rows is the leaves' common leading (batch)
  dimension, split over ranks as usual, or 1 when they have none in common; func sees and
  returns the user's structure (`Packed`).
- Decreasing times t_0 > t_1 > ... are solved as s = -t increasing, with ds/dt = -1:
  dy/ds = -func(-s, y) (`Reversed`). Outputs come in the order of t, as torchdiffeq's.
- torchdiffeq's step callbacks on func are called from the forward solve (`StepCallbacks`).
The wrappers are modules (func's parameters stay reachable) and are cached per func, so that
repeated calls reuse one solver.
"""
import collections

import torch
from torch import nn

from ..errors import InputError


class Reversed(nn.Module):
    """dy/ds = -func(-s, y): integrating s = -t forward integrates t backwards."""

    def __init__(self, func):
        super().__init__()
        self.func = func

    def forward(self, s, y):
        return -self.func(-s, y)


class Packed(nn.Module):
    """func on a structure of tensors, seen by the solver as one [rows, n] tensor."""

    def __init__(self, func, spec):
        super().__init__()
        self.func, self.spec = func, spec

    def forward(self, t, y):
        out = self.func(t, self.spec.unpack(y))
        return self.spec.pack(out, what="func(t, y)")


class Spec:
    """The structure of a state: nested tuples of tensors (`tree`, leaves replaced by their
    index) and each leaf's shape on this rank. rows: the common leading dimension (or 1)."""

    def __init__(self, state):
        leaves = []
        self.tree = _structure(state, leaves)
        self.shapes = [tuple(x.shape) for x in leaves]
        self.dtype = leaves[0].dtype
        firsts = {s[0] if s else None for s in self.shapes}
        self.batched = len(firsts) == 1 and None not in firsts
        self.rows = self.shapes[0][0] if self.batched else 1
        self.widths = [_numel(s) // self.rows for s in self.shapes]
        for x in leaves:
            if x.dtype != self.dtype or x.device != leaves[0].device:
                raise InputError("every tensor of a tuple state must have the same dtype and "
                                 f"device; got {x.dtype} on {x.device} and {self.dtype} on "
                                 f"{leaves[0].device}")

    @property
    def key(self):
        """What identifies the layout for the solver cache and the ranks' agreement (the
        leading dimension may differ between ranks)."""
        trailing = [s[1:] if self.batched else s for s in self.shapes]
        return (repr(self.tree), tuple(map(tuple, trailing)), self.batched)

    def pack(self, state, what="y0"):
        leaves = []
        tree = _structure(state, leaves)
        if tree != self.tree or [tuple(x.shape) for x in leaves] != self.shapes:
            raise InputError(f"{what} returned a structure or shapes "
                             f"{_describe(tree, leaves)} that differ from y0's "
                             f"{_describe(self.tree, self.shapes)}")
        return torch.cat([x.reshape(self.rows, -1) for x in leaves], dim=1)

    def unpack(self, packed, lead=()):
        """The structure from a packed [*lead, rows, n] tensor."""
        parts = torch.split(packed, self.widths, dim=-1)
        leaves = [p.reshape(tuple(lead) + shape) for p, shape in zip(parts, self.shapes)]
        return _rebuild(self.tree, leaves)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _structure(state, leaves):
    """state with every tensor replaced by its index in `leaves` (appended)."""
    if isinstance(state, torch.Tensor):
        leaves.append(state)
        return len(leaves) - 1
    if isinstance(state, (tuple, list)) and state:
        return tuple(_structure(s, leaves) for s in state)
    raise InputError(f"a state must be a tensor or a (nested) tuple of tensors; got "
                     f"{type(state).__name__}")


def _rebuild(tree, leaves):
    if isinstance(tree, int):
        return leaves[tree]
    return tuple(_rebuild(t, leaves) for t in tree)


def _describe(tree, leaves):
    return repr(_rebuild(tree, [tuple(x.shape) if isinstance(x, torch.Tensor) else x
                                for x in leaves]))


CALLED = ("callback_step", "callback_accept_step")
NOT_CALLED = ("callback_reject_step", "callback_step_adjoint", "callback_accept_step_adjoint",
              "callback_reject_step_adjoint")


class StepCallbacks:
    """torchdiffeq's step callbacks of func, as an observer of the forward solve (not of the
    re-runs of a backward pass): callback_step(t0, y0, dt) before each step and
    callback_accept_step(t0, y0, dt) once it is accepted, t0 and y0 the step's start in the
    user's time and structure (this rank's part), as torchdiffeq calls them. An adaptive step
    that PETSc rejects and retries is one call of callback_step here (torchdiffeq: one per
    attempt); stats['rejected_steps'] counts the rejections."""
    role = "a step callback of func"

    def __init__(self, func, to_user, time_sign, dtype):
        self.step, self.accept = (getattr(func, name, None) for name in CALLED)
        self.to_user, self.sign, self.dtype = to_user, time_sign, dtype
        self.start = None

    @staticmethod
    def of(func, to_user, time_sign, dtype):
        """The observers for func's callbacks: none when it has none."""
        if not any(callable(getattr(func, name, None)) for name in CALLED):
            return ()
        return (StepCallbacks(func, to_user, time_sign, dtype),)

    def starting(self, pos, t, dt, state):
        self.start = (self._tensor(self.sign * t, state),
                      self.to_user(state.to(self.dtype, copy=True)))
        if callable(self.step):
            self.step(*self.start, self._tensor(dt, state))

    def accepted(self, pos, times, state):
        if callable(self.accept):          # the step taken: shorter if PETSc retried it
            self.accept(*self.start, self._tensor(times[pos] - times[pos - 1], state))

    def _tensor(self, value, state):
        return torch.tensor(value, dtype=self.dtype, device=state.device)


def needs_packing(y0):
    return not isinstance(y0, torch.Tensor) or y0.dim() == 0


_CACHE_SIZE = 32
_wrappers = collections.OrderedDict()   # (kind, id(func), spec key) -> wrapper (holds func)


def wrapped(kind, func, spec=None):
    """The cached Reversed/Packed module around func (one per func and state layout)."""
    key = (kind, id(func), None if spec is None else spec.key)
    wrapper = _wrappers.get(key)
    if wrapper is None:
        wrapper = Reversed(func) if kind == "reversed" else Packed(func, spec)
        _wrappers[key] = wrapper
        while len(_wrappers) > _CACHE_SIZE:
            _wrappers.popitem(last=False)
    elif kind == "packed":
        wrapper.spec = spec                 # this call's leading dimension
    _wrappers.move_to_end(key)
    return wrapper
