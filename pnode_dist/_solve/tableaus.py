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

    def slopes(self, theta):
        """b_i'(theta) for every stage: the dense output's d/dt is sum_i b_i'(theta) k_i."""
        return [sum(c * (j + 1) * theta ** j for j, c in enumerate(row))
                for row in self.coefficients]


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
    """Build an explicit Butcher tableau from exact fractions (c follows from the rows of a).

    Parameters
    ----------
    a : sequence of sequence
        The rows of the strictly lower triangular a: row i has i entries (``[]`` first);
        ``fractions.Fraction``, int or float.
    b : sequence
        The weights, one per stage, summing to 1.

    Returns
    -------
    ButcherTableau
        The tableau in floats, for :class:`pnode_dist.methods.ExplicitRK`.

    Raises
    ------
    ValueError
        If a and b describe different numbers of stages, a row of a has the wrong length, or
        b does not sum to 1 (within 1e-14).

    Examples
    --------
    ::

        from fractions import Fraction as F
        ralston = from_fractions([[], [F(2, 3)]], [F(1, 4), F(3, 4)])
    """
    rows = tuple(tuple(float(x) for x in row) for row in a)
    c = tuple(float(sum(row, F(0))) for row in a)
    return ButcherTableau(a=rows, b=tuple(float(x) for x in b), c=c)


class PetscTableau:
    """A tableau PETSc ships, read from PETSc at first use (so that it is never retyped);
    `part` 'dense': the continuous extension PETSc ships with it instead."""

    def __init__(self, subtype, part="tableau"):
        self.subtype, self.part = subtype, part
        self._found = None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._found is None:
            from .rk_register import petsc_tableau      # needs PETSc: imported at first use
            tableau, dense = petsc_tableau(self.subtype, dense=True)
            self._found = dense if self.part == "dense" else tableau
        return getattr(self._found, name)


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
# The error estimate of dopri5: the 4th-order formula on the same seven stages from L. F.
# Shampine, Some practical Runge-Kutta formulas, Math. Comp. 46 (1986), the one torchdiffeq's
# dopri5 uses. Its estimate is smaller than that of Dormand and Prince's own 4th-order pair
# (PETSc's 5dp: about 1.7x on y' = -y), so the same rtol/atol takes torchdiffeq's steps.
DOPRI5_EMBEDDED = tuple(float(x) for x in (F(1951, 21600), 0, F(22642, 50085), F(451, 720),
                                           F(-12231, 42400), F(649, 6300), F(1, 60)))

HEUN = from_fractions([[], [1]], [F(1, 2), F(1, 2)])
HEUN3 = from_fractions([[], [F(1, 3)], [0, F(2, 3)]], [F(1, 4), 0, F(3, 4)])
RK4_38 = from_fractions([[], [F(1, 3)], [F(-1, 3), 1], [1, -1, 1]],
                        [F(1, 8), F(3, 8), F(3, 8), F(1, 8)])
FEHLBERG2 = from_fractions([[], [F(1, 2)], [F(1, 256), F(255, 256)]],
                           [F(1, 512), F(255, 256), F(1, 512)])
FEHLBERG2_EMBEDDED = (1 / 256, 255 / 256, 0.0)     # weights of its error estimate's formula
HEUN_EMBEDDED = (1.0, 0.0)                          # Euler's step: Heun-Euler 2(1)

# Tsitouras 5(4) (Ch. Tsitouras, Comput. Math. Appl. 62, 2011): FSAL, 7 stages; the 4th-order
# pair's weights for its error estimate; its continuous extension (order 4) from the paper's
# b_i(theta) in factored form, expanded below.
_TSIT5_A = (
    (),
    (0.161,),
    (-0.008480655492356988544426874250230774675121177393430391537369234245294192976164141156943,
     0.3354806554923569885444268742502307746751211773934303915373692342452941929761641411569),
    (2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289,
     -6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366,
     4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077),
    (5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791,
     -11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589,
     7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753,
     -0.09249506636175524925650207933207191611349983406029535244034750452930469056411389539635),
    (5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748,
     -12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452,
     8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986,
     -0.07158497328140099722453054252582973869127213147363544882721139659546372402303777878835,
     -0.02826905039406838290900305721271224146717633626879770007617876201276764571291579142206),
    (0.09646076681806522951816731316512876333711995238157997181903319145764851595234062815396,
     0.01,
     0.4798896504144995747752495322905965199130404621990332488332634944254542060153074523509,
     1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331,
     -3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677,
     2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841))
