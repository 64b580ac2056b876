"""Integration methods: the registry :data:`METHODS` of every ``method=`` name, and the classes
behind it. Each family is one class (:class:`Method` subclasses such as :class:`ExplicitRK`)
that owns its set-up: the options it accepts, the torch callbacks (parts) its TS needs, how the
TS is configured, and the states PETSc's memory trajectory keeps per step. A new method is one
registry entry (one tableau, see :class:`ExplicitRK`); a new family is one class. :class:`IMEX`
splits a right-hand side for ``method='arkimex'``.
"""
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from ._solve import tableaus as tab
from ._solve.explicit import TorchRHS
from ._solve.implicit import TorchIFunction
from ._solve.rk_register import ensure_arkimex_registered, ensure_registered
from ._solve.tableaus import ButcherTableau, from_fractions  # noqa: F401 - for new methods
from .errors import InputError

LINEAR_SOLVERS = ("auto", "gmres", "exact")
# 'auto' takes the exact per-sample Newton up to this many elements per sample (batch layouts,
# funcs that do not couple samples), matrix-free GMRES beyond.
AUTO_EXACT_SIZE = 32
# The options of odeint's `options` dict that set up a TS (the others control the steps).
SETUP_OPTIONS = ("theta", "linear_solver", "tableau", "mass")


@dataclass(frozen=True)
class SetupConfig:
    """Choices fixed when a TS is built (part of the solver cache key)."""
    theta: float = 0.5
    linear_solver: str = "auto"      # Newton's linear solver: 'auto', 'gmres' or 'exact'
    tableau: str = None              # ARKIMEX tableau name (None: the method's default)
    mass: object = None              # constant mass matrix [d, d] (torch tensor) or None

    @property
    def key(self):
        mass = None if self.mass is None else (tuple(self.mass.shape), self.mass.double().tolist())
        return (self.theta, self.linear_solver, self.tableau, str(mass))


class IMEX(nn.Module):
    """A right-hand side split as f = implicit + explicit, for ``method='arkimex'``.

    PETSc's ARKIMEX solves the implicit part by Newton and steps the explicit part explicitly.
    With any other method it is just their sum.

    Parameters
    ----------
    implicit : callable
        ``implicit(t, y)``: the stiff part, solved by Newton (typically an ``nn.Module``).
    explicit : callable
        ``explicit(t, y)``: the non-stiff part, stepped explicitly.

    Raises
    ------
    InputError
        From :func:`pnode_dist.odeint`: ``method='arkimex'`` without an ``IMEX`` func, with a
        tuple ``y0`` or decreasing ``t`` (arkimex takes a tensor ``y0`` and increasing ``t``),
        or on a grid (not supported yet).

    Examples
    --------
    ::

        func = pnode_dist.IMEX(implicit=diffusion, explicit=reaction)
        ys = odeint(func, y0, t, method="arkimex", options={"tableau": "3"})
    """

    def __init__(self, implicit, explicit):
        super().__init__()
        self.implicit, self.explicit = implicit, explicit

    def forward(self, t, y):
        return self.implicit(t, y) + self.explicit(t, y)


