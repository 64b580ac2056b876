"""Continuous normalizing flow (FFJORD style) trained data-parallel with pnode_dist.

The ODE carries the sample and its log-density change, d[z, dlogp]/dt = [g(t, z), -tr(dg/dz)],
from the data (t = 0) to a standard normal (t = 1): log p(x) = log N(z(1)) - dlogp(1). The trace
is exact (one backward pass per dimension; the default up to 4 dimensions) or Hutchinson's
estimate e^T (dg/dz) e with one Rademacher e per sample held fixed over the solve. Gradients are
PETSc's discrete adjoint, which differentiates through the trace (second derivatives of g).

    mpiexec -n 2 .venv/bin/python apps/cnf.py --data 8gaussians          # about four minutes
    mpiexec -n 2 .venv/bin/python apps/cnf.py --data breast-cancer        # 30-D table
    .venv/bin/python apps/cnf.py --quick                                    # smoke test

Data (apps/densities.py): 2-D densities 8gaussians, checkerboard, moons, pinwheel; and
breast-cancer, scikit-learn's bundled 30-D real-valued table standing in for FFJORD's tables
(which need downloads). Each rank draws its own share of every batch. Reports the negative
log-likelihood of held-out data in nats per sample (and bits per dimension), with the exact
trace. Outputs in OUT: metrics.json, curves.png, density.png (2-D: learned density next to the
data), training states in OUT/state (--save-every K, --resume auto); SIGTERM/SIGUSR1 save the
state and exit with status 75. PETSc options of the flow use the prefix 'cnf_'.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import densities  # noqa: E402
import ode_cli  # noqa: E402
import workflow  # noqa: E402

import pnode_dist  # noqa: E402
from pnode_dist import ODEBlock, broadcast_parameters  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402


def mlp(dim, hidden, layers):
    """g(z, t): [batch, dim + 1] -> [batch, dim], softplus hidden layers."""
    widths = [dim + 1] + [hidden] * layers
    parts = []
    for a, b in zip(widths[:-1], widths[1:]):
        parts += [nn.Linear(a, b), nn.Softplus()]
    return nn.Sequential(*parts, nn.Linear(widths[-1], dim))


class CNFDynamics(nn.Module):
    """d[z, dlogp]/dt = [g(t, z), -tr(dg/dz)] with g an MLP of (z, t)."""

    def __init__(self, dim, hidden, layers, trace="exact"):
        super().__init__()
        self.net = mlp(dim, hidden, layers)
        self.dim = dim
        self.trace = trace
        self.noise = None            # Hutchinson's e for the current solve, [local batch, dim]

    def forward(self, t, state):
        z = state[..., :self.dim]
        track = torch.is_grad_enabled()      # the adjoint's vjp differentiates through the trace
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.net(torch.cat([z, t.expand(z.shape[0], 1).to(z.dtype)], dim=1))
            div = self.divergence(dz, z, create_graph=track)
        if not track:
            dz, div = dz.detach(), div.detach()
        return torch.cat([dz, -div[:, None]], dim=1)

    def divergence(self, dz, z, create_graph):
        """tr(dg/dz) per sample: exact, or Hutchinson's e^T (dg/dz) e."""
        if self.trace == "exact":
            return sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph,
                                           retain_graph=True)[0][:, i]
                       for i in range(self.dim))
        e = self.noise
        if e is None or e.shape != z.shape:
            raise RuntimeError("Hutchinson's trace needs its noise: call set_noise(batch) first")
        return (torch.autograd.grad((dz * e).sum(), z, create_graph=create_graph)[0] * e).sum(1)

    def set_noise(self, batch, dtype):
        """Draw one Rademacher vector per sample for the next solve (torch's global RNG)."""
        self.noise = torch.randint(0, 2, (batch, self.dim)).to(dtype) * 2 - 1


class CNF(nn.Module):
    """x -> (z(1), dlogp(1)) through one ODE block over t in [0, 1]."""

    def __init__(self, dim, hidden, layers, trace, ode_kwargs):
        super().__init__()
        self.dynamics = CNFDynamics(dim, hidden, layers, trace)
        self.flow = ODEBlock(self.dynamics, t=(0.0, 1.0), prefix="cnf_", **ode_kwargs)

    def log_prob(self, x):
        """log p(x) per sample (nats)."""
        out = self.flow(torch.cat([x, torch.zeros_like(x[:, :1])], dim=1))
        z, dlogp = out[:, :-1], out[:, -1]
        log_normal = -0.5 * (z ** 2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)
        return log_normal - dlogp