TSIT5 = ButcherTableau(a=_TSIT5_A, b=_TSIT5_A[-1] + (0.0,),
                       c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045096857298102862870245954942,
                          1.0, 1.0))
TSIT5_EMBEDDED = (
    0.09468075576583945807478876255758922856117527357724631226139574065785592789071067303271,
    0.009183565540343253096776363936645313759813746240984095238905939532922955247253608687270,
    0.4877705284247615707855642599631228241516691959761363774365216240304071651579571959813,
    1.234297566930478985655109673884237654035539930748192848315425833500484878378061439761,
    -2.707712349983525454881109975059321670689605166938197378763992255714444407154902012702,
    1.866628418170587035753719399566211498666255505244122593996591602841258328965767580089,
    1 / 66)


def _times(*factors):
    """The product of polynomials given by ascending coefficients."""
    out = [1.0]
    for f in factors:
        prod = [0.0] * (len(out) + len(f) - 1)
        for i, x in enumerate(out):
            for j, y in enumerate(f):
                prod[i + j] += x * y
        out = prod
    return out


def _dense_rows(polys):
    """DenseOutput rows (coefficients of theta^1..) from polynomials b_i(0) = 0."""
    width = max(len(p) for p in polys) - 1
    return DenseOutput(tuple(tuple(p[1:]) + (0.0,) * (width - len(p) + 1) for p in polys))


_TH, _TH2 = (0.0, 1.0), (0.0, 0.0, 1.0)
TSIT5_DENSE = _dense_rows([
    _times((-1.0530884977290216,), _TH, (-1.3299890189751412, 1.0),
           (0.7139816917074209, -1.4364028541716351, 1.0)),
    _times((0.1017,), _TH2, (1.2949852507374631, -2.1966568338249754, 1.0)),
    _times((2.490627285651252793,), _TH2, (1.57803468208092486, -2.38535645472061657, 1.0)),
    _times((-16.54810288924490272,), (-1.21712927295533244, 1.0),
           (-0.61620406037800089, 1.0), _TH2),
    _times((47.37952196281928122,), (-1.203071208372362603, 1.0),
           (-0.658047292653547382, 1.0), _TH2),
    _times((-34.87065786149660974,), (-1.2, 1.0), (-2 / 3, 1.0), _TH2),
    _times((2.5,), (-1.0, 1.0), (-0.6, 1.0), _TH2)])

_US2 = 1.0 - 1.0 / 2.0 ** 0.5


@dataclass(frozen=True)
class DiagonallyImplicitTableau:
    """A diagonally implicit RK tableau (a lower triangular, b, order), run by PETSc's ARKIMEX
    as the implicit half of a pair whose explicit half is unused (zero explicit part)."""
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    order: int
    embedded: Tuple[float, ...] = None   # weights of the error estimate (adaptive ones)

    @property
    def c(self):
        return tuple(sum(row) for row in self.a)


# torchdiffeq's fixed-grid DIRK methods. sdirk2: Alexander's 2-stage L-stable SDIRK,
# gamma = 1 - 1/sqrt(2) (stiffly accurate). trbdf2: the trapezoid then BDF2 as an ESDIRK
# (explicit first stage), gamma = 2 - sqrt(2) for the trapezoidal stage, L-stable.
_G = 1.0 - 2.0 ** 0.5 / 2.0
_B = 2.0 ** 0.5 / 4.0
SDIRK2 = DiagonallyImplicitTableau(a=((_G, 0.0), (1.0 - _G, _G)), b=(1.0 - _G, _G), order=2)
TRBDF2 = DiagonallyImplicitTableau(a=((0.0, 0.0, 0.0), (_G, _G, 0.0), (_B, _B, _G)),
                                   b=(_B, _B, _G), order=2)

def _ark_pair(explicit, implicit, embedded, order):
    """A Kennedy-Carpenter ARK pair from its rows of exact fractions ("n/d"), in the replay form
    (explicit A, b, implicit At, bt) plus the implicit half as a DiagonallyImplicitTableau (its
    embedded weights too). Both halves are stiffly accurate: b = bt = At's last row."""
    def value(x):
        return float(F(x))
    s = len(implicit)
    at = tuple(tuple(value(x) for x in row) + (0.0,) * (s - len(row)) for row in implicit)
    a = tuple(tuple(value(x) for x in row) + (0.0,) * (s - len(row)) for row in explicit)
    bt = at[-1]
    return (a, bt, at, bt), DiagonallyImplicitTableau(
        a=tuple(row[:i + 1] for i, row in enumerate(at)), b=bt, order=order,
        embedded=tuple(value(x) for x in embedded))


