"""Continuous normalizing flow (FFJORD style) trained data-parallel with pnode_dist.

The ODE carries the sample and its log-density change, d[z, dlogp]/dt = [g(t, z), -tr(dg/dz)],
from the data (t = 0) to a standard normal (t = 1): log p(x) = log N(z(1)) - dlogp(1). The trace
is exact (one backward pass per dimension; the default up to 4 dimensions) or Hutchinson's
estimate e^T (dg/dz) e with one Rademacher e per sample held fixed over the solve. Gradients are
PETSc's discrete adjoint, which differentiates through the trace (second derivatives of g).
g is an MLP of (z, t), plus optionally (--elementwise K) a small network of (z_i, t) per
coordinate. RNODE's regularisers ('How to train your neural ODE'), the kinetic energy
int |g|^2 dt and the Jacobian's Frobenius norm int |dg/dz|_F^2 dt, ride along as two more ODE
components when --kinetic-weight or --jacobian-weight is positive (default 0: off).

    mpiexec -n 2 .venv/bin/python apps/cnf.py --data 8gaussians          # about four minutes
    mpiexec -n 2 .venv/bin/python apps/cnf.py --data breast-cancer        # 30-D table
    mpiexec -n 2 .venv/bin/python apps/cnf.py --data digits               # 64-D images, bits/dim
    .venv/bin/python apps/cnf.py --quick                                    # smoke test

Data (apps/densities.py): 2-D densities 8gaussians, checkerboard, moons, pinwheel;
breast-cancer, scikit-learn's bundled 30-D real-valued table standing in for FFJORD's tables
(which need downloads); and digits, scikit-learn's 8x8 handwritten digits as 64-D images with 17
grey levels, treated as FFJORD and RealNVP treat images: dequantised with fresh uniform noise
on every draw, y = (x + u) / 17, logit-transformed (--alpha) and whitened by the
full-covariance Gaussian fitted by maximum likelihood on the training split (--preprocess),
every Jacobian accounted for. Each rank draws its own share of every batch. Reports the
negative log-likelihood of held-out data in nats per sample (and bits per dimension), with the
exact trace; for digits the held-out bound on the discrete images' NLL in bits/dim (averaged
over --test-draws fixed dequantisations per image), next to the full-covariance Gaussian's on
the same points and their paired difference, each with its standard error over images; digits
change some defaults (see --help). Outputs in OUT: metrics.json, curves.png, density.png (2-D:
learned density next to the data), training states in OUT/state (--save-every K, --resume
auto); SIGTERM/SIGUSR1 save the state and exit with status 75. PETSc options of the flow use
the prefix 'cnf_'.
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
import sizing  # noqa: E402
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


class Elementwise(nn.Module):
    """h(z, t)_i = sum_k c_ik tanh(a_ik z_i + s_ik t + b_ik) + d_i: a separate one-hidden-layer
    network of (z_i, t) per coordinate (a diagonal Jacobian), so that the flow can bend each
    coordinate's marginal without having to find that in the dense MLP."""

    def __init__(self, dim, units):
        super().__init__()
        self.a = nn.Parameter(torch.randn(dim, units))
        self.s = nn.Parameter(torch.randn(dim, units))
        self.b = nn.Parameter(torch.randn(dim, units))
        self.c = nn.Parameter(torch.randn(dim, units) / math.sqrt(units))
        self.d = nn.Parameter(torch.zeros(dim))

    def forward(self, z, t):
        hidden = torch.tanh(z[..., None] * self.a + t * self.s + self.b)
        return (hidden * self.c).sum(-1) + self.d