def parse_args(argv=None):
    p = workflow.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", choices=densities.NAMES, default="8gaussians")
    p.add_argument("--iterations", type=workflow.positive_int, default=1500)
    p.add_argument("--batch-size", type=workflow.positive_int, default=512,
                   help="global batch, split over ranks (at least one per rank)")
    p.add_argument("--lr", type=workflow.positive_float, default=5e-3)
    p.add_argument("--hidden", type=workflow.positive_int, default=64)
    p.add_argument("--layers", type=workflow.nonnegative_int, default=3,
                   help="hidden layers of the MLP")
    p.add_argument("--trace", choices=["auto", "exact", "hutchinson"], default="auto",
                   help="divergence in training: exact, Hutchinson's estimator, or auto (exact "
                        "up to 4 dimensions); evaluation always uses the exact trace")
    p.add_argument("--eval-every", type=workflow.positive_int, default=50,
                   help="iterations between evaluations")
    p.add_argument("--test-size", type=workflow.positive_int, default=2000,
                   help="held-out 2-D samples")
    g = p.add_argument_group("ODE solve (PETSc options prefix 'cnf_')")
    g.add_argument("--method", default="rk4", choices=ode_cli.APP_METHODS, metavar="METHOD",
                   help=f"one of {', '.join(ode_cli.APP_METHODS)}")
    g.add_argument("--steps", type=workflow.nonnegative_int, default=8,
                   help="fixed steps over t in [0, 1]; 0 = adaptive (the method must be adaptive)")
    g.add_argument("--rtol", type=workflow.positive_float, default=1e-5)
    g.add_argument("--atol", type=workflow.positive_float, default=1e-5)
    ode_cli.add_checkpoint_arguments(p)
    workflow.add_run_arguments(p, out="runs/cnf")
    args = workflow.parse_with_petsc_options(p, argv)
    ode_cli.check_steps(p, args.method, args.steps)
    ode_cli.check_checkpoint_arguments(p, args)
    workflow.at_least_ranks(p, args, "batch_size")
    if args.quick:
        args.iterations = min(args.iterations, 30)
        args.eval_every = min(args.eval_every, 15)
        args.test_size = min(args.test_size, 500)
        args.hidden = min(args.hidden, 32)
    return args


def ode_kwargs(args):
    kw = dict(method=args.method, checkpointing=ode_cli.checkpoint_policy(args))
    if args.steps > 0:
        kw["options"] = {"step_size": 1.0 / args.steps}
    else:
        kw.update(rtol=args.rtol, atol=args.atol)
    return kw


def test_nlls(model, x, comm, chunk=1000):
    """This rank's shard of x: each point's negative log-likelihood (nats), exact trace."""
    lo, hi = workflow.shard(len(x), comm.Get_rank(), comm.Get_size())
    mode, model.dynamics.trace = model.dynamics.trace, "exact"
    with torch.no_grad():
        nlls = [-model.log_prob(x[i:min(i + chunk, hi)]) for i in range(lo, hi, chunk)]
    model.dynamics.trace = mode
    return torch.cat(nlls) if nlls else x.new_zeros(0)


def mean_and_stderr(values, comm, n):
    """Mean and standard error over all ranks' values (n in all)."""
    total = comm.allreduce(float(values.sum()))
    squares = comm.allreduce(float((values ** 2).sum()))
    mean = total / n
    return mean, math.sqrt(max(squares / n - mean ** 2, 0.0) / n)


def test_nll(model, x, comm):
    """Mean negative log-likelihood (nats) of x with the exact trace; each rank its shard."""
    return mean_and_stderr(test_nlls(model, x, comm), comm, len(x))[0]


def plot_density(model, data, path, comm, n=70, extent=4.0):
    """Learned density on an n x n grid (shards over ranks) next to a histogram of the data."""
    axis = torch.linspace(-extent, extent, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    lo, hi = workflow.shard(len(grid), comm.Get_rank(), comm.Get_size())
    mode, model.dynamics.trace = model.dynamics.trace, "exact"
    with torch.no_grad():
        logp = model.log_prob(grid[lo:hi])
    model.dynamics.trace = mode
    parts = comm.gather(logp, root=0)
    if comm.Get_rank() != 0:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    density = torch.cat(parts).exp().reshape(n, n)
    fig, (ax_data, ax_model) = plt.subplots(1, 2, figsize=(8, 4))
    ax_data.hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=n,
                   range=[[-extent, extent]] * 2, cmap="viridis")
    ax_data.set_title("data")
    ax_model.imshow(density.numpy(), origin="lower", extent=[-extent, extent] * 2,
                    cmap="viridis")
    ax_model.set_title("learned density")
    for ax in (ax_data, ax_model):
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def held_out_report(model, name, test, comm):
    """The held-out NLL with its standard error; for a 2-D density with a closed form also its
    NLL on the same points, the paired gap (an estimate of KL(data || flow), with far less noise
    than either NLL) and the density's entropy (the best NLL any model can reach) by Monte
    Carlo."""
    nlls = test_nlls(model, test, comm)
    nll, stderr = mean_and_stderr(nlls, comm, len(test))
    report = {"test_nll_nats": nll, "test_nll_stderr": stderr}
    lo, hi = workflow.shard(len(test), comm.Get_rank(), comm.Get_size())
    logp = densities.true_log_density(name, test[lo:hi]) if name in densities.TOY else None
    if logp is not None:
        gap, gap_stderr = mean_and_stderr(nlls + logp, comm, len(test))
        entropy, entropy_stderr = densities.true_entropy(name)
        report.update(true_nll_nats=nll - gap, nll_gap_nats=gap, nll_gap_stderr=gap_stderr,
                      true_entropy_nats=entropy, true_entropy_stderr=entropy_stderr)
    return report