# PETSc's ARKIMEX "3", "4", "5": Kennedy and Carpenter's ARK3(2)4L[2]SA, ARK4(3)6L[2]SA and
# ARK5(4)8L[2]SA (Appl. Numer. Math. 44, 2003), diffrax's KenCarp3/4/5. With a zero explicit part
# they are L-stable, stiffly accurate ESDIRKs with an embedded error estimate. Each entry is the
# float of the same fraction PETSc divides (so the replays use PETSc's coefficients bitwise).
_KC3 = _ark_pair(
    explicit=(
        (),
        ("1767732205903/2027836641118",),
        ("5535828885825/10492691773637", "788022342437/10882634858940"),
        ("6485989280629/16251701735622", "-4246266847089/9704473918619",
         "10755448449292/10357097424841"),
    ),
    implicit=(
        ("0",),
        ("1767732205903/4055673282236", "1767732205903/4055673282236"),
        ("2746238789719/10658868560708", "-640167445237/6845629431997",
         "1767732205903/4055673282236"),
        ("1471266399579/7840856788654", "-4482444167858/7529755066697",
         "11266239266428/11593286722821", "1767732205903/4055673282236"),
    ),
    embedded=("2756255671327/12835298489170", "-10771552573575/22201958757719",
              "9247589265047/10645013368117", "2193209047091/5459859503100"),
    order=3)
_KC4 = _ark_pair(
    explicit=(
        (),
        ("1/2",),
        ("13861/62500", "6889/62500"),
        ("-116923316275/2393684061468", "-2731218467317/15368042101831",
         "9408046702089/11113171139209"),
        ("-451086348788/2902428689909", "-2682348792572/7519795681897",
         "12662868775082/11960479115383", "3355817975965/11060851509271"),
        ("647845179188/3216320057751", "73281519250/8382639484533", "552539513391/3454668386233",
         "3354512671639/8306763924573", "4040/17871"),
    ),
    implicit=(
        ("0",),
        ("1/4", "1/4"),
        ("8611/62500", "-1743/31250", "1/4"),
        ("5012029/34652500", "-654441/2922500", "174375/388108", "1/4"),
        ("15267082809/155376265600", "-71443401/120774400", "730878875/902184768",
         "2285395/8070912", "1/4"),
        ("82889/524892", "0", "15625/83664", "69875/102672", "-2260/8211", "1/4"),
    ),
    embedded=("4586570599/29645900160", "0", "178811875/945068544", "814220225/1159782912",
              "-3700637/11593932", "61727/225920"),
    order=4)
_KC5 = _ark_pair(
    explicit=(
        (),
        ("41/100",),
        ("367902744464/2072280473677", "677623207551/8224143866563"),
        ("1268023523408/10340822734521", "0", "1029933939417/13636558850479"),
        ("14463281900351/6315353703477", "0", "66114435211212/5879490589093",
         "-54053170152839/4284798021562"),
        ("14090043504691/34967701212078", "0", "15191511035443/11219624916014",
         "-18461159152457/12425892160975", "-281667163811/9011619295870"),
        ("19230459214898/13134317526959", "0", "21275331358303/2942455364971",
         "-38145345988419/4862620318723", "-1/8", "-1/8"),
        ("-19977161125411/11928030595625", "0", "-40795976796054/6384907823539",
         "177454434618887/12078138498510", "782672205425/8267701900261",
         "-69563011059811/9646580694205", "7356628210526/4942186776405"),
    ),
    implicit=(
        ("0",),
        ("41/200", "41/200"),
        ("41/400", "-567603406766/11931857230679", "41/200"),
        ("683785636431/9252920307686", "0", "-110385047103/1367015193373", "41/200"),
        ("3016520224154/10081342136671", "0", "30586259806659/12414158314087",
         "-22760509404356/11113319521817", "41/200"),
        ("218866479029/1489978393911", "0", "638256894668/5436446318841",
         "-1179710474555/5321154724896", "-60928119172/8023461067671", "41/200"),
        ("1020004230633/5715676835656", "0", "25762820946817/25263940353407",
         "-2161375909145/9755907335909", "-211217309593/5846859502534",
         "-4269925059573/7827059040749", "41/200"),
        ("-872700587467/9133579230613", "0", "0", "22348218063261/9555858737531",
         "-1143369518992/8141816002931", "-39379526789629/19018526304540",
         "32727382324388/42900044865799", "41/200"),
    ),
    embedded=("-975461918565/9796059967033", "0", "0", "78070527104295/32432590147079",
              "-548382580838/3424219808633", "-33438840321285/15594753105479",
              "3629800801594/4656183773603", "4035322873751/18575991585200"),
    order=5)
