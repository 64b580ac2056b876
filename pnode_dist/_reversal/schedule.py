"""Checkpoint schedules: which forward states are kept, and how the backward pass reverses the
steps between them.

Positions are step indices: position i is the state y_i at the start of step i (y_0 = y0,
y_n = the final state). Reversing step i means re-running it from y_i with PETSc's trajectory on
(its stages recorded) and applying its discrete adjoint.

The binomial schedule is Griewank and Walther's revolve: with y_0 stored and `free` further slots,
reversing n steps costs at least revolve_cost(n, free) forward steps, counting the first sweep
to y_{n-1} (which our forward solve performs, keeping y_{n-1} in a one-state tail buffer).
The forward solve stores the first sweep's checkpoints (forward_positions); the backward pass
then follows the optimal recursion (reversal_plan), so it advances exactly
revolve_cost(n, free) - (n - 1) steps when the number of steps was known in advance.
"""
from dataclasses import dataclass
from functools import lru_cache
from math import comb
from typing import List, Optional, Tuple

UNBOUNDED = None


def revolve_cost(n: int, free: int) -> int:
    """Least number of forward steps that reverse n steps from a stored y_0 with `free` more
    checkpoint slots (Griewank-Walther): t*n - C(free+1+t, t-1), where t is the least integer
    with C(free+1+t, t) >= n; n(n-1)/2 without free slots."""
    if n <= 1:
        return 0
    if free == 0:
        return n * (n - 1) // 2
    t = 1
    while comb(free + 1 + t, t) < n:
        t += 1
    return t * n - comb(free + 1 + t, t - 1)


@lru_cache(maxsize=1 << 16)
def revolve_split(n: int, free: int) -> int:
    """How many steps to advance from a stored state before storing the next checkpoint, in an
    optimal schedule for n steps and `free` slots (n >= 2, free >= 1). The cost of a split j,
    j + cost(n-j, free-1) + cost(j, free), is convex in j: bisect on its increments."""
    def cost(j):
        return j + revolve_cost(n - j, free - 1) + revolve_cost(j, free)
    lo, hi = 1, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid + 1) - cost(mid) >= 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


def first_sweep(n: int, slots: int) -> List[int]:
    """Positions (besides 0) that revolve's first sweep stores for n steps and `slots` slots
    (y_0's included)."""
    positions, pos, remaining, free = [], 0, n, slots - 1
    while remaining > 1 and free > 0:
        j = revolve_split(remaining, free)
        pos += j
        remaining -= j
        free -= 1
        positions.append(pos)
    return positions


class Placement:
    """Decides, step by step during the forward solve, which states to keep.

    With the number of steps known (`expected_steps`: fixed steps, or the previous solve of the
    same problem), binomial placement stores revolve's first sweep and uniform placement every
    ceil(n / slots)-th state. Past the expected end (or with no expectation), an online rule
    keeps the stored states evenly spread: it stores a state once the last checkpoint is
    `stride` steps behind, making room by dropping the checkpoint whose neighbours are closest,
    and the stride follows the smallest gap left."""

    def __init__(self, kind: str, slots: int, expected_steps: Optional[int]):
        self.slots = slots
        self.limit = expected_steps or 0
        if kind == "binomial":
            self.planned = set(first_sweep(self.limit, slots)) if self.limit else set()
        else:
            every = max(1, -(-self.limit // slots)) if self.limit else 1
            self.planned = set(range(every, self.limit, every))
        self.stride = None

    def decide(self, position: int, held: List[int]) -> Tuple[bool, List[int]]:
        """(store y_position?, positions to drop first). `held`: stored positions, ascending."""
        if position <= self.limit:
            return position in self.planned and len(held) < self.slots, []
        if self.stride is None:
            gaps = [b - a for a, b in zip(held, held[1:])]
            self.stride = min(gaps) if gaps and len(held) >= self.slots else 1
        if position - held[-1] < self.stride:
            return False, []
        if len(held) < self.slots:
            return True, []
        if self.slots < 2:
            return False, []
        points = held + [position]
        i = min(range(1, len(held)), key=lambda k: points[k + 1] - points[k - 1])
        kept = points[:i] + points[i + 1:]
        self.stride = min(b - a for a, b in zip(kept, kept[1:]))
        return True, [held[i]]


@dataclass(frozen=True)
class Op:
    """One action of the backward pass.
    advance: re-run steps a..b-1 from the checkpoint y_a without recording; y_b is left in the
             work state
    store:   keep the work state (y_a) as a checkpoint
    record:  re-run steps a..b-1 from y_a (the work state, a checkpoint or the tail buffer)
             with the trajectory on, and apply their adjoint
    drop:    free the checkpoint at a"""
    kind: str
    a: int
    b: int = 0


def reversal_plan(n: int, held: List[int], slots: int, tail: bool, record_span) -> List[Op]:
    """The backward pass over n steps, given the stored positions `held` (ascending, 0 first),
    the slot count, whether y_{n-1} is in the tail buffer, and the longest stretch recorded at
    once (1 for binomial, None for whole intervals)."""
    ops: List[Op] = []
    free = slots - len(held)
    bounds = list(held) + [n]
    if tail and n - 1 > held[-1]:
        ops.append(Op("record", n - 1, n))
        bounds[-1] = n - 1
    for k in range(len(held) - 1, -1, -1):
        a, b = bounds[k], bounds[k + 1]
        if b > a:
            _reverse(ops, a, b, free, record_span)
        if a > 0:
            ops.append(Op("drop", a))
            free += 1
    return ops


def _reverse(ops, a, b, free, record_span):
    """Reverse steps a..b-1 with y_a stored and `free` slots (revolve's recursion)."""
    while b > a:
        n = b - a
        if record_span is None or n <= record_span:
            ops.append(Op("record", a, b))
            return
        if free == 0:                       # advance to the last step, reverse it, repeat
            ops.append(Op("advance", a, b - 1))
            ops.append(Op("record", b - 1, b))
            b -= 1
            continue
        j = revolve_split(n, free)
        ops.append(Op("advance", a, a + j))
        ops.append(Op("store", a + j))
        _reverse(ops, a + j, b, free - 1, record_span)
        ops.append(Op("drop", a + j))
        b = a + j


def plan_advances(ops: List[Op]) -> int:
    """Forward steps re-run without recording by a plan."""
    return sum(op.b - op.a for op in ops if op.kind == "advance")
