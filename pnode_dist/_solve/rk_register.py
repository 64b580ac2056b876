"""Runge-Kutta tableaus between pnode_dist and PETSc: our explicit ones that PETSc does not ship
are registered with TSRK (and our diagonally implicit ones with TSARKIMEX), and PETSc's own (the
Verner methods) are read back for the pure-torch replay.

petsc4py binds neither TSRKRegister, TSARKIMEXRegister nor TSRKGetTableau, so they are called
through ctypes in the libpetsc that petsc4py loaded (same process, same library). Once
registered, the name works like a built-in -ts_rk_type (-ts_arkimex_type): PETSc's step and its
discrete adjoint use the tableau generically.
"""
import ctypes
import functools

import numpy as np

from .._distributed.startup import PETSc
from ..errors import InputError
from .tableaus import ButcherTableau, DenseOutput

_registered = set()


@functools.lru_cache(maxsize=None)
def petsc_library():
    """The libpetsc petsc4py loaded into this process (found in /proc/self/maps), for the
    functions petsc4py does not bind."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/libpetsc" in line and ".so" in line}
    if len(paths) != 1:
        raise InputError(f"cannot tell which libpetsc this process uses ({sorted(paths)}) to "
                         "call what petsc4py does not bind (registering an RK tableau, cn's "
                         "step control): choose a method PETSc ships (euler, midpoint, heun2, "
                         "rk4, dopri5...), or give cn a step_size")
    return ctypes.CDLL(paths.pop())


def ensure_registered(method):
    """Register `method`'s tableau under its subtype with PETSc (once per process)."""
    if method.subtype in _registered or not method.register:
        return
    tab = method.tableau
    s = tab.stages
    real, integer = PETSc.RealType, PETSc.IntType
    a = np.zeros((s, s), dtype=real)
    for i, row in enumerate(tab.a):
        a[i, :len(row)] = row
    pointer = ctypes.POINTER(np.ctypeslib.as_ctypes_type(real))

    def array(values):
        return None if values is None else np.asarray(values, real).ravel()

    dense = method.dense
    arrays = [a.ravel(), array(tab.b), array(tab.c), array(method.embedded),
              array(dense.coefficients if dense is not None else None)]
    args = [None if arr is None else arr.ctypes.data_as(pointer) for arr in arrays]
    int_t = np.ctypeslib.as_ctypes_type(integer)
    p = len(dense.coefficients[0]) if dense is not None else 0
    code = petsc_library().TSRKRegister(method.subtype.encode(), int_t(method.order),
                                        int_t(s), *args[:4], int_t(p), args[4])
    if code != 0:
        raise InputError(f"PETSc refused the {method.name} tableau (TSRKRegister error {code})")
    _registered.add(method.subtype)


def ensure_arkimex_registered(name, tableau):
    """Register a DiagonallyImplicitTableau with PETSc's ARKIMEX under `name` (once per
    process), paired with an explicit tableau of zeros (its explicit part is zero), with its
    embedded weights where it has them (adaptive)."""
    if name in _registered:
        return
    s = len(tableau.b)
    real, integer = PETSc.RealType, PETSc.IntType
    implicit = np.zeros((s, s), dtype=real)
    for i, row in enumerate(tableau.a):
        implicit[i, :len(row)] = row
    b, c = np.asarray(tableau.b, real), np.asarray(tableau.c, real)
    arrays = [implicit.ravel(), b, c, np.zeros(s * s, dtype=real), b, c]
    if tableau.embedded is not None:             # the same weights for both (zero) halves
        arrays += [np.asarray(tableau.embedded, real)] * 2
    pointer = ctypes.POINTER(np.ctypeslib.as_ctypes_type(real))
    int_t = np.ctypeslib.as_ctypes_type(integer)
    args = [a.ctypes.data_as(pointer) for a in arrays] + [None] * (8 - len(arrays))
    code = petsc_library().TSARKIMEXRegister(name.encode(), int_t(tableau.order), int_t(s),
                                             *args, int_t(0), None, None)
    if code != 0:
        raise InputError(f"PETSc refused the {name} tableau (TSARKIMEXRegister error {code})")
    _registered.add(name)


def ts_tableau(ts):
    """(tableau, dense output or None) that the TSRK `ts` integrates with, as PETSc has them."""
    real = np.ctypeslib.as_ctypes_type(PETSc.RealType)
    integer = np.ctypeslib.as_ctypes_type(PETSc.IntType)
    s, p = integer(), integer()
    a, b, c, embedded, interp = (ctypes.POINTER(real)() for _ in range(5))
    fsal = ctypes.c_int()      # PetscBool
    code = petsc_library().TSRKGetTableau(ctypes.c_void_p(ts.handle), ctypes.byref(s),
                                          ctypes.byref(a), ctypes.byref(b), ctypes.byref(c),
                                          ctypes.byref(embedded), ctypes.byref(p),
                                          ctypes.byref(interp), ctypes.byref(fsal))
    if code != 0:
        raise InputError(f"PETSc could not give the tableau of -ts_rk_type {ts.getRKType()} "
                         f"(TSRKGetTableau error {code})")
    n = s.value
    rows = np.ctypeslib.as_array(a, (n, n)).tolist()
    tableau = ButcherTableau(a=tuple(tuple(row[:i]) for i, row in enumerate(rows)),
                             b=tuple(np.ctypeslib.as_array(b, (n,)).tolist()),
                             c=tuple(np.ctypeslib.as_array(c, (n,)).tolist()),
                             tolerance=64 * float(np.finfo(PETSc.RealType).eps))
    dense = None
    if p.value > 0 and bool(interp):
        coefficients = np.ctypeslib.as_array(interp, (n, p.value)).tolist()
        dense = DenseOutput(coefficients=tuple(map(tuple, coefficients)))
    return tableau, dense


def petsc_tableau(subtype, dense=False):
    """The Butcher tableau PETSc integrates with for `-ts_rk_type subtype` (with dense: and
    its dense output or None)."""
    ts = PETSc.TS().create(comm=PETSc.COMM_SELF)
    try:
        ts.setType("rk")
        ts.setRKType(subtype)
        found = ts_tableau(ts)
        return found if dense else found[0]
    finally:
        ts.destroy()