KENCARP = {"3": _KC3[1], "4": _KC4[1], "5": _KC5[1]}


def _kvaerno(rows, gamma, order):
    """A Kvaerno ESDIRK from its strictly lower rows (the first stage explicit, every other
    diagonal entry gamma): stiffly accurate, b = the last row; the embedded solution is the
    stage before the last (also of the form y_n + h sum a_ij k_j), one order lower."""
    a = ((0.0,),) + tuple(tuple(float(x) for x in row) + (gamma,) for row in rows)
    return DiagonallyImplicitTableau(a=a, b=a[-1], order=order, embedded=a[-2] + (0.0,))


def _kvaerno3():
    """Kvaerno's ESDIRK 3(2)4L (BIT 44, 2004): every coefficient a function of gamma, the
    paper's value, for which the method is L-stable."""
    g = 0.43586652150
    third = ((-4 * g**2 + 6 * g - 1) / (4 * g), (1 - 2 * g) / (4 * g))
    last = ((6 * g - 1) / (12 * g), -1 / ((24 * g - 12) * g), (-6 * g**2 + 6 * g - 1) / (6 * g - 3))
    return _kvaerno(((g,), third, last), g, 3)


def _kvaerno4():
    """Kvaerno's ESDIRK 4(3)5L: the stiffly accurate fourth-order member, its coefficients the
    paper's rational functions of gamma."""
    g = 0.5728160625

    def p(*coefficients):            # a polynomial in gamma, highest power first (Horner)
        value = 0.0
        for c in coefficients:
            value = value * g + c
        return value

    q, r, u = p(12, -6, 1), p(12, -9, 2), p(3, -1)
    third = (p(144, -180, 81, -15, 1) * g / q**2, p(-36, 39, -15, 2) * g / q**2)
    fourth = (p(-144, 396, -330, 117, -18, 1) / (12 * g**2 * r),
              p(72, -126, 69, -15, 1) / (12 * g**2 * u),
              p(-6, 6, -1) * q**2 / (12 * g**2 * r * u))
    last = (p(288, -312, 120, -18, 1) / (48 * g**2 * r), p(24, -12, 1) / (48 * g**2 * u),
            -q**3 / (48 * g**2 * u * r * p(6, -6, 1)), p(-24, 36, -12, 1) / p(24, -24, 4))
    return _kvaerno(((g,), third, fourth, last), g, 4)


# Kvaerno's ESDIRK 5(4)7L: the paper gives its coefficients as decimals (gamma = 0.26).
KVAERNO = {
    "3": _kvaerno3(),
    "4": _kvaerno4(),
    "5": _kvaerno((
        (0.26,),
        (0.13, 0.84033320996790809),
        (0.22371961478320505, 0.47675532319799699, -0.06470895363112615),
        (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998),
        (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141,
         0.61943039072480676),
        (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046,
         0.62993304899016403, 0.06962479448202728),
    ), 0.26, 5),
}

# PETSc's ARKIMEX tableaus and ours, for the pure-torch replay (testing.ark_replay):
# (explicit A, explicit b, implicit At, implicit bt).
ARK_TABLEAUS = {
    "a2": (((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), ((0.0, 0.0), (0.5, 0.5)), (0.5, 0.5)),
    "l2": (((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5), ((_US2, 0.0), (1.0 - 2.0 * _US2, _US2)),
           (0.5, 0.5)),
    **{name: (tuple((0.0,) * len(t.b) for _ in t.b), t.b, t.a, t.b)
       for name, t in (("pnode_sdirk2", SDIRK2), ("pnode_trbdf2", TRBDF2),
                       *((f"pnode_kvaerno{k}", t) for k, t in KVAERNO.items()))},
    "3": _KC3[0], "4": _KC4[0], "5": _KC5[0],
}