class Method:
    """One integration method as PETSc runs it; the base class of every family.

    Subclasses say how: :meth:`setup` checks odeint's set-up options, :meth:`parts` builds the
    torch callbacks of a TS (explicit right-hand side, implicit IFunction), :meth:`configure`
    sets the TS type, and :attr:`states_per_step` / ``graphs_per_step`` size the checkpointing
    plan. The class attributes say what a method is: ``kind`` ('explicit': RHS form,
    'implicit': IFunction, 'imex': both), ``options`` (the set-up options it accepts),
    ``interpolates`` (evaluates output times by its dense output), ``on_grids`` (usable with a
    :class:`pnode_dist.Grid`), ``ts_types`` (PETSc TS types that run it: ``-ts_type`` may pick
    among them).

    Parameters
    ----------
    name : str
        The ``method=`` name.
    order : int
        The order of the method.
    adaptive : bool
        Whether it has an error estimate usable by TSAdapt.
    """
    interpolates = False         # evaluates output times by its dense output (ExplicitRK)
    kind = None                  # 'explicit' (RHS form), 'implicit' (IFunction), 'imex' (both)
    options: Tuple[str, ...] = ()    # the SETUP_OPTIONS it accepts
    on_grids = True              # usable with a pnode_dist.Grid
    ts_types = ()                # PETSc TS types that run it (-ts_type may pick among them)
    keep_after_replay = False    # see Integrator.destroy

    def __init__(self, name, order, adaptive):
        self.name, self.order = name, order
        self.adaptive = adaptive     # has an error estimate usable by TSAdapt

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, order={self.order})"

    def setup(self, options, func, y0) -> SetupConfig:
        """The SetupConfig of odeint's `options`, checked against what this method accepts."""
        for key in SETUP_OPTIONS:
            if key in options and key not in self.options:
                users = [m for m in METHODS.values() if key in m.options]
                kinds = "/".join(sorted({m.kind for m in users}))
                raise InputError(f"options[{key!r}] applies to the {kinds} methods "
                                 f"{', '.join(sorted(m.name for m in users))}; {self.name!r} "
                                 f"is {self.kind}")
        solver = options.get("linear_solver", "auto")
        if solver not in LINEAR_SOLVERS:
            raise InputError(f"options['linear_solver'] must be one of {list(LINEAR_SOLVERS)}; "
                             f"got {solver!r}")
        return SetupConfig(linear_solver=solver)

    def parts(self, func, params, shape, dtype, device, setup):
        """(explicit part, implicit part): the torch callbacks of a TS, None where unused."""
        raise NotImplementedError

    def configure(self, ts, setup):
        """Set the TS type and variant (before PETSc's options are read)."""
        raise NotImplementedError

    @property
    def states_per_step(self):
        """States PETSc's memory trajectory keeps per step (checkpointing 'auto' estimates)."""
        raise NotImplementedError

    graphs_per_step = 0          # f evaluations per step whose graphs a GraphStore can keep

    def trapezoidal(self, setup):
        """Whether it is the trapezoidal rule, whose adaptive steps take the local error
        estimate of _solve/trapezoid_control.py instead of PETSc's."""
        return False

    def implicit_func(self, func):
        """The part of func that Newton solves (None for explicit methods)."""
        if self.kind == "explicit":
            return None
        return func.implicit if isinstance(func, IMEX) else func


