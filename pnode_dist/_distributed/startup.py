"""PETSc and MPI start-up, done once per process when a solver name of pnode_dist is first used
(``from pnode_dist import odeint``, ``import pnode_dist.parallel``: pnode_dist/__init__.py
imports them lazily, so that a bare ``import pnode_dist`` and ``pnode-inspect`` need no MPI):
every pnode_dist module gets PETSc (and MPI, PRECISION) from here. What happens, in order:

- Precision: PNODE_PRECISION=single selects the single-precision PETSc + petsc4py that
  `make setup-single` (or `make test`) installs in <venv>/petsc-single (or the folder PNODE_PETSC_SINGLE names; float32
  state): that folder goes first on sys.path. Otherwise the importable petsc4py, which must then
  be single-precision (a GPU bundle's). Without PNODE_PRECISION the importable petsc4py
  decides (`make setup`'s is double).
- GPU: when torch sees GPUs, each rank takes GPU (node-local rank) % (visible GPUs), for torch
  (torch.cuda.set_device) and PETSc (-device_select_cuda) alike; `-device_select_cuda N` on the
  command line overrides it. PETSc's own default would be the *global* rank modulo the GPUs.
- petsc4py.init with the command line's PETSc options (single-dash tokens: see petsc_argv),
  before PETSc is imported, or `-ts_*` options would be silently ignored. Under pytest, whose
  own flags fill the command line, PETSc gets none (tests pass PETSc options explicitly).
If petsc4py.PETSc was imported before pnode_dist, it is used as it is.
"""
import os
import sys

from mpi4py import MPI

from ..errors import InputError

PRECISIONS = ("double", "single")


def _requested_precision():
    """PNODE_PRECISION (None if unset); for 'single', the folder of the single-precision
    petsc4py goes first on sys.path when there is one."""
    precision = os.environ.get("PNODE_PRECISION") or None
    if precision not in (None,) + PRECISIONS:
        raise InputError(f"PNODE_PRECISION={precision!r}: choose 'double' or 'single'")
    path = os.environ.get("PNODE_PETSC_SINGLE") or os.path.join(sys.prefix, "petsc-single")
    if precision == "single" and os.path.isdir(os.path.join(path, "petsc4py")):
        if "petsc4py" in sys.modules and not sys.modules["petsc4py"].__file__.startswith(path):
            raise InputError("PNODE_PRECISION=single, but another petsc4py was imported before "
                             "pnode_dist: import pnode_dist first (a name of its solver, such "
                             "as `from pnode_dist import odeint`, or pnode_dist.parallel)")
        if path not in sys.path:
            sys.path.insert(0, path)
    return precision


def _gpu_options(argv):
    """['-device_select_cuda', N] choosing this rank's GPU (none without GPUs or if given)."""
    import torch
    if "-device_select_cuda" in argv or not torch.cuda.is_available():
        return []
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    gpu = node.Get_rank() % torch.cuda.device_count()
    node.Free()
    torch.cuda.set_device(gpu)
    return ["-device_select_cuda", str(gpu)]


_REQUESTED = _requested_precision()
import petsc4py  # noqa: E402



def _is_number(token):
    try:
        float(token)
        return True
    except ValueError:
        return False


def petsc_argv(argv):
    """The PETSc options in a command line: single-dash tokens and their values. Long options of
    the application (`--epochs 3`, `--out=x`) and `python -c` are left out, so that PETSc does
    not report them as unused options at exit."""
    out, skip_value = [], False
    for token in argv[1:]:
        if skip_value and (not token.startswith("-") or _is_number(token)):
            skip_value = False
            continue
        skip_value = False
        if token.startswith("--"):
            skip_value = "=" not in token
            continue
        if token.startswith("-") or out:
            out.append(token)
    return ["python"] + out


if "petsc4py.PETSc" not in sys.modules:
    # Under pytest the command line holds pytest's own flags, not PETSc options.
    _under_pytest = "pytest" in sys.argv[0].replace("\\", "/").split("/")[-2:][0] or \
        sys.argv[0].endswith("pytest")
    _argv = ["python"] if _under_pytest else petsc_argv(sys.argv)
    petsc4py.init(_argv + _gpu_options(_argv))
from petsc4py import PETSc  # noqa: E402

PRECISION = "single" if PETSc.RealType().itemsize == 4 else "double"
if _REQUESTED not in (None, PRECISION):
    raise InputError(f"PNODE_PRECISION={_REQUESTED}, but the petsc4py found "
                     f"({petsc4py.__file__}) is {PRECISION}-precision: run `make setup-single` "
                     "(it builds the single-precision PETSc next to the double one; `make test` "
                     "does too), or install a petsc4py of that precision")
