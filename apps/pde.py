"""Learn a 2-D reaction-diffusion PDE with a convolutional neural ODE on a grid split over ranks.

The system is the lambda-omega reaction-diffusion model (spiral waves) on [-10, 10]^2, periodic:

    u_t = D lap(u) + (1 - A^2) u + beta A^2 v,   v_t = D lap(v) - beta A^2 u + (1 - A^2) v,
    A^2 = u^2 + v^2,  D = 0.1, beta = 1, initial spiral u + iv = tanh(r) exp(i(theta - r)).

Data: PETSc itself (rk4 through pnode_dist, 10 steps per 0.1) computes the true field at times
0, 0.5, ..., 10 on the same DMDA grid at start-up, nothing downloaded. The model is
dy/dt = stencil(y) + reaction(y), receptive-field radius 1 (the grid's halo). By default the
stencil is each channel's 5-point cross with four learned arms and centre = -(sum of the arms)
(--stencil full: all 8 neighbours; free: any 2 -> 2 channel 3x3 convolution), and the reaction
is (u + iv) g(u^2 + v^2) with g a learned complex function (--reaction mlp: any pointwise
MLP). With the default model the learned stencil recovers D/dx^2 times the Laplacian (compared
in metrics.json). Each rank holds and evaluates its patch of the field; the halo exchange's
adjoint and one reduction of the parameter gradients per backward make the gradients those of
the whole field. Training windows start at a random snapshot of the first 3/4 of the data and
predict the next --window snapshots; the loss is the squared error of the fields plus
--h1-weight times that of their cell-to-cell differences (read across patch edges with
grid.with_halo). The report is the relative L2 error of a rollout over the last quarter (held
out).

    mpiexec -n 2 .venv/bin/python apps/pde.py                # 64 x 64, about four minutes
    mpiexec -n 2 .venv/bin/python apps/pde.py --quick         # smoke test

Memory: --host-bytes is the per-rank budget for the forward states the backward needs. A field
too big for one rank's budget stops with a clear error on one rank and runs on several:
    .venv/bin/python apps/pde.py --grid 256 --host-bytes 600000 --quick           # refused
    mpiexec -n 4 .venv/bin/python apps/pde.py --grid 256 --host-bytes 600000 --quick
Outputs in OUT: metrics.json, curves.png, fields.png (true and learned u at the end), training
states in OUT/state (--save-every, --resume auto). PETSc options use the prefix 'pde_'.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ode_cli  # noqa: E402
import sizing  # noqa: E402
import workflow  # noqa: E402

import pnode_dist  # noqa: E402
from pnode_dist import Grid, broadcast_parameters, odeint  # noqa: E402
from pnode_dist.checkpointing import StepCost  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

EXTENT, DIFFUSION, BETA = 10.0, 0.1, 1.0
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
                         dtype=torch.float64)


class LambdaOmega(nn.Module):
    """The true right-hand side on a periodic field [2, n, n] with spacing dx."""

    def __init__(self, dx):
        super().__init__()
        kernel = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
        kernel[:, 0] = LAPLACIAN * DIFFUSION / dx ** 2
        self.register_buffer("kernel", kernel)

    def forward(self, t, y):
        diffusion = nn.functional.conv2d(nn.functional.pad(y[None], (1, 1, 1, 1), mode="circular"),
                                         self.kernel, groups=2)[0]
        u, v = y[0], y[1]
        a2 = u * u + v * v
        reaction = torch.stack([(1 - a2) * u + BETA * a2 * v, -BETA * a2 * u + (1 - a2) * v])
        return diffusion + reaction


class Stencil(nn.Module):
    """The diffusion part: a 3x3 circular convolution of the field [2, h, w]. 'cross': each
    channel its own 5-point stencil, four learned arms, centre = -(sum of the arms) (a
    conservative stencil, so a constant field does not diffuse); 'full': the same with all
    eight neighbours learned; 'free': an unconstrained 2 -> 2 channel 3x3 convolution."""

    ARMS = {"cross": [(0, 1), (2, 1), (1, 0), (1, 2)],
            "full": [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)]}

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "free":
            self.free = nn.Parameter(0.1 * torch.randn(2, 2, 3, 3, dtype=torch.float64))
        else:
            self.arms = nn.Parameter(torch.zeros(2, len(self.ARMS[kind]), dtype=torch.float64))
            mask = torch.zeros(len(self.ARMS[kind]), 3, 3, dtype=torch.float64)
            for k, (i, j) in enumerate(self.ARMS[kind]):
                mask[k, i, j], mask[k, 1, 1] = 1.0, -1.0
            self.register_buffer("mask", mask)

    def kernel(self):
        """[2, 2, 3, 3] ('free') or [2, 1, 3, 3] (one stencil per channel)."""
        if self.kind == "free":
            return self.free
        return torch.einsum("ck,kij->cij", self.arms, self.mask)[:, None]

    def forward(self, y):
        w = self.kernel()
        padded = nn.functional.pad(y[None], (1, 1, 1, 1), mode="circular")
        return nn.functional.conv2d(padded, w, groups=2 if w.shape[1] == 1 else 1)[0]


class Reaction(nn.Module):
    """The pointwise part. 'equivariant': (u + iv) g(u^2 + v^2) with g complex, a linear
    function of A^2 (starting at 0) plus an MLP of A^2: the form every reaction that commutes
    with rotations of (u, v) has. 'mlp': a free pointwise MLP 2 -> hidden -> 2."""

    def __init__(self, kind, hidden):
        super().__init__()
        self.kind = kind
        inputs = 1 if kind == "equivariant" else 2
        self.net = nn.Sequential(nn.Conv2d(inputs, hidden, 1), nn.Tanh(),
                                 nn.Conv2d(hidden, 2, 1)).double()
        if kind == "equivariant":
            self.linear = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))

    def forward(self, y):
        if self.kind == "mlp":
            return self.net(y[None])[0]
        a2 = (y * y).sum(0)
        g = self.net(a2[None, None])[0] + self.linear[:, :1, None] + self.linear[:, 1:, None] * a2
        u, v = y[0], y[1]
        return torch.stack([g[0] * u - g[1] * v, g[0] * v + g[1] * u])


class LearnedRD(nn.Module):
    """dy/dt = stencil(y) + reaction(y): receptive-field radius 1, the grid's halo."""

    def __init__(self, stencil="cross", reaction="equivariant", hidden=32):
        super().__init__()
        self.stencil, self.reaction = Stencil(stencil), Reaction(reaction, hidden)

    def forward(self, t, y):
        return self.stencil(y) + self.reaction(y)


