"""Registry of integration methods: name -> PETSc TS type/subtype and the Butcher tableau.

The tableau is what PETSc integrates with; it is kept here so that a pure-torch replay of the
same discrete scheme (pnode_dist.reference) can check the discrete adjoint to round-off.
"""
import warnings
from dataclasses import dataclass
from fractions import Fraction as F
from typing import Optional, Tuple

from .errors import InputError


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta tableau; `a` is strictly lower triangular, rows given as tuples."""
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    c: Tuple[float, ...]

    def __post_init__(self):
        s = len(self.b)
        if len(self.c) != s or len(self.a) != s:
            raise ValueError("tableau: a, b and c must describe the same number of stages")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"tableau: row {i} of a must have {i} entries (explicit method)")
            if abs(sum(row) - self.c[i]) > 1e-14:
                raise ValueError(f"tableau: row {i} of a must sum to c[{i}]")
        if abs(sum(self.b) - 1.0) > 1e-14:
            raise ValueError("tableau: the weights b must sum to 1")

    @property
    def stages(self) -> int:
        return len(self.b)


def _tableau(a, b):
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


EXPLICIT, IMPLICIT, IMEX = "explicit", "implicit", "imex"


@dataclass(frozen=True)
class Method:
    """One integration method as PETSc runs it."""
    name: str
    ts_type: str
    subtype: Optional[str]      # the TSRK / TSARKIMEX type
    order: int
    adaptive: bool              # has an error estimate usable by TSAdapt
    tableau: Optional[ButcherTableau] = None
    kind: str = EXPLICIT        # explicit (RHS form), implicit (IFunction), imex (both)
    register: bool = False      # a tableau PETSc does not ship: registered at first use
    embedded: Optional[Tuple[float, ...]] = None   # weights of the error estimate's formula


_RK4 = _tableau([[], [F(1, 2)], [0, F(1, 2)], [0, 0, 1]], [F(1, 6), F(1, 3), F(1, 3), F(1, 6)])
_BOSH3 = _tableau([[], [F(1, 2)], [0, F(3, 4)], [F(2, 9), F(1, 3), F(4, 9)]],
                  [F(2, 9), F(1, 3), F(4, 9), 0])
_DOPRI5 = _tableau(
    [[], [F(1, 5)], [F(3, 40), F(9, 40)], [F(44, 45), F(-56, 15), F(32, 9)],
     [F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)],
     [F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)],
     [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84)]],
    [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0])

_HEUN = _tableau([[], [1]], [F(1, 2), F(1, 2)])
_HEUN3 = _tableau([[], [F(1, 3)], [0, F(2, 3)]], [F(1, 4), 0, F(3, 4)])
_RK4_38 = _tableau([[], [F(1, 3)], [F(-1, 3), 1], [1, -1, 1]], [F(1, 8), F(3, 8), F(3, 8), F(1, 8)])
_FEHLBERG2 = _tableau([[], [F(1, 2)], [F(1, 256), F(255, 256)]],
                      [F(1, 512), F(255, 256), F(1, 512)])

METHODS = {
    m.name: m for m in (
        Method("euler", "rk", "1fe", 1, False, _tableau([[]], [1])),
        Method("midpoint", "rk", "2b", 2, False, _tableau([[], [F(1, 2)]], [0, 1])),
        Method("rk4", "rk", "4", 4, False, _RK4),
        Method("bosh3", "rk", "3bs", 3, True, _BOSH3),
        Method("dopri5", "rk", "5dp", 5, True, _DOPRI5),
        # torchdiffeq's other explicit methods: Heun (PETSc's 2a), the rest registered with
        # PETSc (rk_register). torchdiffeq's 'rk4' is the 3/8 rule: here 'rk4_38'.
        Method("heun2", "rk", "2a", 2, False, _HEUN),
        Method("adaptive_heun", "rk", "2a", 2, True, _HEUN),
        Method("heun3", "rk", "pnode_heun3", 3, False, _HEUN3, register=True),
        Method("rk4_38", "rk", "pnode_rk4_38", 4, False, _RK4_38, register=True),
        Method("fehlberg2", "rk", "pnode_fehlberg2", 2, True, _FEHLBERG2, register=True,
               embedded=(1 / 256, 255 / 256, 0.0)),
        # Verner's pairs as PETSc ships them.
        Method("verner6", "rk", "6vr", 6, True, PetscTableau("6vr")),
        Method("verner7", "rk", "7vr", 7, True, PetscTableau("7vr")),
        Method("verner8", "rk", "8vr", 8, True, PetscTableau("8vr")),
        # Implicit one-step methods (PETSc TSTHETA family), IFunction form F = ydot - f.
        # Adaptive through TSTHETA's local error estimate when no step_size is given.
        Method("beuler", "beuler", None, 1, True, kind=IMPLICIT),
        Method("cn", "cn", None, 2, True, kind=IMPLICIT),
        Method("theta", "theta", None, 1, True, kind=IMPLICIT),    # order 2 for theta = 0.5
        # Additive Runge-Kutta IMEX (PETSc TSARKIMEX); func must be a pnode_dist.IMEX pair.
        Method("arkimex", "arkimex", "3", 3, True, kind=IMEX),
    )
}
_US2 = 1.0 - 1.0 / 2.0 ** 0.5
# Two of PETSc's ARKIMEX tableaus, for the pure-torch replay (reference.ark_replay):
# (explicit A, explicit b, implicit At, implicit bt).
ARK_TABLEAUS = {
    "a2": (((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), ((0.0, 0.0), (0.5, 0.5)), (0.5, 0.5)),
    "l2": (((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), ((_US2, 0.0), (1.0 - 2.0 * _US2, _US2)),
           (0.5, 0.5)),
}
ARKIMEX_ORDERS = {"1bee": 1, "a2": 2, "l2": 2, "ars122": 2, "2c": 2, "2d": 2, "2e": 2,
                  "prssp2": 2, "3": 3, "bpr3": 3, "ars443": 3, "4": 4, "5": 5}
DEFAULT_METHOD = "dopri5"
# torchdiffeq's names for which a method of the same order and use stands in (said once).
ALIASES = {"dopri8": ("verner8", "torchdiffeq's dopri8 (Dormand-Prince 8(7)) runs as verner8, "
                      "Verner's 8(7) pair as PETSc ships it: the same order and error control, "
                      "a different tableau")}
_said = set()
# torchdiffeq's methods with no counterpart here, and why.
UNAVAILABLE = dict.fromkeys(
    ("explicit_adams", "implicit_adams", "fixed_adams"),
    "multistep (Adams) methods have no discrete adjoint in PETSc; use dopri5 (or verner8 for "
    "high accuracy), and beuler, cn or arkimex for stiff problems")
UNAVAILABLE["scipy_solver"] = ("SciPy's solvers run outside PETSc, with neither distributed "
                               "states nor a discrete adjoint; use the PETSc methods below")


def get_method(name: Optional[str]) -> Method:
    """Look a method up by name (or a torchdiffeq alias); None means the default (dopri5, as
    in torchdiffeq)."""
    if name is None:
        name = DEFAULT_METHOD
    if isinstance(name, str) and name in ALIASES:
        name, note = ALIASES[name]
        if note not in _said:
            _said.add(note)
            warnings.warn(note, UserWarning, stacklevel=3)
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(METHODS))
        why = f" ({UNAVAILABLE[name]})" if isinstance(name, str) and name in UNAVAILABLE else ""
        raise InputError(
            f"unknown method {name!r}{why}: valid methods are {valid}. Any other PETSc RK tableau can "
            "be chosen with the PETSc option -[prefix]ts_rk_type (for example 5bs or 3), "
            "given on the command line or in petsc_options={'ts_rk_type': ...}") from None
