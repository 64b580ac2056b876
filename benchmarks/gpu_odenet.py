"""The paper's setting on a GPU: the ODE block of a ResNet-like image classifier on CIFAR-shaped
inputs (random data), Euler and RK4 with 1 to 21 steps. Per iteration (forward + backward of the
block, loss = <w, y(T)>): time and peak GPU memory of pnode_dist, torchdiffeq's odeint
(backprop) and odeint_adjoint, and the pure-torch replay limit (exactly the f evaluations and
vjps of the discrete adjoint, benchmarks/overhead.py). One run, cases interleaved; ratios of
medians are printed with the targets (time <= 1.2 x the limit and <= 0.8 x odeint_adjoint, peak
memory <= 0.3 x backprop at the most steps). Peak memory counts torch's reserved memory and, by
polling the device's free memory, PETSc's own CUDA allocations (its Vecs and trajectory).

    PNODE_PRECISION=single python benchmarks/gpu_odenet.py            # float32 on the GPU
    python benchmarks/gpu_odenet.py --quick                           # tiny, runs on a CPU

All contenders run in the solver's precision (float32 needs PNODE_PRECISION=single; a float32
model on the float64 build would pay a cast per callback). The gradients are checked against
the replay limit before timing: the script fails if they differ.
"""
import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import replay_limit  # noqa: E402

from pnode_dist import Checkpointing, METHODS, odeint, rank_device  # noqa: E402
from pnode_dist.testing import SOLVER_DTYPE  # noqa: E402


class ConcatConv(nn.Module):
    """3x3 convolution of [y, t] (time as an extra channel)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin + 1, cout, 3, padding=1)

    def forward(self, t, y):
        tt = torch.ones_like(y[:, :1]) * t
        return self.conv(torch.cat([tt, y], 1))


class ODEFunc(nn.Module):
    """ResNet-like residual branch: GroupNorm, ReLU, conv, GroupNorm, ReLU, conv."""

    def __init__(self, width):
        super().__init__()
        groups = min(32, width)
        self.norm1, self.norm2 = nn.GroupNorm(groups, width), nn.GroupNorm(groups, width)
        self.conv1, self.conv2 = ConcatConv(width, width), ConcatConv(width, width)

    def forward(self, t, y):
        h = self.conv1(t, torch.relu(self.norm1(y)))
        return self.conv2(t, torch.relu(self.norm2(h)))


class DeviceMemoryPeak:
    """Peak GPU memory in use during a `with` block, above what was in use before it: torch's
    reserved memory, and the device's free memory polled on a thread (PETSc allocates its CUDA
    Vecs, trajectory included, outside torch's allocator)."""

    def __init__(self, device, interval=5e-4):
        self.device, self.interval = device, interval

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.reserved0 = torch.cuda.memory_reserved(self.device)
        self.free0 = self.min_free = torch.cuda.mem_get_info(self.device)[0]
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.min_free = min(self.min_free, torch.cuda.mem_get_info(self.device)[0])
            time.sleep(self.interval)

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.running = False
        self.thread.join()
        self.min_free = min(self.min_free, torch.cuda.mem_get_info(self.device)[0])
        self.peak = max(self.free0 - self.min_free,
                        torch.cuda.max_memory_reserved(self.device) - self.reserved0)


