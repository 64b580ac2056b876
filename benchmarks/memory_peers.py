"""Memory and time of one forward + backward pass: pnode_dist against the other reverse-accurate
neural-ODE tools (the memory issue's table), each contender in its own fresh process.

Problem: a PNODE-like image ODE block, y [32, 16, 16, 16], f(t, y) = conv3x3 -> tanh -> conv3x3
(16 -> 16 channels, padding 1), t = [0, 1], loss = mean(y(1)^2), gradients of y0 and the
parameters; rows: rk4 with 4/8/64/100/1000 steps, dopri5 (rtol 1e-3, atol 1e-6), rk4 with 8
steps in float32; and torchdiffeq's ode_demo (MLP 2-50-2 on y^3, batch [20, 1, 2], float64,
t = linspace(0, 25, 10), dopri5 rtol 1e-7 atol 1e-9, loss mean|pred - target|).
Contenders: pnode_dist.odeint with its default plan and with binomial checkpointing in --slots
slots; torchdiffeq odeint (backprop) and odeint_adjoint (torchdiffeq's rk4 is the 3/8 rule: the
same memory and cost as classic RK4); TorchDiffEqPack 1.0.1's ACA (odesolve_adjoint, same
method; its fixed-step RK4 backward crashes in 1.0.1, so the ACA process patches two return
values of its RK4 class (patch_aca_rk4), the steps unchanged) and MALI
(odesolve_adjoint_sym12: its own sym12async method, fixed step 1/steps on the rk4 rows,
adaptive on the dopri5 rows); torchode 1.0.1 AutoDiffAdjoint with Dopri5 and its
IntegralController (per-sample steps; dopri5 rows only: it has no rk4). ACA and MALI solve one
end time per call: ode_demo's 10 output times are 9 chained calls.

Method (per contender a fresh process, one thread, MALLOC_MMAP_THRESHOLD_=131072: every tensor
its own mapping, returned on free): import the library; prime torch (the first backward given a
gradient tensor imports ~33 MiB of modules for good, see _Prime; one f evaluation with its
backward); gc.collect() + malloc_trim(0); baseline = RssAnon; one warm-up forward + backward,
gc + malloc_trim, held = RssAnon - baseline; write 5 to /proc/self/clear_refs (VmHWM := VmRSS);
one forward + backward: peak = VmHWM - VmRSS before it; footprint = peak + held. s/iter: median
of that iteration and up to --reps - 1 more (none once --time-budget seconds are spent). pnode's
"reported" is its stats' footprint: memory_peak (else memory_used, or host_bytes_peak) plus
memory_held. Skipped: a contender whose estimated memory exceeds half of MemAvailable or whose
estimated iteration exceeds --max-seconds; stopped: a process still running after --timeout
seconds. The peers are
installed with --no-deps into .venv-peers/site (never into .venv) when missing or with
--setup-peers; only the peers' processes see it (PYTHONPATH).

    .venv/bin/python benchmarks/memory_peers.py [--quick] [--cases rk4-8 dopri5 ...]
        [--contenders "pnode default" ACA ...] [--reps 3] [--slots 2] [--setup-peers]
"""
import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_SITE = os.path.join(ROOT, ".venv-peers", "site")
PEER_PINS = ["torchdiffeqpack==1.0.1", "torchode==1.0.1", "torchtyping==0.1.5", "typeguard==2.13.3"]
CASES = {  # name -> problem; "steps": fixed rk4 steps, else adaptive with rtol/atol
    "rk4-4": dict(method="rk4", steps=4), "rk4-8": dict(method="rk4", steps=8),
    "rk4-64": dict(method="rk4", steps=64), "rk4-100": dict(method="rk4", steps=100),
    "rk4-1000": dict(method="rk4", steps=1000),
    "dopri5": dict(method="dopri5", rtol=1e-3, atol=1e-6),
    "rk4-8-f32": dict(method="rk4", steps=8, dtype="float32"),
    "ode_demo": dict(method="dopri5", rtol=1e-7, atol=1e-9, demo=True)}
QUICK_DROPS = ("rk4-100", "rk4-1000")
CONTENDERS = ["pnode default", "pnode binomial", "torchdiffeq backprop", "torchdiffeq adjoint",
              "ACA", "MALI", "torchode"]
PEERS = ("ACA", "MALI", "torchode")
ADJOINTS = ("MALI", "ACA", "torchdiffeq adjoint")


