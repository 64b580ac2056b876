"""A continuous normalizing flow written the way FFJORD and torchdiffeq users write it, run on
pnode_dist with only the import changed: the state is the tuple (z, logp), func returns
(dz/dt, dlogp/dt), training integrates data -> base over t = [0, 1], and sampling integrates
base -> data with time running backwards, t = [1, 0].

    .venv/bin/python examples/ffjord_style.py --quick
    mpiexec -n 2 .venv/bin/python examples/ffjord_style.py --iterations 400 --out runs/ffjord

Each rank trains on its own share of every batch (the ODE's parameter gradients are summed over
the ranks by odeint's backward pass). Prints the held-out negative log-likelihood and writes
OUT/samples.png (rank 0). apps/cnf.py is the full application (trace estimators, tabular data,
training states); its dynamics concatenate the same state into one tensor and give the same
numbers (tests/test_cnf.py).
"""
import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps"))
import cnf  # noqa: E402
import densities  # noqa: E402

from pnode_dist import broadcast_parameters, odeint  # noqa: E402  (was: from torchdiffeq)
from pnode_dist.parallel import MPI  # noqa: E402


class ODEfunc(nn.Module):
    """FFJORD's ODEfunc: states (z, logp) -> (dz/dt, -tr(d(dz/dt)/dz)), exact trace."""

    def __init__(self, dim=2, hidden=64, layers=3):
        super().__init__()
        self.net = cnf.mlp(dim, hidden, layers)             # the app's network

    def forward(self, t, states):
        z = states[0]
        track = torch.is_grad_enabled()      # the adjoint differentiates through the trace
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.net(torch.cat([z, t.expand(z.shape[0], 1).to(z.dtype)], dim=1))
            div = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=track,
                                          retain_graph=True)[0][:, i]
                      for i in range(z.shape[1]))
        if not track:
            dz, div = dz.detach(), div.detach()
        return dz, -div[:, None]


def log_normal(z):
    return -0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def log_prob(func, x, steps=8):
    """log p(x): integrate (x, 0) from t=0 to t=1, as FFJORD does."""
    zs, delta = odeint(func, (x, torch.zeros_like(x[:, :1])), torch.tensor([0.0, 1.0]),
                       method="rk4", options={"step_size": 1.0 / steps})
    return log_normal(zs[-1]) - delta[-1, :, 0]


def sample(func, n, steps=8):
    """n samples: z ~ N(0, I) integrated from t=1 back to t=0 (FFJORD's reverse pass)."""
    z = torch.randn(n, 2, dtype=torch.float64)
    xs, _ = odeint(func, (z, torch.zeros(n, 1, dtype=torch.float64)), torch.tensor([1.0, 0.0]),
                   method="rk4", options={"step_size": 1.0 / steps})
    return xs[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", choices=densities.TOY, default="8gaussians")
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=512, help="global, split over ranks")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ffjord")
    p.add_argument("--quick", action="store_true", help="a few iterations (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.batch_size = 20, 128
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.iterations < 1 or args.batch_size < size:
        p.error("--iterations must be >= 1 and --batch-size at least the number of ranks")
    torch.manual_seed(args.seed)
    func = ODEfunc().double()
    broadcast_parameters(func)
    torch.manual_seed(args.seed + 1 + rank)                # each rank draws its own data
    local = args.batch_size // size + (rank < args.batch_size % size)
    opt = torch.optim.Adam(func.parameters(), lr=args.lr)
    for it in range(1, args.iterations + 1):
        x = densities.sample_toy(args.data, local)
        opt.zero_grad()
        loss = -log_prob(func, x).sum() / args.batch_size   # summed over ranks by backward
        loss.backward()
        opt.step()
        if it % 50 == 0 or it == args.iterations:
            held_out = densities.sample_toy(args.data, 2000 // size,
                                            torch.Generator().manual_seed(1000 + rank))
            with torch.no_grad():
                nll = comm.allreduce(float(-log_prob(func, held_out).sum()), op=MPI.SUM)
            if rank == 0:
                print(f"iteration {it:4d}  held-out NLL {nll / (2000 // size * size):.3f} nats",
                      flush=True)
    with torch.no_grad():
        xs = sample(func, 1000)
    parts = comm.gather(xs, root=0)
    if rank == 0:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(4, 4))
        pts = torch.cat(parts).numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=1)
        ax.set(xlim=(-4, 4), ylim=(-4, 4), title=f"samples (t: 1 -> 0), {args.data}")
        fig.savefig(out / "samples.png", dpi=80)
        print(f"samples in {out / 'samples.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
