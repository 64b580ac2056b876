"""Explicit Runge-Kutta tableaus between pnode_dist and PETSc's TSRK: ours that PETSc does not
ship are registered with it, and PETSc's own (the Verner methods) are read back for the
pure-torch replay.

petsc4py binds neither TSRKRegister nor TSRKGetTableau, so they are called through ctypes in the
libpetsc that petsc4py loaded (same process, same library). Once registered, the name works like
a built-in -ts_rk_type: PETSc's RK step and its discrete adjoint use the tableau generically.
"""
import ctypes

import numpy as np

from .._distributed.startup import PETSc
from ..errors import InputError
from .tableaus import ButcherTableau

_registered = set()


def _library():
    """The libpetsc petsc4py loaded into this process (found in /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/libpetsc" in line and ".so" in line}
    if len(paths) != 1:
        raise InputError(f"cannot tell which libpetsc this process uses ({sorted(paths)}) to "
                         "register an RK tableau: choose a method PETSc ships (euler, midpoint, "
                         "heun2, rk4, bosh3, dopri5...)")
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
    arrays = [a.ravel(), np.asarray(tab.b, real), np.asarray(tab.c, real)]
    if method.adaptive:
        arrays.append(np.asarray(method.embedded, real))
    pointer = ctypes.POINTER(np.ctypeslib.as_ctypes_type(real))
    args = [arr.ctypes.data_as(pointer) for arr in arrays]
    if not method.adaptive:
        args.append(None)                                    # no embedded formula
    int_t = np.ctypeslib.as_ctypes_type(integer)
    code = _library().TSRKRegister(method.subtype.encode(), int_t(method.order), int_t(s),
                                   *args, int_t(0), None)
    if code != 0:
        raise InputError(f"PETSc refused the {method.name} tableau (TSRKRegister error {code})")
    _registered.add(method.subtype)


def petsc_tableau(subtype):
    """The Butcher tableau PETSc integrates with for `-ts_rk_type subtype`."""
    real = np.ctypeslib.as_ctypes_type(PETSc.RealType)
    integer = np.ctypeslib.as_ctypes_type(PETSc.IntType)
    ts = PETSc.TS().create(comm=PETSc.COMM_SELF)
    try:
        ts.setType("rk")
        ts.setRKType(subtype)
        s, order = integer(), integer()
        a, b, c, embedded, interp = (ctypes.POINTER(real)() for _ in range(5))
        fsal = ctypes.c_int()      # PetscBool
        code = _library().TSRKGetTableau(ctypes.c_void_p(ts.handle), ctypes.byref(s),
                                         ctypes.byref(a), ctypes.byref(b), ctypes.byref(c),
                                         ctypes.byref(embedded), ctypes.byref(order),
                                         ctypes.byref(interp), ctypes.byref(fsal))
        if code != 0:
            raise InputError(f"PETSc could not give the tableau of -ts_rk_type {subtype} "
                             f"(TSRKGetTableau error {code})")
        n = s.value
        rows = np.ctypeslib.as_array(a, (n, n)).tolist()
        return ButcherTableau(a=tuple(tuple(row[:i]) for i, row in enumerate(rows)),
                              b=tuple(np.ctypeslib.as_array(b, (n,)).tolist()),
                              c=tuple(np.ctypeslib.as_array(c, (n,)).tolist()))
    finally:
        ts.destroy()
