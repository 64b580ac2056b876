"""Run under mpiexec -n 2 (or 3): faults injected on ONE rank end in an error on EVERY rank, never
a hang or a wrong gradient, and leave the solvers usable. argv[1] picks a group of cases:

  collective   exceptions / NaN in func on the last rank (forward and adjoint, every method
               family and checkpointing policy), each followed by the same solve without the
               fault (must give the reference gradient: no poisoned solver); checkpoint files
               damaged between forward and backward; a checkpoint tier of the user's
               whose restore raises or returns other values; an exception in a torchdiffeq step
               callback and in f's derivative in each callback that differentiates f (the
               guard of every callback kind; PNODE_TEST_METHODS, comma-separated, limits
               these and the func faults to the methods it names); a full checkpoint disk
               (PNODE_TEST_FULL_DIR, a small tmpfs, when given); grad mode differing between
               ranks; lastly a backward skipped on one rank. Prints 'case <name>: <outcome>' per case (rank 0) and
               'all cases passed' at the end; exits 1 on any wrong outcome.
  keyboard     KeyboardInterrupt inside func on the last rank (not catchable per rank: the job
               must be aborted, promptly).
  uncaught     an exception in the user's own code on the last rank, outside pnode_dist.
  lone-backward  rank 0 runs a backward pass the other ranks never run (they exit).
"""
import glob
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__) + "/..")
from conftest import TimeMLP  # noqa: E402

from pnode_dist import IMEX, Checkpointing, InputError, SolverError, odeint  # noqa: E402
from pnode_dist.checkpointing import Tier  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
LAST = size - 1
T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
Y = torch.randn(2 * size + 1, 3, generator=torch.Generator().manual_seed(5),
                dtype=torch.float64)
lo, hi = 2 * rank, 2 * rank + 2 + (rank == LAST)          # uneven shards
failures = []


class Faulty(TimeMLP):
    """TimeMLP that, once armed, fails on the last rank: raises `error` or returns NaN."""

    def __init__(self):
        super().__init__(seed=3)
        self.fault = None            # None, or (kind, error class)

    def forward(self, t, y):
        if self.fault is not None and rank == LAST:
            kind, error = self.fault
            if kind == "raise":
                raise error(f"injected fault on rank {rank}")
            return super().forward(t, y) * float("nan")
        return super().forward(t, y)


class Stiff(torch.nn.Module):
    def forward(self, t, y):
        return -2.0 * y


METHODS = {"rk4": {"step_size": 0.05}, "dopri5": None, "bosh3": None,
           "cn": {"step_size": 0.1}, "beuler": {"step_size": 0.1, "linear_solver": "exact"},
           "arkimex": None}


def make_func(method):
    f = Faulty()
    return IMEX(implicit=Stiff(), explicit=f) if method == "arkimex" else f


def faulty_part(func):
    return func.explicit if isinstance(func, IMEX) else func


def solve(func, method, policy, phase=None, fault=None, damage=None):
    """Gradient of a fixed loss (this rank's y0 shard and every parameter)."""
    y0 = Y[lo:hi].clone().requires_grad_(True)
    part = faulty_part(func)
    part.fault = fault if phase == "forward" else None
    try:
        ys = odeint(func, y0, T, method=method, options=METHODS[method], rtol=1e-6, atol=1e-8,
                    checkpointing=policy)
        part.fault = fault if phase == "adjoint" else None
        if damage is not None:
            damage()
        (ys.sin() * torch.arange(1, 4, dtype=ys.dtype).view(3, 1, 1)).sum().backward()
    finally:
        part.fault = None
    grads = [y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in func.parameters()]
    func.zero_grad(set_to_none=True)
    return torch.cat(grads)


def expect_error(name, exc_type, words, call):
    """`call` must raise exc_type on this rank with every one of `words` in the message."""
    try:
        call()
    except exc_type as exc:
        missing = [w for w in words if w not in str(exc)]
        ok = not missing
        outcome = str(exc)[:160] if ok else f"message lacks {missing}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a wrong kind of error is a failure
        ok, outcome = False, f"{type(exc).__name__}: {exc}"
    else:
        ok, outcome = False, "no error"
    report(name, ok, outcome)