def difference_error(grid, error):
    """Sum over this rank's cells of the squared forward differences of error [T, 2, h, w]
    along both axes (periodic: every difference of the field counted once over the ranks)."""
    total = 0.0
    for e in error:
        padded = grid.with_halo(e)
        inner = padded[:, 1:-1, 1:-1]
        total = total + ((padded[:, 2:, 1:-1] - inner) ** 2).sum() \
            + ((padded[:, 1:-1, 2:] - inner) ** 2).sum()
    return total


def warmup_cosine(iterations, warmup):
    """Learning-rate factor: linear warm-up over `warmup` iterations, then cosine to 0."""
    def factor(it):
        if it < warmup:
            return (it + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, iterations - warmup)))
    return factor


def initial_spiral(n):
    x = torch.linspace(-EXTENT, EXTENT, n + 1, dtype=torch.float64)[:-1]
    yy, xx = torch.meshgrid(x, x, indexing="ij")
    r, theta = torch.sqrt(xx ** 2 + yy ** 2), torch.atan2(yy, xx)
    return torch.stack([torch.tanh(r) * torch.cos(theta - r), torch.tanh(r) * torch.sin(theta - r)])


def parse_args(argv=None):
    p = workflow.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grid", type=workflow.int_range(2), default=64,
                   help="cells per side of the square grid")
    p.add_argument("--iterations", type=workflow.positive_int, default=600)
    p.add_argument("--lr", type=workflow.positive_float, default=1e-2,
                   help="Adam's learning rate of the reaction")
    p.add_argument("--stencil-lr", type=workflow.positive_float, default=0.5,
                   help="Adam's learning rate of the stencil (its weights are D/dx^2-sized: 1.02 "
                        "on the 64^2 grid)")
    p.add_argument("--warmup", type=workflow.nonnegative_int, default=None,
                   help="iterations of linear learning-rate warm-up before the cosine decay "
                        "(default: a tenth of --iterations, at most 20)")
    p.add_argument("--stencil", choices=["cross", "full", "free"], default="cross",
                   help="cross: per-channel 5-point stencil, centre = -(sum of the arms); full: "
                        "the same with 8 neighbours; free: any 2 -> 2 channel 3x3 convolution")
    p.add_argument("--reaction", choices=["equivariant", "mlp"], default="equivariant",
                   help="equivariant: (u + iv) g(u^2 + v^2), g learned; mlp: any pointwise MLP")
    p.add_argument("--hidden", type=workflow.positive_int, default=32,
                   help="width of the reaction MLP")
    p.add_argument("--h1-weight", type=workflow.nonnegative_float, default=1.0,
                   help="weight of the squared error of the fields' cell-to-cell differences "
                        "in the loss (0: plain mean squared error)")
    p.add_argument("--window", type=workflow.positive_int, default=4,
                   help="snapshots predicted per training window")
    p.add_argument("--snapshots", type=workflow.int_range(3), default=21,
                   help="data times 0, 0.5, ... (at least --window + 2: training windows and "
                        "a held-out rollout)")
    p.add_argument("--steps-per-snapshot", type=workflow.positive_int, default=5,
                   help="rk4 steps of the model between snapshots (0.5 time units)")
    p.add_argument("--eval-every", type=workflow.positive_int, default=50)
    g = p.add_argument_group("grid and solver (PETSc options prefix 'pde_')")
    g.add_argument("--method", default="rk4", choices=ode_cli.APP_METHODS, metavar="METHOD",
                   help=f"one of {', '.join(ode_cli.APP_METHODS)}")
    g.add_argument("--proc-sizes", type=workflow.positive_int, nargs=2, default=None,
                   metavar=("PY", "PX"), help="ranks along y and x (default: the most even split)")
    ode_cli.add_checkpoint_arguments(p)
    workflow.add_run_arguments(p, out="runs/pde")
    args = workflow.parse_with_petsc_options(p, argv)
    ode_cli.check_checkpoint_arguments(p, args)
    if args.proc_sizes is not None and math.prod(args.proc_sizes) != MPI.COMM_WORLD.Get_size():
        p.error(f"--proc-sizes {args.proc_sizes[0]} {args.proc_sizes[1]} must multiply to the "
                f"{MPI.COMM_WORLD.Get_size()} ranks")
    if args.quick:
        args.iterations, args.eval_every = min(args.iterations, 20), min(args.eval_every, 10)
        args.snapshots = min(args.snapshots, 9)
    if args.snapshots < args.window + 2:
        p.error(f"--snapshots {args.snapshots}{' (--quick: at most 9)' if args.quick else ''} "
                f"must be at least --window + 2 = {args.window + 2}: the training windows and "
                "a held-out rollout need them")
    if args.warmup is None:
        args.warmup = min(20, args.iterations // 10)
    if args.warmup >= args.iterations:
        p.error(f"--warmup {args.warmup} must be below --iterations {args.iterations}")
    return args


def reference_data(grid, snapshots, dt=0.5):
    """This rank's patches of the true field at times 0, dt, ... (PETSc rk4, 10 steps per 0.1)."""
    n = grid.shape[0]
    true = LambdaOmega(2 * EXTENT / n)
    times = torch.arange(snapshots, dtype=torch.float64) * dt
    with torch.no_grad():
        return odeint(true, grid.scatter(initial_spiral(n)), times, method="rk4", grid=grid,
                      options={"step_size": 0.01}, prefix="reference_"), times


def relative_error(pred, truth, comm):
    num = comm.allreduce(float(((pred - truth) ** 2).sum()))
    den = comm.allreduce(float((truth ** 2).sum()))
    return math.sqrt(num / den)


def plot_fields(grid, truth, pred, path):
    """True and learned u at the last time, gathered on rank 0."""
    truth, pred = grid.gather(truth), grid.gather(pred)
    if truth is None:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, field, title in zip(axes, (truth, pred), ("true u", "learned u")):
        ax.imshow(field[0].numpy(), origin="lower", cmap="RdBu", vmin=-1, vmax=1)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    workflow.save_figure(fig, path)


def memory_needs(args, size):
    """What a rank holds at once (sizing.Need lists, lower bounds), before the grid exists:
    its patch is at least the smallest any split of the ranks gives. Making the initial field
    (whole on every rank), the reference solve (its snapshots and rk4's states), training (the
    data, a window's rollout, the method's states, the reaction's hidden activations, the
    parameters with Adam's state); the grid's own two vectors throughout."""
    n, solver = args.grid, sizing.SOLVER_BYTES
    # Numbers in a patch: at least the smallest patch of any split of the ranks (py x px).
    patch = 2 * min((n // py) * (n // (size // py)) for py in range(1, size + 1)
                    if size % py == 0)
    grid = f"--grid {n}"
    vectors = sizing.Need(f"the grid's vectors (2 x {patch} numbers)", 2 * solver * patch, grid,
                          split=True)
    initial = [vectors, sizing.Need(f"the initial field, whole on every rank ({2 * n * n} "
                                    "float64 x 2)", 32 * n * n, grid)]
    snapshots = sizing.Need(f"the reference snapshots ({args.snapshots} x {patch} numbers)",
                            solver * args.snapshots * patch,
                            f"{grid} --snapshots {args.snapshots}", split=True)
    reference = [vectors, snapshots,
                 sizing.ode_states_need("rk4", patch, grid, "field's ODE state")]
    params = sizing.parameter_bytes(
        lambda: LearnedRD(args.stencil, args.reaction, args.hidden).double())
    training = [vectors, snapshots,
                sizing.Need(f"a window's rollout ({args.window + 1} x {patch} numbers)",
                            solver * (args.window + 1) * patch, f"{grid} --window {args.window}",
                            split=True),
                sizing.ode_states_need(args.method, patch, grid, "field's ODE state"),
                sizing.Need(f"the reaction's hidden activations ({args.hidden} x {patch // 2} "
                            "float64)", 8 * args.hidden * (patch // 2),
                            f"{grid} --hidden {args.hidden}", split=True),
                sizing.parameters_need(params, f"--hidden {args.hidden}")]
    return [initial, reference, training]


@workflow.reports_run_errors
def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    workflow.set_threads(comm)
    # Refused before the grid and its data are allocated if the run cannot fit.
    sizing.check_memory(comm, *memory_needs(args, size))
    try:
        grid = Grid((args.grid, args.grid), channels=2, periodic=True, halo=1,
                    proc_sizes=args.proc_sizes)
        policy = ode_cli.checkpoint_policy(args)
        state_bytes = 8 * math.prod(grid.local_shape)
        # Before the reference data: does the largest patch fit the per-rank budget at all?
        if policy.host_bytes is not None or not policy.measures:
            largest = comm.allreduce(state_bytes, op=MPI.MAX)
            policy.plan(StepCost(largest, 0, 1, 0), args.window * args.steps_per_snapshot,
                        adaptive=False, on_device=False)
    except pnode_dist.InputError as exc:
        return workflow.fail(comm, f"{exc}; a {args.grid}^2 field needs more ranks for this "
                                   "budget" if "hold no checkpoint" in str(exc) else exc)
    workflow.say(comm, f"pnode_dist {pnode_dist.__version__}: lambda-omega on a {args.grid}^2 "
                       f"grid over {size} ranks (process grid {grid.proc_sizes}); this rank's "
                       f"patch {grid.local_shape}, {state_bytes} bytes per state")
    t0 = time.perf_counter()
    data, times = reference_data(grid, args.snapshots)
    workflow.say(comm, f"reference data: {args.snapshots} snapshots in "
                       f"{time.perf_counter() - t0:.1f}s")
    n_train = max(args.window + 1, (3 * args.snapshots) // 4)
    torch.manual_seed(args.seed)                 # the same windows on every rank
    model = LearnedRD(args.stencil, args.reaction, args.hidden).double()
    broadcast_parameters(model)
    opt = torch.optim.Adam([{"params": model.stencil.parameters(), "lr": args.stencil_lr},
                            {"params": model.reaction.parameters(), "lr": args.lr}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.iterations, args.warmup))
    run = workflow.TrainingSession(args, comm, model, opt, sched)
    options = {"step_size": 0.5 / args.steps_per_snapshot}
    cells = 2 * args.grid ** 2

    def rollout(first, count, **kw):
        return odeint(model, data[first], times[first:first + count + 1] - times[first],
                      method=args.method, options=options, grid=grid, prefix="pde_", **kw)[1:]

    def held_out_error():
        with torch.no_grad():
            pred = rollout(n_train - 1, args.snapshots - n_train)
        return relative_error(pred, data[n_train:], comm), pred

    def loop(resumed):
        start, history, window_losses = 1, [], []
        if resumed is not None:
            start = resumed["iteration"] + 1
            history = resumed["progress"]["history"]
            window_losses = resumed["progress"]["window"]
        t_eval = time.perf_counter()
        for it in run.bar(range(start, args.iterations + 1), "training",
                          total=args.iterations - start + 1):
            first = int(torch.randint(0, n_train - args.window, ()))
            opt.zero_grad()
            stats = {}
            pred = rollout(first, args.window, checkpointing=policy, stats=stats)
            target = data[first + 1:first + 1 + args.window]
            loss = ((pred - target) ** 2).sum()
            if args.h1_weight:
                loss = loss + args.h1_weight * difference_error(grid, pred - target)
            loss = loss / (cells * args.window)
            loss.backward()          # the grid layout sums the parameter gradients over ranks
            opt.step()
            sched.step()
            window_losses.append(comm.allreduce(loss.item()))
            if it % args.eval_every == 0 or it == args.iterations:
                err, _ = held_out_error()
                history.append({"iteration": it,
                                "train_loss": sum(window_losses) / len(window_losses),
                                "held_out_relative_error": err,
                                "seconds": time.perf_counter() - t_eval})
                run.say(f"iteration {it:5d}  train loss {history[-1]['train_loss']:.3e}  "
                        f"held-out relative error {err:.3e}  "
                        f"({history[-1]['seconds']:.1f}s)")
                if args.verbose:
                    run.say(f"          ODE: {ode_cli.format_stats(stats)}")
                run.plot(history, [("train loss", ["train_loss"], True),
                                   ("held-out relative L2 error",
                                    ["held_out_relative_error"], True)], x="iteration")
                t_eval, window_losses = time.perf_counter(), []
            run.after_iteration(it, 1, {"history": history, "window": window_losses})
        return history, window_losses

    initial_error, _ = held_out_error()          # the seeded initial model's (also on resume)
    status, result = run.train(loop)
    if status:
        return status
    history, window_losses = result
    err, pred = held_out_error()
    plot_fields(grid, data[-1], pred[-1], run.out / "fields.png")
    learned = model.stencil.kernel().detach()[0, 0]           # u's stencil acting on u
    true = LAPLACIAN * DIFFUSION / (2 * EXTENT / args.grid) ** 2
    metrics = {"grid": args.grid, "ranks": size, "process_grid": list(grid.proc_sizes),
               "local_shape": list(grid.local_shape), "state_bytes_per_rank": state_bytes,
               "initial_held_out_relative_error": initial_error,
               "held_out_relative_error": err, "history": history,
               "stencil": args.stencil, "reaction": args.reaction,
               "learned_stencil_u": learned.tolist(), "true_stencil_u": true.tolist(),
               "stencil_relative_error": float(torch.linalg.norm(learned - true)
                                               / torch.linalg.norm(true))}
    metrics, path = run.finish(args.iterations, 1, {"history": history, "window": window_losses},
                               metrics, started=t0)
    run.say(f"held-out relative L2 error {err:.3e} (untrained {initial_error:.3e}) after "
            f"{args.iterations} iterations in {metrics['total_seconds']:.1f}s; u's learned "
            f"stencil {metrics['stencil_relative_error']:.1%} from D/dx^2 times the Laplacian; "
            f"metrics in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