class Skip(Exception):
    pass


def status(field):
    """A field of /proc/self/status in bytes (RssAnon, VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def settle():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class ConvFunc(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.conv2(torch.tanh(self.conv1(y)))


class DemoFunc(nn.Module):  # torchdiffeq's examples/ode_demo.py ODEFunc
    def __init__(self):
        super().__init__()
        self.net, self.calls = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2)), 0
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0, std=0.1)
                nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        self.calls += 1
        return self.net(y ** 3)


class _Prime(torch.autograd.Function):
    """A custom Function whose backward calls autograd.grad with grad_outputs, as pnode_dist's,
    ACA's and odeint_adjoint's do. The first backward or grad given a gradient tensor imports
    torch.fx.experimental.symbolic_shapes (and sympy: ~33 MiB of modules, for good; torch's
    autograd._make_grads); a .sum().backward() does not."""
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        with torch.enable_grad():
            x = ctx.saved_tensors[0].detach().requires_grad_(True)
            return torch.autograd.grad(x * x, x, g)[0]


def problem(case):
    """func, y0, t, loss(ys) of a case (seeded: the same in every process)."""
    torch.manual_seed(0)
    if case.get("demo"):
        func, y0 = DemoFunc().double(), torch.randn(20, 1, 2, dtype=torch.float64)
        t = torch.linspace(0, 25, 10, dtype=torch.float64)
        target = torch.randn(10, 20, 1, 2, dtype=torch.float64)
        return func, y0, t, lambda ys: (torch.stack(list(ys)) - target).abs().mean()
    dtype = getattr(torch, case.get("dtype", "float64"))
    func, y0 = ConvFunc().to(dtype), torch.randn(32, 16, 16, 16, dtype=dtype)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    return func, y0, t, lambda ys: ys[-1].square().mean()


def patch_aca_rk4():
    """TorchDiffEqPack 1.0.1's ACA backward fails for fixed steps: it iterates the step's error
    estimate (None for RK4) and prepends t0 to the steps as a list (a tensor for fixed grids).
    In this process only: RK4 returns an empty error estimate and its steps as a list."""
    from TorchDiffEqPack.odesolver.fixed_grid_solver import RK4
    step, integrate = RK4.step, RK4.integrate
    RK4.step = lambda *a, **k: (lambda r: (r[0], ()) + tuple(r[2:]))(step(*a, **k))
    RK4.integrate = lambda *a, **k: (lambda r: (r[0], list(r[1])) if k.get("return_steps") else r)(
        integrate(*a, **k))


def load(contender, case, slots):
    """Import the contender's library; return solve(func, y0, t, stats) -> y at every t."""
    m, fixed = case["method"], "steps" in case
    tol = {} if fixed else dict(rtol=case["rtol"], atol=case["atol"])
    kw = {"options": {"step_size": 1.0 / case["steps"]}} if fixed else tol
    if contender.startswith("pnode"):
        import pnode_dist
        from pnode_dist import Checkpointing, odeint
        pnode_dist.odeint  # noqa: B018  (PETSc starts before the baseline)
        ck = Checkpointing(schedule="binomial", slots=slots) if "binomial" in contender else None
        return lambda f, y, t, st: odeint(f, y, t, method=m, checkpointing=ck, stats=st, **kw)
    if contender.startswith("torchdiffeq"):
        import torchdiffeq
        solve = torchdiffeq.odeint if contender.endswith("backprop") else torchdiffeq.odeint_adjoint
        return lambda f, y, t, st: solve(f, y, t, method=m, **kw)
    try:
        import TorchDiffEqPack as tdep
        import torchode
    except ImportError as e:
        raise Skip(f"not installed ({e})")
    if contender in ("ACA", "MALI"):
        h = 1.0 / case["steps"] if fixed else None
        opts = dict(print_neval=False, neval_max=10 ** 7, h=h, **tol)
        if contender == "ACA":
            solve, opts["method"] = tdep.odesolve_adjoint, m
            if fixed:
                patch_aca_rk4()
        else:
            solve = tdep.odesolve_adjoint_sym12
            opts["method"] = "fixedstep_sym12async" if fixed else "sym12async"

        def run(f, y, t, st):
            ys = [y]  # one end time per call: chain the intervals
            for a, b in zip(t[:-1].tolist(), t[1:].tolist()):
                ys.append(solve(f, ys[-1], dict(opts, t0=a, t1=b)))
            return ys
        return run
    if fixed:
        raise Skip("torchode 1.0.1 has no rk4 (euler, heun, dopri5, tsit5)")

    def run(f, y, t, st):
        n = y.shape[0]
        term = torchode.ODETerm(lambda s, z: f(s, z.view(y.shape)).reshape(n, -1))
        ctrl = torchode.IntegralController(atol=case["atol"], rtol=case["rtol"], term=term)
        solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), ctrl)
        ivp = torchode.InitialValueProblem(y0=y.reshape(n, -1), t_eval=t.to(y.dtype).expand(n, -1))
        sol = solver.solve(ivp)
        return sol.ys.transpose(0, 1).reshape(len(t), *y.shape)
    return run