class ExplicitRK(Method):
    """An explicit Runge-Kutta tableau, run by PETSc's TSRK: the class to instantiate to add a
    method.

    The tableau is registered with TSRK first when PETSc does not ship it (``register=True``);
    its gradients are then exact like the others' (PETSc's discrete adjoint uses the tableau
    generically). An adaptive one with a continuous extension (``dense``, of order
    ``dense_order``) evaluates output times by interpolation instead of stepping onto them.

    Parameters
    ----------
    name : str
        The ``method=`` name (the key under which it goes in :data:`METHODS`).
    subtype : str
        PETSc's ``-ts_rk_type`` name: one PETSc ships (``'4'``, ``'5dp'``, ``'6vr'``...), or,
        with ``register=True``, a new name under which the tableau is registered.
    order : int
        The order of the method.
    adaptive : bool
        Whether it adapts its steps (needs an error estimate: ``embedded`` for a registered
        tableau).
    tableau : ButcherTableau
        The Butcher tableau (``a`` strictly lower triangular, ``b``, ``c``), typically from
        ``pnode_dist.methods.from_fractions(a, b)`` (c follows from the rows of a).
    register : bool, optional
        A tableau PETSc does not ship: registered with TSRK under ``subtype`` at first use
        (once per process).
    embedded : sequence of float, optional
        Weights of the error estimate's formula on the same stages (registered tableaus).
    dense : DenseOutput, optional
        A continuous extension registered with the tableau.
    dense_order : int, optional
        The order of ``dense``.

    Raises
    ------
    InputError
        At first use, if PETSc refuses the tableau (TSRKRegister error) or the libpetsc to
        register it with cannot be told. ``from_fractions`` raises ``ValueError`` for a tableau
        that is not explicit or whose rows of a do not sum to c, or b to 1.

    Examples
    --------
    ::

        from fractions import Fraction as F
        from pnode_dist import METHODS
        from pnode_dist.methods import ExplicitRK, from_fractions
        ralston = from_fractions([[], [F(2, 3)]], [F(1, 4), F(3, 4)])
        METHODS["ralston"] = ExplicitRK("ralston", "my_ralston", 2, False, ralston,
                                        register=True)
        ys = odeint(func, y0, t, method="ralston", options={"step_size": 0.1})
    """
    kind = "explicit"
    ts_types = ("rk",)

    def __init__(self, name, subtype, order, adaptive, tableau, register=False, embedded=None,
                 dense=None, dense_order=None):
        super().__init__(name, order, adaptive)
        self.subtype, self.tableau = subtype, tableau
        self.register = register    # a tableau PETSc does not ship: registered at first use
        self.embedded = embedded    # weights of the error estimate's formula (registered ones)
        self.dense = dense          # DenseOutput registered with the tableau
        self.dense_order = dense_order

    @property
    def interpolates(self):
        """Whether output times are interpolated by default (``options['outputs']``).

        True for an adaptive method whose dense output is at most one order below the method
        (dopri5's, as torchdiffeq's).
        """
        return self.adaptive and self.dense is not None and self.dense_order >= self.order - 1

    def parts(self, func, params, shape, dtype, device, setup):
        return TorchRHS(func, params, shape, dtype, device), None

    def configure(self, ts, setup):
        ts.setType("rk")
        ensure_registered(self)
        ts.setRKType(self.subtype)

    @property
    def states_per_step(self):
        return self.tableau.stages + 1

    @property
    def graphs_per_step(self):
        return self.tableau.stages


class Theta(Method):
    """PETSc's TSTHETA family in IFunction form F = M ydot - f (beuler, cn, theta); adaptive
    through its local error estimate when no step_size is given."""
    kind = "implicit"
    ts_types = ("beuler", "cn", "theta")
    states_per_step = 3
    # With PETSc 3.26, destroying a TSTHETA memory trajectory that recorded re-run segments of
    # adaptive step sizes crashed (VecDestroy under TSTrajectoryDestroy): such a TS is kept.
    keep_after_replay = True

    def __init__(self, name, order):
        super().__init__(name, order, adaptive=True)
        self.options = ("linear_solver", "mass") + (("theta",) if name == "theta" else ())

    def setup(self, options, func, y0):
        config = super().setup(options, func, y0)
        theta = options.get("theta", 0.5)
        if not (isinstance(theta, (int, float)) and 0 < theta <= 1):
            raise InputError(f"options['theta'] must be in (0, 1]; got {theta!r}")
        mass = options.get("mass")
        if mass is not None:
            d = y0.shape[-1] if y0.dim() == 2 else None
            if not isinstance(mass, torch.Tensor) or d is None or tuple(mass.shape) != (d, d):
                raise InputError(f"options['mass'] must be a [d, d] tensor for a state of shape "
                                 f"[batch, d]; got {type(mass).__name__} for y0 of shape "
                                 f"{list(y0.shape)}")
            mass = mass.detach().to(torch.float64).clone()
        return SetupConfig(theta=float(theta), linear_solver=config.linear_solver, mass=mass)

    def parts(self, func, params, shape, dtype, device, setup):
        return None, TorchIFunction(func, params, shape, dtype, device, setup.mass)

    def trapezoidal(self, setup):
        return self.name == "cn" or (self.name == "theta" and setup.theta == 0.5)

    def configure(self, ts, setup):
        ts.setType(self.name)
        if self.name == "theta":
            ts.setTheta(setup.theta)


