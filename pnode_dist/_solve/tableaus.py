"""Butcher tableaus: the explicit ones pnode_dist names (typed from exact fractions, or read from
PETSc), and two of PETSc's ARKIMEX pairs, for the pure-torch replays that check the discrete
adjoint to round-off (pnode_dist.reference)."""
from dataclasses import dataclass, field
from fractions import Fraction as F
from typing import Tuple


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta tableau; `a` is strictly lower triangular, rows given as tuples."""
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    c: Tuple[float, ...]
    tolerance: float = field(default=1e-14, compare=False)   # of the checks (PETSc's precision)

    def __post_init__(self):
        s = len(self.b)
        if len(self.c) != s or len(self.a) != s:
            raise ValueError("tableau: a, b and c must describe the same number of stages")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"tableau: row {i} of a must have {i} entries (explicit method)")
            if abs(sum(row) - self.c[i]) > self.tolerance:
                raise ValueError(f"tableau: row {i} of a must sum to c[{i}]")
        if abs(sum(self.b) - 1.0) > self.tolerance:
            raise ValueError("tableau: the weights b must sum to 1")

    @property
    def stages(self) -> int:
        return len(self.b)


@dataclass(frozen=True)
class DenseOutput:
    """A continuous extension of an RK step (PETSc's `binterp`): inside the step from t_n of
    size h, y(t_n + theta h) = y_n + h sum_i b_i(theta) k_i, with the stage derivatives k_i and
    b_i(theta) = sum_j coefficients[i][j] theta^(j+1)."""
    coefficients: Tuple[Tuple[float, ...], ...]

    def weights(self, theta):
        """b_i(theta) for every stage."""
        return [sum(c * theta ** (j + 1) for j, c in enumerate(row)) for row in self.coefficients]


def hermite(tableau, fsal):
    """The Hermite interpolant of a step that needs no extra evaluation of f: cubic through
    y_n, y_n+1, f(y_n) = k_1 and f(y_n+1) = k_s for an FSAL tableau (order 3), else quadratic
    through y_n, k_1 and y_n+1 (order 2). Its order is its degree."""
    s = tableau.stages
    rows = []
    for i, b in enumerate(tableau.b):
        first, last = float(i == 0), float(i == s - 1)
        if fsal:    # b(3 th^2 - 2 th^3) + [i=1](th - 2 th^2 + th^3) + [i=s](th^3 - th^2)
            rows.append((first, 3 * b - 2 * first - last, -2 * b + first + last))
        else:       # [i=1] th + (b - [i=1]) th^2
            rows.append((first, b - first))
    return DenseOutput(coefficients=tuple(rows))


def from_fractions(a, b):
    """Build a tableau from exact fractions (c follows from the rows of a)."""
    rows = tuple(tuple(float(x) for x in row) for row in a)
    c = tuple(float(sum(row, F(0))) for row in a)
    return ButcherTableau(a=rows, b=tuple(float(x) for x in b), c=c)


class PetscTableau:
    """A tableau PETSc ships, read from PETSc at first use (so that it is never retyped)."""

    def __init__(self, subtype):
        self.subtype = subtype
        self._tableau = None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._tableau is None:
            from .rk_register import petsc_tableau      # needs PETSc: imported at first use
            self._tableau = petsc_tableau(self.subtype)
        return getattr(self._tableau, name)


EULER = from_fractions([[]], [1])
MIDPOINT = from_fractions([[], [F(1, 2)]], [0, 1])
RK4 = from_fractions([[], [F(1, 2)], [0, F(1, 2)], [0, 0, 1]],
                     [F(1, 6), F(1, 3), F(1, 3), F(1, 6)])
BOSH3 = from_fractions([[], [F(1, 2)], [0, F(3, 4)], [F(2, 9), F(1, 3), F(4, 9)]],
                       [F(2, 9), F(1, 3), F(4, 9), 0])
BOSH3_EMBEDDED = tuple(float(x) for x in (F(7, 24), F(1, 4), F(1, 3), F(1, 8)))
DOPRI5 = from_fractions(
    [[], [F(1, 5)], [F(3, 40), F(9, 40)], [F(44, 45), F(-56, 15), F(32, 9)],
     [F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)],
     [F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)],
     [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84)]],
    [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0])

HEUN = from_fractions([[], [1]], [F(1, 2), F(1, 2)])
HEUN3 = from_fractions([[], [F(1, 3)], [0, F(2, 3)]], [F(1, 4), 0, F(3, 4)])
RK4_38 = from_fractions([[], [F(1, 3)], [F(-1, 3), 1], [1, -1, 1]],
                        [F(1, 8), F(3, 8), F(3, 8), F(1, 8)])
FEHLBERG2 = from_fractions([[], [F(1, 2)], [F(1, 256), F(255, 256)]],
                           [F(1, 512), F(255, 256), F(1, 512)])
FEHLBERG2_EMBEDDED = (1 / 256, 255 / 256, 0.0)     # weights of its error estimate's formula
HEUN_EMBEDDED = (1.0, 0.0)                          # Euler's step: Heun-Euler 2(1)

_US2 = 1.0 - 1.0 / 2.0 ** 0.5
# Two of PETSc's ARKIMEX tableaus, for the pure-torch replay (reference.ark_replay):
# (explicit A, explicit b, implicit At, implicit bt).
ARK_TABLEAUS = {
    "a2": (((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), ((0.0, 0.0), (0.5, 0.5)), (0.5, 0.5)),
    "l2": (((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), ((_US2, 0.0), (1.0 - 2.0 * _US2, _US2)),
           (0.5, 0.5)),
}
