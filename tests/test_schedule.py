"""Checkpoint schedules: revolve's optimum, the plans that reach it, and the online placement."""
from functools import lru_cache

import pytest

from pnode_dist._reversal.schedule import (Placement, first_sweep, plan_advances, reversal_plan,
                                 revolve_cost, revolve_split)


@lru_cache(maxsize=None)
def _brute_force_cost(n, free):
    """The optimum by exhaustive recursion: advance j, store, reverse the rest with one slot
    less, then the first j with the slot back."""
    if n <= 1:
        return 0
    if free == 0:
        return n * (n - 1) // 2
    return min(j + _brute_force_cost(n - j, free - 1) + _brute_force_cost(j, free)
               for j in range(1, n))


@pytest.mark.parametrize("free", range(0, 6))
def test_revolve_cost_is_the_optimum(free):
    for n in range(1, 60):
        assert revolve_cost(n, free) == _brute_force_cost(n, free), (n, free)


def test_revolve_split_reaches_the_optimum():
    for free in range(1, 5):
        for n in range(2, 50):
            j = revolve_split(n, free)
            assert j + revolve_cost(n - j, free - 1) + revolve_cost(j, free) == \
                revolve_cost(n, free), (n, free, j)


def _simulate(n, slots, held, ops):
    """Replay a plan's bookkeeping: (peak checkpoints held, steps in the order reversed)."""
    live, peak, reversed_steps = set(held), len(held), []
    for op in ops:
        if op.kind == "store":
            live.add(op.a)
            peak = max(peak, len(live))
        elif op.kind == "drop":
            live.discard(op.a)
        elif op.kind == "record":
            reversed_steps.extend(range(op.b - 1, op.a - 1, -1))
    return peak, reversed_steps


# For a table of (steps, slots), the plans (forward sweep + backward re-runs) take exactly
# Griewank-Walther's least number of forward steps t(n, s) (revolve_cost, checked above against
# exhaustive search), keep at most `slots` states and reverse every step once, in order.
@pytest.mark.parametrize("n,slots", [(1, 1), (2, 1), (10, 1), (10, 2), (10, 3), (20, 3),
                                     (55, 3), (56, 3), (100, 5), (1000, 10), (30, 30),
                                     (7, 50)])
def test_binomial_plan_is_optimal_and_within_slots(n, slots):
    held = [0] + first_sweep(n, slots)
    assert len(held) <= slots
    ops = reversal_plan(n, held, slots, tail=n - 1 > held[-1], record_span=1)
    peak, order = _simulate(n, slots, held, ops)
    assert order == list(range(n - 1, -1, -1))
    assert peak <= slots
    # the forward solve's n - 1 steps to y_{n-1} plus the backward's re-runs
    assert (n - 1) + plan_advances(ops) == revolve_cost(n, slots - 1)


def test_known_binomial_values():
    # t(n, s) = r n - C(s + 1 + r, r - 1), r least with C(s + 1 + r, r) >= n:
    # n = 10, s = 2 -> r = 2 (C(5, 2) = 10), t = 20 - C(5, 1) = 15
    assert revolve_cost(10, 2) == 15
    assert revolve_cost(10, 0) == 45
    assert revolve_cost(5, 10) == 4      # enough slots: one sweep


@pytest.mark.parametrize("kind", ["uniform", "binomial"])
@pytest.mark.parametrize("expected", [None, 40, 100])
def test_placement_stays_within_slots_for_any_length(kind, expected):
    slots, n = 6, 300
    placement = Placement(kind, slots, expected)
    held = [0]
    for pos in range(1, n + 1):
        keep, drop = placement.decide(pos, held)
        held = [p for p in held if p not in drop]
        if keep:
            held.append(pos)
        assert len(held) <= slots
    gaps = [b - a for a, b in zip(held, held[1:] + [n])]
    assert max(gaps) <= 2 * n / (slots - 1) + 1, held     # thinned evenly, not piled up
    ops = reversal_plan(n, [p for p in held if p < n - 1], slots, tail=True,
                        record_span=1 if kind == "binomial" else None)
    peak, order = _simulate(n, slots, held, ops)
    assert order == list(range(n - 1, -1, -1)) and peak <= slots


def test_uniform_plan_records_whole_segments():
    n, slots = 20, 4
    placement = Placement("uniform", slots, n)
    held = [0] + [p for p in range(1, n) if placement.decide(p, [0])[0]]
    assert held == [0, 5, 10, 15]
    ops = reversal_plan(n, held, slots, tail=False, record_span=None)
    assert [(op.a, op.b) for op in ops if op.kind == "record"] == \
        [(15, 20), (10, 15), (5, 10), (0, 5)]
    assert plan_advances(ops) == 0