class ARKIMEX(Method):
    """PETSc's additive Runge-Kutta IMEX methods: func is an IMEX pair, its implicit part
    solved by Newton, its explicit part stepped explicitly."""
    kind = "imex"
    ts_types = ("arkimex",)
    options = ("linear_solver", "tableau")
    on_grids = False
    states_per_step = 6
    graphs_per_step = 5          # the explicit part's stages (the largest tableau's)
    ORDERS = {"1bee": 1, "a2": 2, "l2": 2, "ars122": 2, "2c": 2, "2d": 2, "2e": 2,
              "prssp2": 2, "3": 3, "bpr3": 3, "ars443": 3, "4": 4, "5": 5}

    def __init__(self, name, subtype):
        super().__init__(name, self.ORDERS[subtype], adaptive=True)
        self.subtype = subtype

    def setup(self, options, func, y0):
        config = super().setup(options, func, y0)
        tableau = options.get("tableau")
        if tableau is not None and tableau not in self.ORDERS:
            raise InputError(f"options['tableau'] selects an ARKIMEX tableau for "
                             f"method='arkimex': one of {sorted(self.ORDERS)}; got {tableau!r}")
        if not isinstance(func, IMEX):
            raise InputError("method='arkimex' needs func=pnode_dist.IMEX(implicit=..., "
                             "explicit=...) so that PETSc knows which part to solve implicitly")
        return SetupConfig(linear_solver=config.linear_solver, tableau=tableau)

    def parts(self, func, params, shape, dtype, device, setup):
        return (TorchRHS(func.explicit, params, shape, dtype, device),
                TorchIFunction(func.implicit, params, shape, dtype, device))

    def configure(self, ts, setup):
        ts.setType("arkimex")
        ts.setARKIMEXType(setup.tableau or self.subtype)


def _zero(t, y):
    return torch.zeros_like(y)


class DIRK(ARKIMEX):
    """A diagonally implicit RK tableau (tableaus.DiagonallyImplicitTableau) on a plain func:
    run by PETSc's ARKIMEX, whose discrete adjoint it then has, as the implicit half of a pair
    whose explicit part is zero (registered at first use). Adaptive when the tableau has
    embedded weights (a failed Newton solve then rejects the step), else fixed steps."""
    kind = "implicit"
    options = ("linear_solver",)

    def __init__(self, name, tableau):
        Method.__init__(self, name, tableau.order, adaptive=tableau.embedded is not None)
        self.subtype, self.dirk = f"pnode_{name}", tableau

    @property
    def states_per_step(self):
        return len(self.dirk.b) + 1

    @property
    def graphs_per_step(self):
        return len(self.dirk.b)

    def setup(self, options, func, y0):
        return SetupConfig(linear_solver=Method.setup(self, options, func, y0).linear_solver)

    def parts(self, func, params, shape, dtype, device, setup):
        return (TorchRHS(_zero, params, shape, dtype, device),
                TorchIFunction(func, params, shape, dtype, device))

    def configure(self, ts, setup):
        ensure_arkimex_registered(self.subtype, self.dirk)
        ts.setType("arkimex")
        ts.setARKIMEXType(self.subtype)


class KenCarp(DIRK):
    """Kennedy and Carpenter's adaptive ARK pairs by name (PETSc's ARKIMEX tableaus 3, 4, 5;
    diffrax's KenCarp3/4/5). On a plain func, the implicit half alone (the explicit part is
    zero): an L-stable, stiffly accurate ESDIRK with an embedded error estimate, the methods to
    pick for stiff problems. On an :class:`IMEX` func, the whole pair (its explicit part
    stepped explicitly)."""

    def __init__(self, name, subtype):
        super().__init__(name, tab.KENCARP[subtype])
        self.subtype = subtype               # PETSc's own registration (with its interpolant)

    def parts(self, func, params, shape, dtype, device, setup):
        if isinstance(func, IMEX):
            return ARKIMEX.parts(self, func, params, shape, dtype, device, setup)
        return super().parts(func, params, shape, dtype, device, setup)

    configure = ARKIMEX.configure