class Sampler:
    """This rank's share of each global batch: fresh samples of a 2-D density, or rows of the
    training table drawn with replacement (both from torch's global RNG, saved with the state)."""

    def __init__(self, args, train):
        self.name, self.train = args.data, train

    def __call__(self, n):
        if self.train is None:
            return densities.sample_toy(self.name, n)
        return self.train[torch.randint(0, len(self.train), (n,))]


@workflow.reports_run_errors
def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    workflow.set_threads(comm)
    if args.data in densities.TOY:
        train = None
        test = densities.sample_toy(args.data, args.test_size,
                                    torch.Generator().manual_seed(args.seed + 10_000))
    else:
        train, test = densities.load_tabular(args.data, args.seed)
    dim = test.shape[1]
    trace = args.trace if args.trace != "auto" else ("exact" if dim <= 4 else "hutchinson")
    torch.manual_seed(args.seed)
    try:
        model = CNF(dim, args.hidden, args.layers, trace, ode_kwargs(args)).double()
    except pnode_dist.InputError as exc:
        return workflow.fail(comm, exc)
    broadcast_parameters(model)
    torch.manual_seed(args.seed * 7919 + rank + 1)     # each rank draws its own data and noise
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.iterations)
    run = workflow.TrainingSession(args, comm, model, opt, sched)
    run.say(f"pnode_dist {pnode_dist.__version__}: CNF on {args.data} (dim {dim}), trace {trace}, "
            f"{size} ranks, batch {args.batch_size}, {args.method} "
            f"{args.steps or 'adaptive'} steps")

    def loop(resumed):
        start, history, window = 1, [], []   # window: training losses since the last evaluation
        if resumed is not None:
            start = resumed["iteration"] + 1
            history, window = resumed["progress"]["history"], resumed["progress"]["window"]
        sample = Sampler(args, train)
        lo, hi = workflow.shard(args.batch_size, rank, size)
        t_start, t_eval = time.perf_counter(), time.perf_counter()
        for it in run.bar(range(start, args.iterations + 1), "training",
                          total=args.iterations - start + 1):
            x = sample(hi - lo)
            if trace == "hutchinson":
                model.dynamics.set_noise(hi - lo, x.dtype)
            opt.zero_grad()
            loss = -model.log_prob(x).sum() / args.batch_size
            loss.backward()         # the ODE block sums the parameter gradients over ranks
            opt.step()
            sched.step()
            window.append(comm.allreduce(loss.item()))
            if it % args.eval_every == 0 or it == args.iterations:
                nll = test_nll(model, test, comm)
                elapsed = time.perf_counter() - t_eval
                history.append({"iteration": it, "train_nll": sum(window) / len(window),
                                "test_nll": nll, "seconds": elapsed,
                                "steps": model.flow.stats.get("steps")})
                run.say(f"iteration {it:5d}  train nll {history[-1]['train_nll']:.4f}  "
                        f"test nll {nll:.4f} nats  ({elapsed:.1f}s)")
                if args.verbose:
                    run.say(f"          ODE: {ode_cli.format_stats(model.flow.stats)}")
                run.plot(history, [("negative log-likelihood (nats)",
                                    ["train_nll", "test_nll"], False)], x="iteration")
                t_eval, window = time.perf_counter(), []
            run.after_iteration(it, 1, {"history": history, "window": window})
        return history, window, t_start

    status, result = run.train(loop)
    if status:
        return status
    history, window, t_start = result
    if dim == 2:
        plot_density(model, test, run.out / "density.png", comm)
    report = held_out_report(model, args.data, test, comm)
    nll = report["test_nll_nats"]
    report.update(data=args.data, dim=dim, trace=trace, ranks=size, history=history,
                  test_bits_per_dim=nll / (dim * math.log(2)))
    metrics, path = run.finish(args.iterations, 1, {"history": history, "window": window},
                               report, started=t_start)
    run.say(f"held-out NLL {nll:.4f} +- {report['test_nll_stderr']:.4f} nats "
            f"({metrics['test_bits_per_dim']:.4f} bits/dim) in {metrics['total_seconds']:.1f}s; "
            f"metrics in {path}")
    if "true_nll_nats" in report:
        run.say(f"the true density: NLL {report['true_nll_nats']:.4f} nats on the same points "
                f"(gap {report['nll_gap_nats']:.4f} +- {report['nll_gap_stderr']:.4f}, an "
                f"estimate of KL(data || flow)); its entropy {report['true_entropy_nats']:.4f} "
                f"+- {report['true_entropy_stderr']:.4f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