class CNFDynamics(nn.Module):
    """d[z, dlogp]/dt = [g(t, z), -tr(dg/dz)] with g an MLP of (z, t). With regularise, two more
    components integrate RNODE's kinetic energy |g|^2 and Jacobian Frobenius norm |dg/dz|_F^2
    (exact, or Hutchinson's unbiased |e^T dg/dz|^2 from the same vector-Jacobian product)."""

    def __init__(self, dim, hidden, layers, trace="exact", regularise=False, elementwise=0):
        super().__init__()
        self.net = mlp(dim, hidden, layers)
        self.elementwise = Elementwise(dim, elementwise) if elementwise else None
        self.dim = dim
        self.trace = trace
        self.regularise = regularise
        self.noise = None            # Hutchinson's e for the current solve, [local batch, dim]

    def forward(self, t, state):
        z = state[..., :self.dim]
        track = torch.is_grad_enabled()      # the adjoint's vjp differentiates through the trace
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.net(torch.cat([z, t.expand(z.shape[0], 1).to(z.dtype)], dim=1))
            if self.elementwise is not None:
                dz = dz + self.elementwise(z, t.to(z.dtype))
            if self.regularise:
                div, frobenius = self.divergence_and_frobenius(dz, z, create_graph=track)
                extra = [(dz ** 2).sum(1, keepdim=True), frobenius[:, None]]
            else:
                div, extra = self.divergence(dz, z, create_graph=track), []
        if not track:
            dz, div, extra = dz.detach(), div.detach(), [e.detach() for e in extra]
        return torch.cat([dz, -div[:, None]] + extra, dim=1)

    def divergence(self, dz, z, create_graph):
        """tr(dg/dz) per sample: exact, or Hutchinson's e^T (dg/dz) e."""
        if self.trace == "exact":
            if self.dim > 4 and not create_graph:
                return self.jacobian_rows(dz, z).diagonal(dim1=0, dim2=2).sum(-1)
            return sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph,
                                           retain_graph=True)[0][:, i]
                       for i in range(self.dim))
        e = self.noise
        if e is None or e.shape != z.shape:
            raise RuntimeError("Hutchinson's trace needs its noise: call set_noise(batch) first")
        return (torch.autograd.grad((dz * e).sum(), z, create_graph=create_graph)[0] * e).sum(1)

    def jacobian_rows(self, dz, z, create_graph=False):
        """dg/dz as [dim (row i), batch, dim]: all rows in one batched backward pass."""
        eye = torch.eye(self.dim, dtype=dz.dtype)[:, None, :].expand(-1, dz.shape[0], -1)
        return torch.autograd.grad(dz, z, eye, create_graph=create_graph,
                                   is_grads_batched=True)[0]

    def divergence_and_frobenius(self, dz, z, create_graph):
        """(tr(dg/dz), |dg/dz|_F^2) per sample, exact or both by Hutchinson's e."""
        if self.trace == "exact":
            rows = self.jacobian_rows(dz, z, create_graph)
            return rows.diagonal(dim1=0, dim2=2).sum(-1), (rows ** 2).sum((0, 2))
        e = self.noise
        if e is None or e.shape != z.shape:
            raise RuntimeError("Hutchinson's trace needs its noise: call set_noise(batch) first")
        ej = torch.autograd.grad((dz * e).sum(), z, create_graph=create_graph)[0]
        return (ej * e).sum(1), (ej ** 2).sum(1)

    def set_noise(self, batch, dtype):
        """Draw one Rademacher vector per sample for the next solve (torch's global RNG)."""
        self.noise = torch.randint(0, 2, (batch, self.dim)).to(dtype) * 2 - 1


class CNF(nn.Module):
    """x -> (z(1), dlogp(1)) through one ODE block over t in [0, 1]. zero_init: the last layers
    (the MLP's and the elementwise network's) start at zero, so the untrained flow is the
    identity."""

    def __init__(self, dim, hidden, layers, trace, ode_kwargs, regularise=False,
                 zero_init=False, elementwise=0):
        super().__init__()
        self.dim = dim
        self.dynamics = CNFDynamics(dim, hidden, layers, trace, regularise, elementwise)
        if zero_init:
            nn.init.zeros_(self.dynamics.net[-1].weight)
            nn.init.zeros_(self.dynamics.net[-1].bias)
            if elementwise:
                nn.init.zeros_(self.dynamics.elementwise.c)
        self.flow = ODEBlock(self.dynamics, t=(0.0, 1.0), prefix="cnf_", **ode_kwargs)

    def terms(self, x):
        """(log p(x) per sample in nats, [batch, 2] of the kinetic energy and Frobenius
        integrals, or [batch, 0] without regularisation)."""
        extra = 3 if self.dynamics.regularise else 1
        out = self.flow(torch.cat([x, x.new_zeros(x.shape[0], extra)], dim=1))
        z, dlogp = out[:, :self.dim], out[:, self.dim]
        log_normal = -0.5 * (z ** 2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)
        return log_normal - dlogp, out[:, self.dim + 1:]

    def log_prob(self, x):
        """log p(x) per sample (nats)."""
        return self.terms(x)[0]