def seconds(fn, device):
    """Wall time of one call (GPU work included)."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def peak_memory(fn, device):
    """Peak GPU bytes of one call above those in use before (a separate run: the polling thread
    would disturb the timing)."""
    with DeviceMemoryPeak(device) as memory:
        fn()
    return memory.peak


def contenders(func, y0, w, method, steps):
    """name -> function returning dL/dy0 (parameter gradients land in .grad)."""
    h = 1.0 / steps
    t = torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device)
    tableau = METHODS[method].tableau

    def pnode(checkpointing=None):
        def run():
            y = y0.clone().requires_grad_(True)
            out = odeint(func, y, t, method=method, options={"step_size": h}, comm="self",
                         checkpointing=checkpointing)[-1]
            (out * w).sum().backward()
            return y.grad
        return run

    def limit():
        _, lam, mu = replay_limit(func, y0, h, steps, tableau, grad_out=w)
        for p, m in zip(func.parameters(), mu):
            p.grad = m
        return lam

    cases = {"pnode_dist": pnode(),
             "pnode_dist binomial(3)": pnode(Checkpointing(schedule="binomial", slots=3)),
             "replay limit": limit}
    try:
        import torchdiffeq
    except ImportError:
        print("torchdiffeq not installed: comparing with the replay limit only")
        return cases

    def tdq(solver):
        def run():
            y = y0.clone().requires_grad_(True)
            out = solver(func, y, t, method=method, options={"step_size": h})[-1]
            (out * w).sum().backward()
            return y.grad
        return run
    cases["torchdiffeq odeint"] = tdq(torchdiffeq.odeint)
    cases["torchdiffeq odeint_adjoint"] = tdq(torchdiffeq.odeint_adjoint)
    return cases


def check_gradients(cases, func, method):
    """pnode_dist's dL/dy0 against the replay of the same scheme (torchdiffeq's rk4 is the 3/8
    rule, another scheme: only shown)."""
    grads = {}
    for name, fn in cases.items():
        func.zero_grad()
        grads[name] = fn()
    ref = grads["replay limit"]
    tol = 1e3 * torch.finfo(ref.dtype).eps
    for name, g in grads.items():
        err = ((g - ref).abs().max() / ref.abs().max()).item()
        print(f"  check {name:28s} |dy0 - dy0(limit)| / |dy0(limit)| = {err:.1e}")
        if name.startswith("pnode_dist") and err > tol:
            sys.exit(f"{name}: gradient differs from the replay of the same scheme ({err:.1e})")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=64, help="channels of the ODE block")
    p.add_argument("--size", type=int, default=32, help="image side (CIFAR: 32)")
    p.add_argument("--steps", default="1,6,11,16,21")
    p.add_argument("--methods", default="euler,rk4")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test on a CPU)")
    args = p.parse_args()
    if args.quick:
        args.batch, args.width, args.size, args.steps, args.reps = 4, 4, 8, "1,3", 2
    device = rank_device()
    torch.manual_seed(0)
    dtype = SOLVER_DTYPE
    func = ODEFunc(args.width).to(device, dtype)
    # The block's input: a stem's output for a CIFAR-shaped batch (3 x 32 x 32 images).
    stem = nn.Conv2d(3, args.width, 3, padding=1).to(device, dtype)
    with torch.no_grad():
        y0 = stem(torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype))
    w = torch.randn_like(y0)
    name_gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"ODE block {args.width}x{args.size}x{args.size}, batch {args.batch}, {dtype}, on "
          f"{name_gpu}; median of {args.reps}")
    steps_list = [int(s) for s in args.steps.split(",")]
    for method in args.methods.split(","):
        for steps in steps_list:
            cases = contenders(func, y0, w, method, steps)
            print(f"\n{method}, {steps} steps")
            check_gradients(cases, func, method)
            runs = {name: [] for name in cases}
            for _ in range(args.reps):
                for name, fn in cases.items():
                    func.zero_grad()
                    runs[name].append(seconds(fn, device))
            sec = {n: statistics.median(r) for n, r in runs.items()}
            mem = {n: peak_memory(fn, device) for n, fn in cases.items()} \
                if device.type == "cuda" else {}
            for name in cases:
                memory = f"{mem[name] / 2**20:9.1f} MiB" if device.type == "cuda" else ""
                print(f"  {name:28s} {1e3 * sec[name]:9.1f} ms {memory}")
            mine = sec["pnode_dist"]
            print(f"  time pnode_dist / replay limit = {mine / sec['replay limit']:.2f} "
                  "(target <= 1.2)")
            if "torchdiffeq odeint_adjoint" in sec:
                print(f"  time pnode_dist / odeint_adjoint = "
                      f"{mine / sec['torchdiffeq odeint_adjoint']:.2f} (target <= 0.8)")
            if device.type == "cuda" and "torchdiffeq odeint" in mem:
                for name in ("pnode_dist", "pnode_dist binomial(3)"):
                    print(f"  memory {name} / odeint backprop = "
                          f"{mem[name] / mem['torchdiffeq odeint']:.2f}"
                          + (" (target <= 0.3)" if steps == max(steps_list) else ""))


if __name__ == "__main__":
    main()