def estimate(contender, case, state_bytes, t_fwd, t_fb, slots):
    """(bytes, seconds) one forward + backward needs, for fixed steps (adaptive: unknown, 0).
    backprop keeps ~2 states per stage; ACA one per step; replays: forward f passes beyond the
    one whose graph is differentiated (binomial: revolve's repetition number)."""
    if "steps" not in case:
        return 0, 0.0
    n = case["steps"]
    mem = {"torchdiffeq backprop": 8 * n, "ACA": n}.get(contender, 0) * state_bytes
    replays = {"torchdiffeq adjoint": 1, "ACA": 2, "MALI": 2}.get(contender, 0)
    if contender == "pnode binomial":
        replays = next(r for r in range(n + 1) if math.comb(slots + r, slots) >= n)
    return mem, 4 * n * (replays * t_fwd + t_fb)


def child(case_name, contender, args):
    torch.set_num_threads(1)
    case = CASES[case_name]
    func, y0, t, loss_of = problem(case)
    try:
        solve = load(contender, case, args.slots)
    except Skip as e:
        return print(json.dumps({"skipped": str(e)}))
    _Prime.apply(torch.ones(4, requires_grad=True)).backward(torch.ones(4))
    assert "torch.fx.experimental.symbolic_shapes" in sys.modules  # what the priming is for
    start = time.perf_counter()                     # f's one-time setup, and its cost
    with torch.no_grad():
        func(t[0], y0)
    t_fwd = time.perf_counter() - start
    start = time.perf_counter()
    func(t[0], y0.requires_grad_(True)).square().sum().backward()
    t_fb = time.perf_counter() - start
    state_bytes = y0.nelement() * y0.element_size()
    mem, secs = estimate(contender, case, state_bytes, t_fwd, t_fb, args.slots)
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    if mem > avail / 2:
        return print(json.dumps({"skipped": f"needs ~{mem / 2 ** 30:.1f} GiB"}))
    if secs > args.max_seconds:
        return print(json.dumps({"skipped": f"~{secs:.0f} s per iteration > --max-seconds"}))

    def iteration(stats):
        y0.grad = None
        func.zero_grad(set_to_none=True)
        func.calls = 0
        begin = time.perf_counter()
        loss_of(solve(func, y0, t, stats)).backward()
        return time.perf_counter() - begin

    y0.grad = None
    func.zero_grad(set_to_none=True)
    settle()
    baseline = status("RssAnon")
    iteration({})                                   # warm-up: the model's first solve
    y0.grad = None
    func.zero_grad(set_to_none=True)
    settle()
    held = status("RssAnon") - baseline
    with open("/proc/self/clear_refs", "w") as f:   # VmHWM := VmRSS
        f.write("5")
    before, stats = status("VmRSS"), {}
    times = [iteration(stats)]
    peak, calls = status("VmHWM") - before, func.calls
    while len(times) < args.reps and sum(times) < args.time_budget:
        times.append(iteration({}))
    own = stats.get("memory_peak", stats.get("memory_used", stats.get("host_bytes_peak")))
    reported = None if own is None else own + stats.get("memory_held", 0)
    print(json.dumps({"peak": peak / 2 ** 20, "held": held / 2 ** 20, "n": len(times),
                      "time": statistics.median(times), "fevals": calls,
                      "plan": stats.get("checkpoint_schedule"),
                      "recomputed": stats.get("recomputed_steps"),
                      "reported": None if reported is None else reported / 2 ** 20}))


