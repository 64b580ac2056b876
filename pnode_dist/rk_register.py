"""Explicit Runge-Kutta tableaus PETSc does not ship, registered with PETSc's TSRK.

petsc4py has no binding for TSRKRegister, so it is called through ctypes in the libpetsc that
petsc4py loaded (same process, same library). Once registered, the name works like a built-in
-ts_rk_type: PETSc's RK step and its discrete adjoint use the tableau generically.
"""
import ctypes

import numpy as np

from .errors import InputError
from .parallel import PETSc

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
