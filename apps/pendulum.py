"""Learn gravity and damping of a pendulum written as a DAE (singular mass matrix), data-parallel.

State s = [x, y, u, v, lam] (position, velocity, tension per unit mass and length), length L:

    x' = u,  y' = v,  u' = -lam x - c u,  v' = -lam y - g - c v,
    0  = u^2 + v^2 - lam (x^2 + y^2) - g y - c (x u + y v)

The last row is the constraint x^2 + y^2 = L^2 differentiated twice (index 1): mass matrix
diag(1, 1, 1, 1, 0). Training data: positions (x, y) of trajectories from several initial angles
and angular velocities, from scipy's Radau at rtol 1e-11 on the equivalent angle ODE
theta'' = -(g/L) sin(theta) - c theta' (made at start-up, nothing downloaded). The model is the
same DAE with unknown g and c, solved by an implicit method through pnode_dist; every rank
trains on its share of the trajectories. The report: learned g and c against the truth, the
position error on held-out trajectories, and the drift |x^2 + y^2 - L^2| of the learned model.

cn (default) is second order and symmetric: the constraints the index reduction dropped
(x^2 + y^2 = L^2, x u + y v = 0) drift by O(h^2) without piling up (|x^2 + y^2 - L^2| a
few 1e-3 over 3 s at the default step), and g, c are recovered. beuler's O(h) errors there
accumulate: at the same step, even with the true g and c, x^2 + y^2 falls to 0.3 L^2 within
3 s, and the learned g comes out 11% off. cn needs a consistent initial lam (its algebraic row only holds on
average over a step: an inconsistent lam0 leaves a residual that flips sign every step), so
lam0 is computed from the model's g and c; the gradient through lam0 is this rank's own and is
summed over the ranks here (odeint sums the rest).

    mpiexec -n 2 .venv/bin/python apps/pendulum.py            # about two minutes
    .venv/bin/python apps/pendulum.py --quick                  # smoke test

Outputs in OUT: metrics.json, curves.png (loss, g and c per iteration), trajectories.png
(held-out x(t): true, before and after training; the learned model's drift), training states
in OUT/state (--save-every K, --resume auto); SIGTERM/SIGUSR1 save the state and exit with
status 75.
PETSc options of the solve use the prefix 'pendulum_' (e.g. -pendulum_snes_monitor).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pnode_dist import InputError, allreduce_gradients, broadcast_parameters, odeint
from pnode_dist.parallel import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ode_cli  # noqa: E402
import sizing  # noqa: E402
import workflow  # noqa: E402

LENGTH, GRAVITY, DAMPING = 1.0, 9.81, 0.25      # the truth
MASS = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))


class Pendulum(nn.Module):
    """The DAE's right-hand side f(t, s) (rows 1-4: M s' = f; row 5: 0 = f) with learnable g, c."""

    def __init__(self, g, c):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(float(g), dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(float(c), dtype=torch.float64))

    def forward(self, t, s):
        return rhs(s, self.g, self.c)


def rhs(s, g, c):
    """f(t, s) for gravity g and damping force -c (u, v) (the docstring's equations)."""
    x, y, u, v, lam = s.unbind(-1)
    fx, fy = -c * u, -c * v
    return torch.stack([u, v, -lam * x + fx, -lam * y - g + fy,
                        u * u + v * v - lam * (x * x + y * y) - g * y + x * fx + y * fy], dim=-1)


def with_consistent_lam(q, g, c):
    """[x, y, u, v] -> [x, y, u, v, lam] with lam solving the algebraic row for this g, c."""
    x, y, u, v = q.unbind(-1)
    lam = (u * u + v * v - g * y - c * (x * u + y * v)) / (x * x + y * y)
    return torch.cat([q, lam[..., None]], dim=-1)


def reference_data(angles, times):
    """Trajectories [len(times), batch, 5] of the true pendulum (scipy Radau on the angle ODE;
    lam = omega^2 + (g/L) cos(theta) on the circle)."""
    from scipy.integrate import solve_ivp
    out = np.empty((len(times), len(angles), 5))
    for b, (th0, om0) in enumerate(angles.numpy()):
        sol = solve_ivp(lambda t, z: [z[1], -GRAVITY / LENGTH * math.sin(z[0]) - DAMPING * z[1]],
                        (0.0, times[-1]), [th0, om0], method="Radau", t_eval=times,
                        rtol=1e-11, atol=1e-12)
        th, om = sol.y
        out[:, b] = np.stack([LENGTH * np.sin(th), -LENGTH * np.cos(th), LENGTH * np.cos(th) * om,
                              LENGTH * np.sin(th) * om, om ** 2 + GRAVITY / LENGTH * np.cos(th)], 1)
    return torch.from_numpy(out)


def initial_conditions(n, seed):
    """n (angle, angular velocity) pairs: angles 0.3..1.5 rad either side, |omega| <= 1."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    angle = sign * (0.3 + 1.2 * torch.rand(n, generator=gen, dtype=torch.float64))
    omega = 2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1
    return torch.stack([angle, omega], dim=1)


def parse_args(argv=None):
    p = workflow.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=["cn", "beuler"], default="cn")
    p.add_argument("--linear-solver", choices=["exact", "gmres"], default="exact")
    p.add_argument("--trajectories", type=workflow.positive_int, default=8,
                   help="training trajectories, split over ranks (at least one per rank)")
    p.add_argument("--held-out", type=workflow.positive_int, default=4,
                   help="held-out trajectories, split over ranks (at least one per rank)")
    p.add_argument("--duration", type=workflow.positive_float, default=3.0,
                   help="seconds of each trajectory (about 1.5 swings)")
    p.add_argument("--points", type=workflow.int_range(2), default=61,
                   help="observed times 0..duration (at least 2)")
    p.add_argument("--substeps", type=workflow.positive_int, default=2,
                   help="implicit steps per observation interval")
    p.add_argument("--iterations", type=workflow.positive_int, default=150)
    p.add_argument("--lr-g", type=workflow.positive_float, default=0.5,
                   help="Adam's learning rate for g (cosine decay)")
    p.add_argument("--lr-c", type=workflow.positive_float, default=0.05,
                   help="Adam's learning rate for c (about a tenth: c is much smaller than g)")
    p.add_argument("--initial-g", type=workflow.positive_float, default=6.0,
                   help=f"starting guess for g (truth {GRAVITY})")
    p.add_argument("--initial-c", type=workflow.nonnegative_float, default=0.0,
                   help=f"starting guess for the damping c (truth {DAMPING})")
    ode_cli.add_checkpoint_arguments(p)
    workflow.add_run_arguments(p, out="runs/pendulum")
    args = workflow.parse_with_petsc_options(p, argv)
    ode_cli.check_checkpoint_arguments(p, args)
    if args.quick:
        args.iterations, args.trajectories, args.held_out = min(args.iterations, 15), 4, 4
        args.duration, args.points = 1.5, 31
    workflow.at_least_ranks(p, args, "trajectories", "held_out")
    return args


def memory_needs(args, rank, size):
    """What a rank holds at once (sizing.Need lists, lower bounds), while training and while
    reporting: the initial conditions and times, its training and held-out trajectories, the
    training solve's output and states; then the held-out predictions before and after
    training, and on rank 0 every rank's held-out positions gathered for the picture."""
    points = args.points
    lo, hi = workflow.shard(args.trajectories, rank, size)
    batch = hi - lo
    train = points * batch * 5
    lo, hi = workflow.shard(args.held_out, rank, size)
    held = points * (hi - lo) * 5
    option = f"--trajectories {args.trajectories} --points {points}"
    held_option = f"--held-out {args.held_out} --points {points}"
    common = [
        sizing.Need(f"the initial conditions ({args.trajectories} + {args.held_out} x 2 "
                    "float64, on every rank)", 16 * (args.trajectories + args.held_out),
                    f"--trajectories {args.trajectories} --held-out {args.held_out}"),
        sizing.Need(f"the times ({points} float64)", 8 * points, f"--points {points}"),
        sizing.Need(f"the training trajectories ({train} float64)", 8 * train, option,
                    split=True),
        sizing.Need(f"the held-out trajectories ({held} float64)", 8 * held, held_option,
                    split=True)]
    training = common + [
        sizing.Need(f"the solve's output ({train} numbers)", sizing.SOLVER_BYTES * train,
                    option, split=True),
        sizing.ode_states_need(args.method, 5 * batch, option, "trajectories' ODE state")]
    report = common + [sizing.Need(
        f"the held-out predictions before and after training ({held} numbers x 2)",
        2 * sizing.SOLVER_BYTES * held, held_option, split=True)]
    if rank == 0:
        gathered = points * args.held_out * 2 * 3
        report.append(sizing.Need(f"the held-out positions gathered on rank 0 ({gathered} "
                                  "float64 x 2)", 16 * gathered, held_option))
    return [training, report]


@workflow.reports_run_errors
def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    workflow.set_threads(comm)
    # Refused before the data are made if the run cannot fit.
    sizing.check_memory(comm, *memory_needs(args, rank, size))
    torch.manual_seed(args.seed)
    times = torch.linspace(0.0, args.duration, args.points, dtype=torch.float64)
    train_ic = initial_conditions(args.trajectories, args.seed)
    held_ic = initial_conditions(args.held_out, args.seed + 1)
    lo, hi = workflow.shard(args.trajectories, rank, size)
    data = reference_data(train_ic[lo:hi], times.numpy())
    lo, hi = workflow.shard(args.held_out, rank, size)
    held = reference_data(held_ic[lo:hi], times.numpy())
    model = Pendulum(args.initial_g, args.initial_c)
    broadcast_parameters(model)
    opt = torch.optim.Adam([{"params": [model.g], "lr": args.lr_g},
                            {"params": [model.c], "lr": args.lr_c}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iterations)
    opts = {"step_size": float(times[1] - times[0]) / args.substeps, "mass": MASS,
            "linear_solver": args.linear_solver}
    try:
        policy = ode_cli.checkpoint_policy(args)
    except InputError as exc:
        return workflow.fail(comm, exc)
    run = workflow.TrainingSession(args, comm, model, opt, sched)
    run.say(f"pendulum DAE: {args.trajectories} trajectories over {size} ranks, {args.points} "
            f"times on [0, {args.duration:g}], {args.method} ({args.linear_solver} Newton), "
            f"step {opts['step_size']:g}")

    def solve(truth, **kw):
        """The model's trajectories from truth's initial positions and velocities, and the
        copies of g and c its lam0 was computed from (their gradients are this rank's)."""
        g, c = (p.detach().clone().requires_grad_(p.requires_grad) for p in (model.g, model.c))
        s0 = with_consistent_lam(truth[0, :, :4], g, c)
        return odeint(model, s0, times, method=args.method, options=opts, prefix="pendulum_",
                      **kw), (g, c)

    panels = [("loss (position MSE)", ["loss"], True), ("gravity g", ["g"], False),
              ("damping c", ["c"], False)]

    def loop(resumed):
        start, history = 1, []
        if resumed is not None:
            start, history = resumed["iteration"] + 1, resumed["progress"]["history"]
        t0 = time.perf_counter()
        report_every = max(1, args.iterations // 10)
        for it in run.bar(range(start, args.iterations + 1), "training",
                          total=args.iterations - start + 1):
            opt.zero_grad()
            stats = {}
            s, lam0_params = solve(data, checkpointing=policy, stats=stats)
            loss = ((s[..., :2] - data[..., :2]) ** 2).sum() / (args.trajectories * args.points)
            loss.backward()               # model.g/.c: summed over the ranks by odeint
            allreduce_gradients(lam0_params)        # the lam0 path: summed here
            for p, q in zip((model.g, model.c), lam0_params):
                p.grad += q.grad
            opt.step()
            sched.step()
            history.append({"iteration": it, "loss": comm.allreduce(loss.item()),
                            "g": model.g.item(), "c": model.c.item()})
            if it % report_every == 0 or it == 1:
                run.say(f"iteration {it:4d}  loss {history[-1]['loss']:.3e}  g {model.g.item():.4f}"
                        f"  c {model.c.item():.4f}  ({time.perf_counter() - t0:.1f}s)")
                if args.verbose:
                    run.say(f"          ODE: {ode_cli.format_stats(stats)}")
                run.plot(history, panels, x="iteration")
            run.after_iteration(it, 1, {"history": history})
        return history, t0

    status, result = run.train(loop)
    if status:
        return status
    history, t0 = result
    run.plot(history, panels, x="iteration")
    with torch.no_grad():
        pred, _ = solve(held)
    err = comm.allreduce(float((pred[..., :2] - held[..., :2]).abs().max()), op=MPI.MAX)
    drift = comm.allreduce(float((pred[..., 0] ** 2 + pred[..., 1] ** 2 - LENGTH ** 2).abs().max()),
                           op=MPI.MAX)
    g, c = model.g.item(), model.c.item()
    residual = comm.allreduce(float(rhs(pred, g, c)[..., 4].abs().max()), op=MPI.MAX)
    with torch.no_grad():
        before = odeint(Pendulum(args.initial_g, args.initial_c), with_consistent_lam(
            held[0, :, :4], args.initial_g, args.initial_c), times, method=args.method,
            options=opts, prefix="pendulum_")
    curves = [comm.gather(v[..., :2]) for v in (held, before, pred)]
    if rank == 0:
        _plot(run.out / "trajectories.png", times, *(torch.cat(v, 1) for v in curves))
    metrics = {"ranks": size, "method": args.method, "step_size": opts["step_size"],
               "learned_g": g, "true_g": GRAVITY, "g_relative_error": abs(g - GRAVITY) / GRAVITY,
               "learned_c": c, "true_c": DAMPING, "c_abs_error": abs(c - DAMPING),
               "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
               "held_out_max_position_error": err, "held_out_max_drift": drift,
               "held_out_max_algebraic_residual": residual, "history": history}
    metrics, path = run.finish(args.iterations, 1, {"history": history}, metrics, started=t0)
    run.say(f"learned g {g:.4f} (truth {GRAVITY}, {100 * metrics['g_relative_error']:.2f}% off), "
            f"c {c:.4f} (truth {DAMPING}); held-out max position error {err:.2e}, max drift "
            f"|x^2+y^2-L^2| {drift:.2e}, algebraic residual {residual:.1e}; loss "
            f"{metrics['first_loss']:.3e} -> {metrics['final_loss']:.3e} in "
            f"{metrics['total_seconds']:.1f}s; metrics in {path}")
    return 0


def _plot(path, times, truth, before, after):
    """Held-out x(t): truth (lines), before training (dashed), learned (dots); the learned
    model's drift |x^2 + y^2 - L^2|."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for b in range(truth.shape[1]):
        line, = ax.plot(times, truth[:, b, 0], "-", lw=2, alpha=0.5)
        ax.plot(times, before[:, b, 0], "--", lw=1, color=line.get_color())
        ax.plot(times, after[:, b, 0], ".", ms=4, color=line.get_color())
        bx.semilogy(times[1:], (after[1:, b, 0] ** 2 + after[1:, b, 1] ** 2 - LENGTH ** 2).abs(),
                    color=line.get_color())
    ax.set(title="held out x(t): true (lines), initial model (dashed), learned (dots)",
           xlabel="t")
    ax.title.set_fontsize(9)
    bx.set(title="learned model: drift |x^2 + y^2 - L^2|", xlabel="t")
    fig.tight_layout()
    workflow.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