def setup_peers():
    """Install the peers with --no-deps into .venv-peers/site (the project's venv untouched)."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", "--no-deps",
           "--target", PEERS_SITE, *PEER_PINS]
    print("installing the peers:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"peer install failed (ACA, MALI, torchode will be skipped):\n{proc.stderr[-2000:]}")
    return proc.returncode == 0


def run_child(case_name, contender, args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    if contender in PEERS:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), PEERS_SITE) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case_name, contender,
           "--reps", str(args.reps), "--slots", str(args.slots),
           "--max-seconds", str(args.max_seconds), "--time-budget", str(args.time_budget)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"stopped after --timeout {args.timeout:g} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"failed: {last[:150]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def note(contender, case, r):
    if "skipped" in r:
        return r["skipped"]
    if contender.startswith("pnode"):
        extra = f", {r['recomputed']} steps re-run" if r.get("recomputed") is not None else ""
        return f"plan {r['plan']}{extra}"
    if contender == "ACA" and "steps" in case:
        return "rk4, fixed h 1/%d (patched: see patch_aca_rk4)" % case["steps"]
    if contender == "MALI":
        return "sym12async, " + (f"fixed h 1/{case['steps']}" if "steps" in case else "adaptive")
    return ""


def print_case(name, results):
    case = CASES[name]
    what = ("ode_demo: MLP 2-50-2 on y^3, [20, 1, 2], 10 outputs on [0, 25]" if case.get("demo")
            else f"conv block [32, 16, 16, 16] {case.get('dtype', 'float64')}")
    how = (f"{case['steps']} steps" if "steps" in case
           else f"rtol {case['rtol']:g}, atol {case['atol']:g}")
    print(f"\n### {name}: {case['method']} {how}; {what}\n")
    print("| contender | peak MiB | held MiB | footprint MiB | s/iter (n) | f evals | reported MiB "
          "| note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for c, r in results.items():
        if "skipped" in r:
            print(f"| {c} | - | - | - | - | - | - | {note(c, case, r)} |")
            continue
        rep = "-" if r.get("reported") is None else f"{r['reported']:.1f}"
        print(f"| {c} | {r['peak']:.1f} | {r['held']:.1f} | {r['peak'] + r['held']:.1f} | "
              f"{r['time']:.3f} ({r['n']}) | {r['fevals']} | {rep} | {note(c, case, r)} |")
    fp = {c: r["peak"] + r["held"] for c, r in results.items() if "skipped" not in r}
    adj = {c: fp[c] for c in ADJOINTS if c in fp}
    best = min(adj, key=adj.get) if adj else None
    for c in ("pnode default", "pnode binomial"):
        if c in fp and best:
            print(f"\n{c} footprint / least of {', '.join(adj)} ({best}, {adj[best]:.1f} MiB): "
                  f"{fp[c] / max(adj[best], 1e-9):.2f}")
    if "pnode default" in fp and "torchdiffeq backprop" in fp:
        p, b = results["pnode default"], results["torchdiffeq backprop"]
        print(f"\npnode default / torchdiffeq backprop: footprint "
              f"{fp['pnode default'] / fp['torchdiffeq backprop']:.2f}, "
              f"time {p['time'] / b['time']:.2f}")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"drop {', '.join(QUICK_DROPS)}")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS)
    parser.add_argument("--reps", type=int, default=3, help="timed iterations at most (median)")
    parser.add_argument("--slots", type=int, default=2, help="slots of 'pnode binomial'")
    parser.add_argument("--max-seconds", type=float, default=250,
                        help="skip a contender whose estimated iteration takes longer")
    parser.add_argument("--time-budget", type=float, default=30,
                        help="no further timed iteration once this many seconds are spent")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per contender process")
    parser.add_argument("--setup-peers", action="store_true", help="(re)install the peers first")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args)
    if args.setup_peers or (any(c in PEERS for c in args.contenders)
                            and not os.path.isdir(os.path.join(PEERS_SITE, "TorchDiffEqPack"))):
        setup_peers()
    cases = [c for c in args.cases if not (args.quick and c in QUICK_DROPS)]
    print(f"forward + backward, one thread, each contender in a fresh process, "
          f"MALLOC_MMAP_THRESHOLD_=131072; peak = VmHWM - VmRSS over one iteration after a "
          f"warm-up, held = RssAnon after it - before the first solve; pnode binomial: "
          f"{args.slots} slots; torch {torch.__version__}")
    for name in cases:
        print_case(name, {c: run_child(name, c, args) for c in args.contenders})


if __name__ == "__main__":
    main()