_clock = [time.perf_counter()]


def report(name, ok, outcome):
    everyone = comm.allgather((ok, outcome))
    now = time.perf_counter()
    seconds, _clock[0] = now - _clock[0], now
    if rank == 0:
        bad = [r for r, (good, _) in enumerate(everyone) if not good]
        print(f"case {name} [{seconds:.2f} s]: {'ok' if not bad else 'FAILED on ranks %s' % bad}: "
              f"{everyone[bad[0] if bad else 0][1]}", flush=True)
    if not all(good for good, _ in everyone):
        failures.append(name)


def check_same(name, a, b):
    diff = float((a - b).abs().max() / b.abs().max())
    report(name, diff <= 1e-13, f"relative difference {diff:.1e}")


def policies(disk):
    return {"all": Checkpointing(schedule="all"),
            "binomial-host": Checkpointing(schedule="binomial", slots=3),
            "binomial-disk": Checkpointing(schedule="binomial", slots=3, host_bytes=0,
                                           disk_dir=disk)}


def chosen_methods():
    """The methods PNODE_TEST_METHODS names (comma-separated), default all."""
    chosen = os.environ.get("PNODE_TEST_METHODS")
    return chosen.split(",") if chosen else list(METHODS)


def func_faults(disk):
    """Exception / NaN in func on the last rank, then the same solve without it (for each
    chosen method)."""
    for method in chosen_methods():
        for pname, policy in policies(disk).items():
            func = make_func(method)
            reference = solve(func, method, policy)
            for phase in ("forward", "adjoint"):
                for kind in ("raise", "nan"):
                    name = f"{kind} in func on rank {LAST}, {method}, {pname}, {phase}"
                    words = ["injected fault", f"rank {LAST}"] if kind == "raise" else []
                    expect_error(name, SolverError, words,
                                 lambda: solve(func, method, policy, phase, (kind, ValueError)))
                    check_same(f"  then the same solve without the fault", solve(func, method,
                                                                                  policy),
                               reference)


