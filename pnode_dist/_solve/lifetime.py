"""When pnode_dist's PETSc objects are freed. The rules, in one place:

1. Explicitly, never by the garbage collector: a TS holds Python callbacks that refer back to
   their Integrator, a cycle the collector would free in an order PETSc does not survive.
   Integrator.destroy frees its TS; an IntegratorPool destroys its idle Integrators when the
   odeint cache drops it, and a leased one when it comes back (or at once if it failed); a
   StoreAll whose graph dies without a backward pass destroys its Integrator (a memory
   trajectory cannot be reset from petsc4py); Grid.destroy frees its DMDA.
2. Before PETSc finalizes: objects whose destruction communicates (a DMDA's halo scatters,
   whose MPI datatypes MPICH would report as leaked) are freed by `at_finalize` handlers, which
   run before petsc4py's own exit handler.
3. Never, where PETSc 3.26 was seen to crash destroying them (`keep_forever`): a TSTHETA memory
   trajectory that recorded re-run segments (Method.keep_after_replay).
4. Nothing of a failed solve outlives it: the exception raised to the user (chained to func's
   own) no longer holds our callbacks' frames, whose petsc4py wrappers are references that
   would keep a destroyed TS alive (guard.released); PETSc's error paths can leave a
   reference to a Python Mat, so Integrator.destroy empties the Mat and PC contexts and the
   parts first; and the cached Vec views are bounded (a view holds its Vec, and ARKIMEX
   re-runs pass new Vecs). tests/test_lifetime.py soaks every plan and method family.
5. Our own Vecs are destroyed, not dropped: in parallel, petsc4py hands an object Python drops
   to PETSc's garbage, freed only by a collective clean-up and only where every rank has it
   (keys are creation numbers), so a drop leaks until exit (Integrator.destroy destroys x,
   the adjoint's Vecs and the work Vecs).
6. A communicator stays pinned (`pin_comm`): PETSc frees its inner communicator with the last
   object on it and duplicates it again, collectively, for the next one. Where ranks free
   their last object at different times (a failure on one rank leaves petsc4py wrappers in
   its frames a while longer), the next creation would hang on the other ranks; and
   PetscFinalize would clean the garbage on the ranks that still hold objects only. One
   object per communicator, kept on every rank, keeps both alike.
"""
import atexit
import ctypes

from .._distributed.startup import PETSc  # petsc4py's exit handler is registered first


def at_finalize(handler):
    """Run `handler()` at interpreter exit, before PETSc finalizes (atexit runs handlers in
    reverse order, and petsc4py registered its own when it was imported, before this)."""
    atexit.register(handler)
    return handler


def keep_forever(obj):
    """Never free `obj` (not even while the interpreter shuts down, when PETSc is still
    initialised): one extra reference that nothing releases."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


_pinned = set()                # the MPI handles of the communicators pinned


def pin_comm(comm):
    """Keep one PETSc object on `comm` for the rest of the run (rule 6). Collective on first
    use, like the creation of any PETSc object on `comm`."""
    key = comm.tompi4py().py2f()
    if key not in _pinned:
        keep_forever(PETSc.Vec().create(comm=comm))
        _pinned.add(key)
