"""What an app's run will hold against what its node has: a run that cannot fit is refused in
one line (the apps' RunError, exit status 2) before it allocates. Each app lists its parts
(Need) from its options; the estimate is a lower bound, so a refusal is never wrong."""
import re
import socket
from typing import NamedTuple

from pnode_dist.parallel import MPI, PRECISION
from workflow import RunError


def format_bytes(n):
    """'512 bytes', '3.5 KiB', '120 GiB', ...: n bytes in binary units, 3 significant digits."""
    value = float(min(n, 10 ** 300))
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} bytes" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1024


class Need(NamedTuple):
    """One part of what a run holds on one rank at a time, for check_memory: `what` it is (how
    it is counted), its `bytes` on this rank, the `option` that sizes it, as given ('--batch-size
    64'; '' for a fixed part), and whether it is `split` over the ranks (more ranks, less)."""
    what: str
    bytes: int
    option: str = ""
    split: bool = False


SOLVER_BYTES = 8 if PRECISION == "double" else 4      # one number of PETSc's state


def parameter_bytes(build):
    """Bytes of the parameters of the module `build()` returns, built on torch's meta device:
    nothing is allocated, so this may count a model too large to exist."""
    import torch
    with torch.device("meta"):
        module = build()
    return sum(p.numel() * p.element_size() for p in module.parameters())


def parameters_need(nbytes, option, moments=2):
    """Need: the parameters (nbytes), their gradients and the optimizer's `moments` tensors of
    the same size (Adam: 2), on every rank."""
    return Need(f"the parameters ({format_bytes(nbytes)} x {2 + moments}: values, gradients, "
                f"{moments} optimizer moments)", nbytes * (2 + moments), option)


def ode_states_need(method, numbers, option, what="ODE state"):
    """Need: the states PETSc's TS of `method` holds during a solve (its stages and solution, at
    least METHODS[method].states_per_step of them), each `numbers` values of this rank's state
    in the solver precision."""
    from pnode_dist import METHODS
    one = numbers * SOLVER_BYTES
    count = METHODS[method].states_per_step
    return Need(f"the {what} ({format_bytes(one)} x {count}: {method}'s stages and solution)",
                one * count, option, split=True)


def check_memory(comm, *phases, device=None):
    """Collective: RunError (exit status 2, one message on every rank) before a run allocates
    what cannot fit. Each phase is a list of Needs this rank holds at the same time (a lower
    bound: what the run allocates from now on, not what it already holds); a rank needs its
    largest phase. Refused when the ranks sharing a node's memory need more together than is
    available there: MemAvailable of /proc/meminfo, or with a CUDA `device` the GPU's free
    memory (torch.cuda.mem_get_info), shared by the ranks on that GPU. The message names the
    estimate and its parts, what is available on which host, and the option to lower."""
    import torch
    from pnode_dist._reversal.budget import available_host_bytes
    needs = max(phases, key=lambda phase: sum(n.bytes for n in phase), default=[])
    total = sum(n.bytes for n in needs)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    leader = node.bcast(comm.Get_rank(), root=0)            # names this node
    node.Free()
    host = socket.gethostname()
    try:
        if device is not None and torch.device(device).type == "cuda":
            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            free = torch.cuda.mem_get_info(index)[0]
            pool, where = (leader, index), f"GPU {index} of host {host}"
        else:
            free, pool, where = available_host_bytes(), (leader, None), f"host {host}"
    except (OSError, RuntimeError):
        free, pool, where = None, (leader, None), f"host {host}"   # unknown: nothing refused
    pools = {}
    for pool_, where_, free_, total_, needs_ in comm.allgather(
            (pool, where, free, total, [tuple(n) for n in needs])):
        entry = pools.setdefault(pool_, {"where": where_, "free": free_, "ranks": 0, "sum": 0,
                                         "top": (-1, [])})
        if free_ is not None and entry["free"] is not None:
            entry["free"] = max(entry["free"], free_)        # the same memory, read at once
        entry["ranks"] += 1
        entry["sum"] += total_
        entry["top"] = max(entry["top"], (total_, needs_), key=lambda top: top[0])
    for entry in pools.values():
        if entry["free"] is not None and entry["sum"] > entry["free"]:
            raise RunError(_memory_message(entry))


def _memory_message(pool):
    """The one-line refusal of check_memory for a pool (a node's memory, or one GPU's) whose
    ranks need more than it has."""
    total, parts = pool["top"]
    parts = sorted((Need(*p) for p in parts), key=lambda n: -n.bytes)
    shown = [n for n in parts if 100 * n.bytes >= total] or parts[:1]
    listed = "; ".join(f"{n.what}: {format_bytes(n.bytes)}" for n in shown)
    if len(parts) > len(shown):
        listed += f"; {len(parts) - len(shown)} smaller part(s)"
    lead = parts[0] if parts else Need("", 0)
    ranks, free = pool["ranks"], pool["free"]
    available = (f"the {format_bytes(free)} available on {pool['where']}" if ranks == 1 else
                 f"the {format_bytes(free / ranks)} available per rank on {pool['where']} "
                 f"({format_bytes(free)} shared by its {ranks} ranks)")
    flags = re.findall(r"--[a-z][a-z0-9-]*", lead.option)
    hint = " or ".join(flags) if flags else "the sizes"
    if lead.split:
        hint += " or use more ranks/nodes" if ranks == 1 else " or use more nodes"
    elif ranks > 1:
        hint += " or run fewer ranks per node"
    return (f"{lead.option or 'this run'} needs at least {format_bytes(total)} per rank "
            f"({listed}), more than {available}: lower {hint}")