def damaged_files(disk):
    """Checkpoint files damaged on the last rank between forward and backward."""
    policy = policies(disk)["binomial-disk"]
    func = make_func("rk4")
    reference = solve(func, "rk4", policy)
    step0 = Y[lo:hi].numpy().tobytes()        # the checkpoint of y0 is restored last

    def my_file():
        """The open checkpoint file, through this process's descriptor (it has no name)."""
        assert not glob.glob(os.path.join(disk, "*")), "a checkpoint file has a name"
        found = [f"/proc/self/fd/{fd}" for fd in os.listdir("/proc/self/fd")
                 if _target(fd).startswith(os.path.join(disk, "")) and
                 _target(fd).endswith(f".rank{rank:04d}-of-{size:04d}.h5.part-"
                                      f"{os.getpid()}-{_space()} (deleted)")]
        assert len(found) == 1, found
        return found[0]

    def flip_bit():
        path = my_file()
        with open(path, "r+b") as f:
            data = f.read()
            at = data.find(step0)
            assert at >= 0, "y0's bytes not found in the checkpoint file"
            f.seek(at + 3)
            f.write(bytes([data[at + 3] ^ 0x10]))

    def zero_data():
        path = my_file()
        with open(path, "r+b") as f:
            at = f.read().find(step0)
            f.seek(at)
            f.write(bytes(len(step0)))

    def truncate():
        path = my_file()
        os.truncate(path, os.path.getsize(path) // 2)

    for name, damage in (("bit flip", flip_bit), ("overwritten with zeros", zero_data),
                         ("truncated", truncate)):
        expect_error(f"checkpoint file {name} on rank {LAST}", SolverError,
                     ["checkpoint file", f"rank {LAST}", "damaged"],
                     lambda: solve(func, "rk4", policy,
                                   damage=damage if rank == LAST else None))
        check_same("  then the same solve", solve(func, "rk4", policy), reference)
    left = glob.glob(os.path.join(disk, "*")) + [
        fd for fd in os.listdir("/proc/self/fd") if _target(fd).startswith(disk)]
    report("no checkpoint files left behind, nor open", not left, f"{left}")


def _target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _space():
    from pnode_dist._reversal import disk_tier
    return disk_tier._PROCESS_SPACE


class RemoteTier(Tier):
    """A checkpoint tier of the user's; once `failing` is set, its get() on the last rank raises
    or returns other values."""
    name = "remote"
    failing = None               # None, "raise" or "values" (class-wide: a tier per solve)

    def __init__(self):
        super().__init__()
        self.data = {}

    def put(self, pos, state, meta):
        self.data[pos] = state.clone()

    def get(self, pos):
        if self.failing and rank == LAST:
            if self.failing == "raise":
                raise ConnectionError(f"remote store unreachable from rank {rank}")
            return self.data[pos] + 1e-12
        return self.data[pos]

    def drop(self, pos):
        del self.data[pos]


class RemotePolicy(Checkpointing):
    def tiers(self, pool, capacities=None):
        return [RemoteTier()]


def tier_faults():
    """A tier of the user's whose restore raises, or returns other values, on the last rank."""
    func, policy = make_func("rk4"), RemotePolicy(schedule="binomial", slots=3)
    reference = solve(func, "rk4", policy)
    for failing, words in (("raise", ["ConnectionError", "unreachable"]),
                           ("values", ["other values"])):
        def fail():
            RemoteTier.failing = failing
        try:
            expect_error(f"checkpoint tier get() failing ({failing}) on rank {LAST}", SolverError,
                         ["checkpoint tier 'remote' failed restoring", f"raised on rank {LAST}"]
                         + words, lambda: solve(func, "rk4", policy, damage=fail))
        finally:
            RemoteTier.failing = None
        check_same("  then the same solve", solve(func, "rk4", policy), reference)


def full_disk(directory):
    """A checkpoint tier on a full file system: an error on every rank, nothing left behind."""
    func = make_func("rk4")
    policy = Checkpointing(schedule="binomial", slots=3, host_bytes=0, disk_dir=directory)
    expect_error("checkpoint disk full", SolverError, ["disk full", "checkpoint file"],
                 lambda: solve(func, "rk4", policy))
    left = glob.glob(os.path.join(directory, "*.h5"))
    report("  no partial checkpoint files left", not left, f"{left}")
    check_same("  then the same solve in memory", solve(func, "rk4", None),
               solve(make_func("rk4"), "rk4", None))


class _FailingDerivative(torch.autograd.Function):
    """The identity, whose derivative raises once armed (on the last rank only)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if DerivativeFault.armed and rank == LAST:
            raise ArithmeticError(f"derivative fault on rank {rank}")
        return grad


class DerivativeFault(TimeMLP):
    """TimeMLP whose derivatives (not its values) fail once armed: the fault reaches only the
    callbacks that differentiate f (vjps, Newton's jvps, the exact block solve)."""
    armed = False

    def __init__(self):
        super().__init__(seed=3)

    def forward(self, t, y):
        return _FailingDerivative.apply(super().forward(t, y))


def derivative_faults():
    """An exception in f's derivative on the last rank, in each kind of callback that
    differentiates f (of the chosen methods), then the same solve without it."""
    kinds = {"a vector-Jacobian product (rk4 adjoint)": ("rk4", "adjoint"),
             "Newton's Jacobian-vector products (cn forward)": ("cn", "forward"),
             "the transposed products (cn adjoint)": ("cn", "adjoint"),
             "the exact block solve (beuler forward)": ("beuler", "forward")}
    for kind, (method, phase) in kinds.items():
        if method not in chosen_methods():
            continue
        func = DerivativeFault()
        reference = solve(func, method, None)

        def faulty():
            y0 = Y[lo:hi].clone().requires_grad_(True)
            DerivativeFault.armed = phase == "forward"
            try:
                ys = odeint(func, y0, T, method=method, options=METHODS[method])
                DerivativeFault.armed = True
                ys.sum().backward()
            finally:
                DerivativeFault.armed = False
        expect_error(f"derivative fault on rank {LAST} in {kind}", SolverError,
                     ["ArithmeticError", "derivative fault", f"rank {LAST}"], faulty)
        check_same("  then the same solve without the fault", solve(func, method, None),
                   reference)


class WithCallback(Faulty):
    """A torchdiffeq step callback that, once armed, raises on the last rank."""
    armed = False

    def callback_accept_step(self, t0, y0, dt):
        if self.armed and rank == LAST and float(t0) > 0.2:
            raise KeyError(f"callback fault on rank {rank}")


def step_callback():
    func = WithCallback()
    reference = solve(func, "dopri5", None)

    def armed():
        y0 = Y[lo:hi].clone()
        func.armed = True
        try:
            odeint(func, y0, T, method="dopri5")
        finally:
            func.armed = False
    expect_error(f"exception in a step callback on rank {LAST}", SolverError,
                 ["KeyError in a step callback of func", "callback fault", f"rank {LAST}"], armed)
    check_same("  then the same solve without the fault", solve(func, "dopri5", None), reference)


def grad_mode():
    func = make_func("rk4")

    def mixed():
        with torch.set_grad_enabled(rank != LAST):
            solve(func, "rk4", None)
    expect_error(f"torch.no_grad() on rank {LAST} only", InputError, ["different points",
                                                                     "without gradient"], mixed)


def skipped_backward():
    """The last rank skips a backward pass and goes on to the next solve."""
    func = make_func("rk4")

    def run():
        y0 = Y[lo:hi].clone().requires_grad_(True)
        ys = odeint(func, y0, T, method="rk4", options={"step_size": 0.1})
        if rank != LAST:
            ys.sum().backward()
        odeint(func, y0, T, method="rk4", options={"step_size": 0.1})
    expect_error(f"backward skipped on rank {LAST}", InputError, ["different points"], run)


def collective():
    disk = comm.bcast(tempfile.mkdtemp(prefix="pnode-faults-") if rank == 0 else None, root=0)
    func_faults(disk)
    damaged_files(disk)
    tier_faults()
    full = os.environ.get("PNODE_TEST_FULL_DIR")
    if full:
        full_disk(full)
    step_callback()
    derivative_faults()
    grad_mode()
    skipped_backward()        # last: the ranks' call counts differ from here on
    comm.Barrier()
    if rank == 0:
        os.rmdir(disk)
        print("all cases passed" if not failures else f"FAILED: {failures}", flush=True)
    sys.exit(1 if failures else 0)


def keyboard():
    func = make_func("rk4")
    solve(func, "rk4", None, "forward", ("raise", KeyboardInterrupt))
    print(f"rank {rank} was not interrupted", flush=True)


def uncaught():
    solve(make_func("rk4"), "rk4", None)
    if rank == LAST:
        raise RuntimeError("a bug in the user's script on one rank")
    solve(make_func("rk4"), "rk4", None)


def lone_backward():
    func = make_func("rk4")
    y0 = Y[lo:hi].clone().requires_grad_(True)
    ys = odeint(func, y0, T, method="rk4", options={"step_size": 0.1})
    if rank == 0:
        ys.sum().backward()
    print(f"rank {rank} finished", flush=True)


def signalled():
    """Solves with disk checkpoints until a signal ends the job; after the first forward (its
    checkpoint file open), the last rank writes its pid to PNODE_TEST_PIDFILE."""
    func = make_func("rk4")
    policy = policies(os.environ["PNODE_TEST_DISK"])["binomial-disk"]
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline:
        y0 = Y[lo:hi].clone().requires_grad_(True)
        ys = odeint(func, y0, T, method="rk4", options={"step_size": 0.01}, checkpointing=policy)
        if rank == LAST and not os.path.exists(os.environ["PNODE_TEST_PIDFILE"]):
            with open(os.environ["PNODE_TEST_PIDFILE"] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(os.environ["PNODE_TEST_PIDFILE"] + ".tmp", os.environ["PNODE_TEST_PIDFILE"])
        ys.sum().backward()
    print(f"rank {rank} was not interrupted", flush=True)


{"collective": collective, "keyboard": keyboard, "uncaught": uncaught,
 "lone-backward": lone_backward, "signalled": signalled}[sys.argv[1]]()
