"""PETSc options handling: code defaults < petsc_options dict < command line.

Defaults and the user's dict are put into PETSc's options database only where the command line
did not set the key, read by setFromOptions(), and removed again, so that they do not leak into
other solvers.
"""
from contextlib import contextmanager

from .._distributed.startup import PETSc
from ..errors import InputError


def _normalise(key):
    if not isinstance(key, str) or not key.strip("-"):
        raise InputError("petsc_options keys must be option names such as 'ts_rk_type'; "
                         f"got {key!r}")
    return key.lstrip("-")


def _value(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)


def freeze(petsc_options):
    """A hashable, validated form of a petsc_options dict (None -> empty)."""
    if petsc_options is None:
        return ()
    if not isinstance(petsc_options, dict):
        raise InputError("petsc_options must be a dict such as {'ts_rk_type': '5bs'}; "
                         f"got {type(petsc_options).__name__}")
    return tuple(sorted((_normalise(k), _value(v)) for k, v in petsc_options.items()))


@contextmanager
def layered_options(prefix, defaults, user):
    """Within the block, the options DB holds `defaults` overridden by `user` (both dicts/pairs of
    unprefixed names), except where the command line already set the prefixed key."""
    db = PETSc.Options()
    merged = dict(defaults)
    merged.update(dict(user))
    inserted = []
    for key, value in merged.items():
        name = f"{prefix or ''}{key}"
        if db.hasName(name):
            continue
        db.setValue(name, value)
        inserted.append(name)
    try:
        yield
    finally:
        for name in inserted:
            db.delValue(name)