#: The registry of methods: ``method=`` name -> :class:`Method`. Explicit ``euler``,
#: ``midpoint``, ``heun2``, ``heun3``, ``rk4`` (classic), ``rk4_38`` (the 3/8 rule, torchdiffeq's
#: ``rk4``); adaptive ``adaptive_heun``, ``fehlberg2``, ``bosh3``, ``dopri5`` (the default),
#: ``tsit5``, ``verner6``, ``verner7``, ``verner8``; implicit ``beuler``, ``cn``, ``theta``,
#: ``sdirk2``, ``trbdf2``, adaptive ``kencarp3``, ``kencarp4``, ``kencarp5`` (an IMEX func: the
#: whole pair), ``kvaerno3``, ``kvaerno4``, ``kvaerno5``; IMEX ``arkimex``. A method of your
#: own is one more entry (see :class:`ExplicitRK`).
METHODS = {
    m.name: m for m in (
        ExplicitRK("euler", "1fe", 1, False, tab.EULER),
        ExplicitRK("midpoint", "2b", 2, False, tab.MIDPOINT),
        ExplicitRK("rk4", "4", 4, False, tab.RK4),
        # PETSc's 3bs, registered again with its Hermite interpolant (FSAL: cubic, order 3).
        ExplicitRK("bosh3", "pnode_bosh3", 3, True, tab.BOSH3, register=True,
                   embedded=tab.BOSH3_EMBEDDED, dense=tab.hermite(tab.BOSH3, fsal=True),
                   dense_order=3),
        # PETSc's 5dp (with its continuous extension, order 4), registered again with
        # torchdiffeq's error estimate (tableaus.DOPRI5_EMBEDDED).
        ExplicitRK("dopri5", "pnode_dopri5", 5, True, tab.DOPRI5, register=True,
                   embedded=tab.DOPRI5_EMBEDDED, dense=tab.PetscTableau("5dp", part="dense"),
                   dense_order=4),
        # torchdiffeq's other explicit methods: Heun (PETSc's 2a), the rest registered with
        # PETSc (rk_register). torchdiffeq's 'rk4' is the 3/8 rule: here 'rk4_38'.
        ExplicitRK("heun2", "2a", 2, False, tab.HEUN),
        ExplicitRK("adaptive_heun", "pnode_adaptive_heun", 2, True, tab.HEUN, register=True,
                   embedded=tab.HEUN_EMBEDDED, dense=tab.hermite(tab.HEUN, fsal=False),
                   dense_order=2),
        ExplicitRK("heun3", "pnode_heun3", 3, False, tab.HEUN3, register=True),
        ExplicitRK("rk4_38", "pnode_rk4_38", 4, False, tab.RK4_38, register=True),
        ExplicitRK("fehlberg2", "pnode_fehlberg2", 2, True, tab.FEHLBERG2, register=True,
                   embedded=tab.FEHLBERG2_EMBEDDED,
                   dense=tab.hermite(tab.FEHLBERG2, fsal=False), dense_order=2),
        # Tsitouras 5(4), FSAL, with its own continuous extension (order 4).
        ExplicitRK("tsit5", "pnode_tsit5", 5, True, tab.TSIT5, register=True,
                   embedded=tab.TSIT5_EMBEDDED, dense=tab.TSIT5_DENSE, dense_order=4),
        # Verner's pairs as PETSc ships them (no dense output: they step onto output times).
        ExplicitRK("verner6", "6vr", 6, True, tab.PetscTableau("6vr")),
        ExplicitRK("verner7", "7vr", 7, True, tab.PetscTableau("7vr")),
        ExplicitRK("verner8", "8vr", 8, True, tab.PetscTableau("8vr")),
        Theta("beuler", 1),
        Theta("cn", 2),
        Theta("theta", 1),           # order 2 for theta = 0.5
        ARKIMEX("arkimex", "3"),
        DIRK("sdirk2", tab.SDIRK2),
        DIRK("trbdf2", tab.TRBDF2),
        KenCarp("kencarp3", "3"),
        KenCarp("kencarp4", "4"),
        KenCarp("kencarp5", "5"),
        # Kvaerno's L-stable ESDIRK pairs (diffrax's Kvaerno3/4/5), registered with ARKIMEX.
        *(DIRK(f"kvaerno{k}", tab.KVAERNO[k]) for k in ("3", "4", "5")),
    )
}
DEFAULT_METHOD = "dopri5"
# torchdiffeq's names for which a method of the same order and use stands in (said once).
ALIASES = {"dopri8": ("verner8", "torchdiffeq's dopri8 (Dormand-Prince 8(7)) runs as verner8, "
                      "Verner's 8(7) pair as PETSc ships it: the same order and error control, "
                      "a different tableau")}