# Defaults that differ by data set (the 2-D and tabular ones first); an option given on the
# command line always wins.
DEFAULTS = {"iterations": 1500, "batch_size": 512, "lr": 5e-3, "hidden": 64, "eval_every": 50,
            "elementwise": 0}
IMAGE_DEFAULTS = {"iterations": 400, "batch_size": 256, "lr": 5e-3, "hidden": 128,
                  "eval_every": 100, "elementwise": 16}


def _logit_alpha(text):
    value = workflow.positive_float(text)
    if value >= 0.5:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 0.5); got {text!r}")
    return value


def parse_args(argv=None):
    p = workflow.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", choices=densities.NAMES, default="8gaussians")
    p.add_argument("--iterations", type=workflow.positive_int, default=None,
                   help=f"default {DEFAULTS['iterations']} (digits {IMAGE_DEFAULTS['iterations']})")
    p.add_argument("--batch-size", type=workflow.positive_int, default=None,
                   help=f"global batch, split over ranks (at least one per rank); default "
                        f"{DEFAULTS['batch_size']} (digits {IMAGE_DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=workflow.positive_float, default=None,
                   help=f"default {DEFAULTS['lr']} (digits {IMAGE_DEFAULTS['lr']})")
    p.add_argument("--hidden", type=workflow.positive_int, default=None,
                   help=f"default {DEFAULTS['hidden']} (digits {IMAGE_DEFAULTS['hidden']})")
    p.add_argument("--layers", type=workflow.nonnegative_int, default=3,
                   help="hidden layers of the MLP")
    p.add_argument("--elementwise", type=workflow.nonnegative_int, default=None,
                   help="hidden units of a per-coordinate network of (z_i, t) added to the MLP "
                        f"(0: none); default {DEFAULTS['elementwise']} (digits "
                        f"{IMAGE_DEFAULTS['elementwise']})")
    p.add_argument("--trace", choices=["auto", "exact", "hutchinson"], default="auto",
                   help="divergence in training: exact, Hutchinson's estimator, or auto (exact "
                        "up to 4 dimensions); evaluation always uses the exact trace")
    p.add_argument("--kinetic-weight", type=workflow.nonnegative_float, default=0.0,
                   help="RNODE regularisation: weight of the kinetic energy int |g|^2 dt")
    p.add_argument("--jacobian-weight", type=workflow.nonnegative_float, default=0.0,
                   help="RNODE regularisation: weight of int |dg/dz|_F^2 dt (exact with the "
                        "exact trace, else Hutchinson's estimate with the trace's noise)")
    p.add_argument("--eval-every", type=workflow.positive_int, default=None,
                   help=f"iterations between evaluations; default {DEFAULTS['eval_every']} "
                        f"(digits {IMAGE_DEFAULTS['eval_every']})")
    p.add_argument("--test-size", type=workflow.positive_int, default=2000,
                   help="held-out 2-D samples")
    g = p.add_argument_group("images (digits)")
    g.add_argument("--alpha", type=_logit_alpha, default=0.05,
                   help="logit transform z = logit(alpha + (1 - 2 alpha) y)")
    g.add_argument("--preprocess", choices=["whiten", "standardise"], default="whiten",
                   help="affine map of z fitted on the training split: whitening by the "
                        "Gaussian baseline (the untrained flow is that Gaussian), or per-pixel "
                        "standardisation")
    g.add_argument("--test-draws", type=workflow.positive_int, default=4,
                   help="dequantisations of each held-out image (fixed noise)")
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
    for name, value in {**DEFAULTS, **(IMAGE_DEFAULTS if args.data in densities.IMAGES
                                       else {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    ode_cli.check_steps(p, args.method, args.steps)
    ode_cli.check_checkpoint_arguments(p, args)
    workflow.at_least_ranks(p, args, "batch_size")
    if args.quick:
        args.iterations = min(args.iterations, 30)
        args.eval_every = min(args.eval_every, 15)
        args.test_size = min(args.test_size, 500)
        args.hidden = min(args.hidden, 32)
        args.test_draws = min(args.test_draws, 2)
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


def image_bits(model, data, y, comm, chunk=1000):
    """This rank's shard of the held-out images y [M, draws, D] (dequantised): each image's
    bits/dim bound averaged over its draws, for the flow (exact trace) and for the Gaussian
    baseline. Returns (flow [m], gaussian [m])."""
    lo, hi = workflow.shard(len(y), comm.Get_rank(), comm.Get_size())
    draws = y.shape[1]
    v, logdet = data.flow_input(y[lo:hi].reshape(-1, data.dim))
    mode, model.dynamics.trace = model.dynamics.trace, "exact"
    with torch.no_grad():
        logp = [model.log_prob(v[i:i + chunk]) for i in range(0, len(v), chunk)]
    model.dynamics.trace = mode
    logp = torch.cat(logp) if logp else v.new_zeros(0)
    flow = data.bits_per_dim(logp + logdet).reshape(hi - lo, draws).mean(1)
    return flow, data.bits_per_dim(data.gaussian_log_prob(y[lo:hi])).mean(1)


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
    workflow.save_figure(fig, path)


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


def memory_needs(args, rank, size, dim, regularise, held):
    """What a rank holds at once (sizing.Need lists, lower bounds) while training: the
    batch's ODE states, its samples and the flow's input, f's hidden activations, the
    parameters with Adam's state, the held-out data; and before, while the held-out data is
    made (`held`: its numbers, copies alive then, option; None: already made)."""
    lo, hi = workflow.shard(args.batch_size, rank, size)
    batch, width = hi - lo, dim + (3 if regularise else 1)
    option = f"--batch-size {args.batch_size}"
    sizes = f"--hidden {args.hidden} --layers {args.layers}" + (
        f" --elementwise {args.elementwise}" if args.elementwise else "")
    params = sizing.parameter_bytes(lambda: CNFDynamics(
        dim, args.hidden, args.layers, regularise=regularise,
        elementwise=args.elementwise).double())
    activations = batch * (args.hidden * args.layers + dim * args.elementwise)
    needs = [sizing.ode_states_need(args.method, batch * width, option, "batch's ODE state"),
             sizing.Need(f"the batch's samples and flow input ({batch} x {dim + width} "
                         "float64)", 8 * batch * (dim + width), option, split=True),
             sizing.Need(f"f's hidden activations ({batch} x {activations // batch} float64, "
                         f"{sizes})", 8 * activations, option, split=True),
             sizing.parameters_need(params, sizes)]
    if held is None:
        return [needs]
    numbers, copies, option = held
    making = [sizing.Need(f"the held-out data as it is made ({numbers} float64 x {copies}, on "
                          "every rank)", 8 * numbers * copies, option)]
    return [needs + [sizing.Need(f"the held-out data ({numbers} float64, on every rank)",
                                 8 * numbers, option)], making]


class Sampler:
    """This rank's share of each global batch: fresh samples of a 2-D density, rows of the
    training table drawn with replacement, or training images drawn with replacement and freshly
    dequantised (all from torch's global RNG, saved with the state). Returns (x, offset): offset
    is None, or per sample what turns the flow's -log p(x) into the discrete images' bound in
    nats (-log|dv/dy| + D log levels)."""

    def __init__(self, args, train):
        self.name, self.train = args.data, train

    def __call__(self, n):
        if self.train is None:
            return densities.sample_toy(self.name, n), None
        if isinstance(self.train, densities.DequantizedImages):
            v, logdet = self.train.sample(n)
            return v, self.train.nll_nats(logdet)
        return self.train[torch.randint(0, len(self.train), (n,))], None


@workflow.reports_run_errors
def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    workflow.set_threads(comm)
    images = args.data in densities.IMAGES
    # The held-out data yet to be made: its numbers, the copies alive while it is made (the
    # result and the tensors it is computed from), the option that sizes it.
    held = None
    if args.data in densities.TOY:
        train, dim = None, 2
        held = (args.test_size * dim, 2, f"--test-size {args.test_size}")
    elif images:
        train = densities.DequantizedImages(args.data, args.seed, args.alpha,
                                            whiten=args.preprocess == "whiten")
        dim = train.dim
        held = (len(train.test) * args.test_draws * dim, 4, f"--test-draws {args.test_draws}")
    else:
        train, test = densities.load_tabular(args.data, args.seed)
        dim = test.shape[-1]
    trace = args.trace if args.trace != "auto" else ("exact" if dim <= 4 else "hutchinson")
    regularise = args.kinetic_weight > 0 or args.jacobian_weight > 0
    # Refused before the held-out data, the model or a batch is allocated if it cannot fit.
    sizing.check_memory(comm, *memory_needs(args, rank, size, dim, regularise, held))
    if args.data in densities.TOY:
        test = densities.sample_toy(args.data, args.test_size,
                                    torch.Generator().manual_seed(args.seed + 10_000))
    elif images:
        test = train.held_out(args.test_draws, args.seed + 30_000)      # [M, draws, D]
        lo, hi = workflow.shard(len(test), rank, size)
        gaussian_bits = train.bits_per_dim(train.gaussian_log_prob(test[lo:hi])).mean(1)
    torch.manual_seed(args.seed)
    try:
        model = CNF(dim, args.hidden, args.layers, trace, ode_kwargs(args), regularise,
                    zero_init=images, elementwise=args.elementwise).double()
    except pnode_dist.InputError as exc:
        return workflow.fail(comm, exc)
    broadcast_parameters(model)
    torch.manual_seed(args.seed * 7919 + rank + 1)     # each rank draws its own data and noise
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.iterations)
    run = workflow.TrainingSession(args, comm, model, opt, sched)
    run.say(f"pnode_dist {pnode_dist.__version__}: CNF on {args.data} (dim {dim}), trace {trace}, "
            f"{size} ranks, batch {args.batch_size}, {args.method} "
            f"{args.steps or 'adaptive'} steps"
            + (f", kinetic weight {args.kinetic_weight}, Jacobian weight "
               f"{args.jacobian_weight}" if regularise else ""))
    if images:
        run.say(f"{args.data}: {len(train.train)} training images, {len(test)} held out x "
                f"{args.test_draws} dequantisations; logit alpha {args.alpha}, {args.preprocess}")
    last = {}                    # images: the latest evaluation's per-image bits on this rank

    def evaluate(it):
        """Held-out NLL in nats (images: the discrete bound per image), exact trace."""
        if not images:
            return test_nll(model, test, comm)
        last["iteration"], last["bits"] = it, image_bits(model, train, test, comm)[0]
        bits = mean_and_stderr(last["bits"], comm, len(test))[0]
        return bits * dim * math.log(2)

    def loop(resumed):
        start, history, window = 1, [], []   # window: training losses since the last evaluation
        initial = None                       # images: the untrained flow's held-out NLL
        if resumed is not None:
            start = resumed["iteration"] + 1
            history, window = resumed["progress"]["history"], resumed["progress"]["window"]
            initial = resumed["progress"].get("initial")
        elif images:
            initial = evaluate(0)
            run.say(f"iteration     0  test {initial / (dim * math.log(2)):.4f} bits/dim "
                    f"(the untrained flow)")
        sample = Sampler(args, train)
        lo, hi = workflow.shard(args.batch_size, rank, size)
        t_start, t_eval = time.perf_counter(), time.perf_counter()
        regs = []                   # the regularisers' batch means since the last evaluation

        def progress():
            return {"history": history, "window": window,
                    **({} if initial is None else {"initial": initial})}
        for it in run.bar(range(start, args.iterations + 1), "training",
                          total=args.iterations - start + 1):
            x, offset = sample(hi - lo)
            if trace == "hutchinson":
                model.dynamics.set_noise(hi - lo, x.dtype)
            opt.zero_grad()
            logp, reg = model.terms(x)
            nll = -logp if offset is None else offset - logp
            loss = nll.sum() / args.batch_size
            if regularise:
                penalty = (args.kinetic_weight * reg[:, 0]
                           + args.jacobian_weight * reg[:, 1]).sum() / args.batch_size
                regs.append([comm.allreduce(float(r)) / args.batch_size
                             for r in reg.detach().sum(0)])
                (loss + penalty).backward()
            else:
                loss.backward()     # the ODE block sums the parameter gradients over ranks
            opt.step()
            sched.step()
            window.append(comm.allreduce(loss.item()))
            if it % args.eval_every == 0 or it == args.iterations:
                nll = evaluate(it)
                elapsed = time.perf_counter() - t_eval
                history.append({"iteration": it, "train_nll": sum(window) / len(window),
                                "test_nll": nll, "seconds": elapsed,
                                "steps": model.flow.stats.get("steps")})
                if images:
                    history[-1].update({f"{k}_bits_per_dim": history[-1][f"{k}_nll"] / (
                        dim * math.log(2)) for k in ("train", "test")})
                if regs:
                    history[-1].update(kinetic=sum(r[0] for r in regs) / len(regs),
                                       jacobian=sum(r[1] for r in regs) / len(regs))
                units = (f"train {history[-1]['train_bits_per_dim']:.4f}  test "
                         f"{history[-1]['test_bits_per_dim']:.4f} bits/dim" if images else
                         f"train nll {history[-1]['train_nll']:.4f}  test nll {nll:.4f} nats")
                run.say(f"iteration {it:5d}  {units}  ({elapsed:.1f}s)")
                if args.verbose:
                    run.say(f"          ODE: {ode_cli.format_stats(model.flow.stats)}")
                if images:
                    run.plot(history, [("bits/dim (discrete bound)",
                                        ["train_bits_per_dim", "test_bits_per_dim"], False)],
                             x="iteration")
                else:
                    run.plot(history, [("negative log-likelihood (nats)",
                                        ["train_nll", "test_nll"], False)], x="iteration")
                t_eval, window, regs = time.perf_counter(), [], []
            run.after_iteration(it, 1, progress())
        return history, progress(), t_start

    status, result = run.train(loop)
    if status:
        return status
    history, progress, t_start = result
    if dim == 2:
        plot_density(model, test, run.out / "density.png", comm)
    if images:
        report = image_report(model, train, test, gaussian_bits, last, args, comm)
        report["initial_held_out_bits_per_dim"] = progress["initial"] / (dim * math.log(2))
    else:
        report = held_out_report(model, args.data, test, comm)
    nll = report["test_nll_nats"]
    report.update(data=args.data, dim=dim, trace=trace, ranks=size, history=history,
                  test_bits_per_dim=nll / (dim * math.log(2)))
    metrics, path = run.finish(args.iterations, 1, progress, report, started=t_start)
    if images:
        run.say(f"held-out {metrics['held_out_bits_per_dim']:.4f} +- "
                f"{metrics['held_out_bits_per_dim_stderr']:.4f} bits/dim ({len(test)} images x "
                f"{args.test_draws} dequantisations, exact trace); the full-covariance Gaussian "
                f"{metrics['gaussian_held_out_bits_per_dim']:.4f} +- "
                f"{metrics['gaussian_held_out_bits_per_dim_stderr']:.4f}; flow - Gaussian "
                f"{metrics['flow_minus_gaussian_bits_per_dim']:.4f} +- "
                f"{metrics['flow_minus_gaussian_stderr']:.4f} bits/dim (paired); "
                f"{metrics['total_seconds']:.1f}s; metrics in {path}")
        return 0
    run.say(f"held-out NLL {nll:.4f} +- {report['test_nll_stderr']:.4f} nats "
            f"({metrics['test_bits_per_dim']:.4f} bits/dim) in {metrics['total_seconds']:.1f}s; "
            f"metrics in {path}")
    if "true_nll_nats" in report:
        run.say(f"the true density: NLL {report['true_nll_nats']:.4f} nats on the same points "
                f"(gap {report['nll_gap_nats']:.4f} +- {report['nll_gap_stderr']:.4f}, an "
                f"estimate of KL(data || flow)); its entropy {report['true_entropy_nats']:.4f} "
                f"+- {report['true_entropy_stderr']:.4f} nats")
    return 0


def image_report(model, data, test, gaussian_bits, last, args, comm):
    """The held-out bits/dim bound of the flow (exact trace; the last evaluation's when it was
    at the final iteration) and of the Gaussian baseline on the same dequantised points, each
    with its standard error over images, and their paired difference."""
    if last.get("iteration") == args.iterations:
        flow = last["bits"]
    else:
        flow = image_bits(model, data, test, comm)[0]
    n = len(test)
    bits, stderr = mean_and_stderr(flow, comm, n)
    gauss, gauss_stderr = mean_and_stderr(gaussian_bits, comm, n)
    diff, diff_stderr = mean_and_stderr(flow - gaussian_bits, comm, n)
    nats = data.dim * math.log(2)
    return {"held_out_bits_per_dim": bits, "held_out_bits_per_dim_stderr": stderr,
            "gaussian_held_out_bits_per_dim": gauss,
            "gaussian_held_out_bits_per_dim_stderr": gauss_stderr,
            "flow_minus_gaussian_bits_per_dim": diff, "flow_minus_gaussian_stderr": diff_stderr,
            "test_nll_nats": bits * nats, "test_nll_stderr": stderr * nats,
            "held_out_images": n, "test_draws": args.test_draws, "eval_trace": "exact",
            "alpha": args.alpha, "preprocess": args.preprocess,
            "training_images": len(data.train)}


if __name__ == "__main__":
    sys.exit(main())