_said = set()
# torchdiffeq's names for the same schemes (no note needed).
SAME_SCHEME = {"implicit_euler": "beuler", "trapezoid": "cn", "implicit_midpoint": "theta"}
# torchdiffeq's methods with no counterpart here, and why.
UNAVAILABLE = dict.fromkeys(
    ("explicit_adams", "implicit_adams", "fixed_adams"),
    "multistep (Adams) methods have no discrete adjoint in PETSc; use dopri5 (or verner8 for "
    "high accuracy), and kencarp4 or kvaerno5 (or kencarp3/5, kvaerno3/4, cn, beuler) for "
    "stiff problems")
UNAVAILABLE["scipy_solver"] = ("SciPy's solvers run outside PETSc, with neither distributed "
                               "states nor a discrete adjoint; use the PETSc methods below")
UNAVAILABLE.update(dict.fromkeys(
    ("gl4", "gl6", "radauIIA3", "radauIIA5"),
    "fully implicit Runge-Kutta methods (all stages coupled) run only as PETSc's TSIRK, which "
    "has no discrete adjoint in PETSc 3.26; use the diagonally implicit kencarp3/4/5 or "
    "kvaerno3/4/5 (adaptive, L-stable), sdirk2 or trbdf2, or cn, beuler, theta, arkimex"))


def get_method(name: Optional[str]) -> Method:
    """Look a method up by name (or a torchdiffeq alias).

    Parameters
    ----------
    name : str or None
        A key of :data:`METHODS`, or torchdiffeq's ``implicit_euler``, ``trapezoid``,
        ``implicit_midpoint`` (the same schemes as ``beuler``, ``cn``, ``theta``) or ``dopri8``
        (runs ``verner8``). None means the default (dopri5, as in torchdiffeq).

    Returns
    -------
    Method
        The registry entry.

    Raises
    ------
    InputError
        For an unknown name: the message lists the valid methods, says why a torchdiffeq method
        is not available (Adams, SciPy, fully implicit RK), and how to choose any other PETSc RK
        tableau (``-[prefix]ts_rk_type``).

    Warns
    -----
    UserWarning
        Once, for ``dopri8``: it runs ``verner8`` (same order and error control, another
        tableau).
    """
    if name is None:
        name = DEFAULT_METHOD
    name = SAME_SCHEME.get(name, name) if isinstance(name, str) else name
    if isinstance(name, str) and name in ALIASES:
        name, note = ALIASES[name]
        if note not in _said:
            _said.add(note)
            warnings.warn(note, UserWarning, stacklevel=4)
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(METHODS))
        why = f" ({UNAVAILABLE[name]})" if isinstance(name, str) and name in UNAVAILABLE else ""
        raise InputError(
            f"unknown method {name!r}{why}: valid methods are {valid}. Any other PETSc RK "
            "tableau can be chosen with the PETSc option -[prefix]ts_rk_type (for example 5bs "
            "or 3), given on the command line or in petsc_options={'ts_rk_type': ...}") from None
