"""Learn Robertson's stiff chemical kinetics with an implicit neural ODE, data-parallel.

    y1' = -0.04 y1 + 1e4 y2 y3,   y2' = 0.04 y1 - 1e4 y2 y3 - 3e7 y2^2,   y3' = 3e7 y2^2

Training data: trajectories from several initial states, computed with scipy's Radau at
rtol 1e-10 on a log-time grid from 1e-5 to 1e5 (made at start-up, nothing downloaded). The ODE is
integrated in log time tau = ln t on scaled species by an implicit method (cn by default,
beuler) through pnode_dist; every rank trains on its share of the trajectories. The loss is
the squared error of the log species at every time (relative errors: y2, about 1e-5 falling to
1e-9, counts as much as y1 and y3).

Two models (--model):
  rates  the reaction network (A -> B, B + C -> A + C, 2B -> B + C) with its three rate
         constants unknown: it learns log k, starting 7-12x off each, by L-BFGS; reaches the
         1% target (below)
  mlp    a black-box MLP right-hand side for the log species (they stay positive), in
         (log species, tau), trained by Adam

Afterwards the app reports, for held-out initial states, each species' largest relative error
|pred - true| / |true| over the log-time grid; and, for the TRUE Robertson system, how many steps
and how much time an explicit method (dopri5) needs versus the implicit one for the same
accuracy, and that dopri5 cannot integrate the learned model over the whole span.

    mpiexec -n 2 .venv/bin/python apps/stiff.py            # about two minutes
    .venv/bin/python apps/stiff.py --quick                  # smoke test

Outputs in OUT: metrics.json, curves.png (loss per iteration), fit.png, training states in
OUT/state (--save-every K, --resume auto); SIGTERM/SIGUSR1 save the state and exit with status 75.
PETSc options of the solve use the prefix 'stiff_' (e.g. -stiff_snes_monitor).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pnode_dist import InputError, SolverError, broadcast_parameters, odeint
from pnode_dist.parallel import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ode_cli  # noqa: E402
import sizing  # noqa: E402
import workflow  # noqa: E402

RATES = (0.04, 1e4, 3e7)
SCALE = torch.tensor([1.0, 4e-5, 1.0], dtype=torch.float64)   # typical size of each species
TINY = 1e-30                   # a species driven below 0 counts as this in the log loss


def robertson(t, y):
    k1, k2, k3 = RATES
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([-k1 * y1 + k2 * y2 * y3,
                        k1 * y1 - k2 * y2 * y3 - k3 * y2 ** 2,
                        k3 * y2 ** 2], dim=-1)


class Robertson(nn.Module):
    """The true right-hand side as a torch module (for the explicit/implicit comparison)."""

    def forward(self, t, y):
        return robertson(t, y)


def reference_data(y0s, times):
    """Trajectories [len(times), batch, 3] from scipy's Radau (tight tolerances)."""
    from scipy.integrate import solve_ivp

    def rhs(t, y):
        return robertson(t, torch.from_numpy(y)).numpy()

    def jac(t, y):
        k1, k2, k3 = RATES
        return np.array([[-k1, k2 * y[2], k2 * y[1]],
                         [k1, -k2 * y[2] - 2 * k3 * y[1], -k2 * y[1]],
                         [0.0, 2 * k3 * y[1], 0.0]])

    out = np.empty((len(times), len(y0s), 3))
    for b, y0 in enumerate(y0s.numpy()):
        sol = solve_ivp(rhs, (0.0, times[-1]), y0, method="Radau", t_eval=times, jac=jac,
                        rtol=1e-10, atol=1e-14)
        out[:, b] = sol.y.T
    return torch.from_numpy(out)


class LogTimeMLP(nn.Module):
    """dw/dtau = MLP(w, tau) for w = log(y / SCALE) and tau = ln t: the species stay positive."""

    def __init__(self, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, tau, z):
        tt = (tau / 10.0).expand(z.shape[:-1] + (1,))
        return self.net(torch.cat([z, tt], dim=-1))


class RateLaw(nn.Module):
    """dz/dtau = t f(y; k) / SCALE for y = z * SCALE: Robertson's three mass-action reactions
    with learned log rate constants (they span nine orders of magnitude)."""

    INITIAL_FACTORS = (12.2, 0.135, 9.0)      # the starting guess: k_true times these

    def __init__(self):
        super().__init__()
        start = [math.log(k * f) for k, f in zip(RATES, self.INITIAL_FACTORS)]
        self.log_k = nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self, tau, z):
        k = torch.exp(self.log_k)
        y = z * SCALE.to(z)
        y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
        r1, r2, r3 = k[0] * y1, k[1] * y2 * y3, k[2] * y2 * y2
        dy = torch.stack([r2 - r1, r1 - r2 - r3, r3], dim=-1)
        return torch.exp(tau) * dy / SCALE.to(z)


def parse_args(argv=None):
    p = workflow.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["rates", "mlp"], default="rates",
                   help="rates: learn the network's rate constants (L-BFGS); mlp: a black-box "
                        "right-hand side (Adam)")
    p.add_argument("--method", choices=["cn", "beuler"], default="cn")
    p.add_argument("--linear-solver", choices=["exact", "gmres"], default="exact")
    p.add_argument("--trajectories", type=workflow.positive_int, default=8,
                   help="initial states, split over ranks (at least one per rank)")
    p.add_argument("--points", type=workflow.int_range(2), default=41,
                   help="log-time grid points 1e-5..1e5 (at least 2)")
    p.add_argument("--held-out", type=workflow.positive_int, default=4,
                   help="initial states never trained on, for the reported errors")
    p.add_argument("--substeps", type=workflow.positive_int, default=10,
                   help="steps per grid interval (10: cn's own error is 0.3%%)")
    p.add_argument("--iterations", type=workflow.positive_int, default=None,
                   help="L-BFGS or Adam iterations (default: 20 for rates, 120 for mlp)")
    p.add_argument("--lr", type=workflow.positive_float, default=None,
                   help="learning rate (default: 1 for L-BFGS, 1e-2 for Adam)")
    p.add_argument("--hidden", type=workflow.positive_int, default=32, help="width of the MLP")
    ode_cli.add_checkpoint_arguments(p)
    workflow.add_run_arguments(p, out="runs/stiff")
    args = workflow.parse_with_petsc_options(p, argv)
    ode_cli.check_checkpoint_arguments(p, args)
    rates = args.model == "rates"
    if args.iterations is None:
        args.iterations = 20 if rates else 120
    if args.lr is None:
        args.lr = 1.0 if rates else 1e-2
    if args.quick:             # half a minute on an idle 2-core machine
        args.iterations, args.trajectories = (7 if rates else 12), 4
        args.held_out = min(args.held_out, 2)
        args.points = min(args.points, 21)
    workflow.at_least_ranks(p, args, "trajectories")
    return args


def compare_with_explicit(times, implicit_method, linear_solver, t_end=10.0):
    """Steps and seconds for the TRUE Robertson system up to t_end: the implicit method with
    one step per log-grid interval versus adaptive dopri5 at the accuracy the implicit run
    reached. (dopri5's step is bounded by stability, about 3e-4 here: up to t = 1e5 it would
    need some 1e8 steps, so the comparison stops at t_end.)"""
    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    grid = torch.cat([torch.zeros(1, dtype=torch.float64), times[times <= t_end]])
    ref = reference_data(y0, grid[1:].numpy())
    f = Robertson()
    result = {"t_end": t_end}
    # step_size = t_end: exactly one implicit step per log-grid interval.
    runs = [(implicit_method, {"linear_solver": linear_solver, "step_size": t_end}, {}),
            ("dopri5", {"max_num_steps": 500_000}, None)]
    for method, options, tolerances in runs:
        if tolerances is None:      # explicit: as accurate as the implicit run
            tol = max(result[implicit_method]["max_scaled_error"] / 10, 1e-8)
            tolerances = {"rtol": tol, "atol": tol * float(SCALE[1])}
        stats = {}
        t0 = time.perf_counter()
        try:
            ys = odeint(f, y0, grid, method=method, comm="self", options=options, stats=stats,
                        **tolerances)[1:]
            error = ((ys - ref) / SCALE).abs().max().item()
        except SolverError as exc:
            error, stats["failed"] = float("nan"), str(exc)
        result[method] = {"steps": stats.get("steps"), "seconds": time.perf_counter() - t0,
                          "max_scaled_error": error, **stats}
    return result


def initial_states(count, generator):
    """y1 in (0.5, 1], y2 = 0, y3 = 1 - y1."""
    y0s = torch.zeros(count, 3, dtype=torch.float64)
    y0s[:, 0] = 1.0 - 0.5 * torch.rand(count, generator=generator, dtype=torch.float64)
    y0s[:, 2] = 1.0 - y0s[:, 0]
    return y0s


def species(model, z0, taus, **kwargs):
    """The model's scaled species at taus from z0 (the MLP integrates their logarithms)."""
    if isinstance(model, LogTimeMLP):
        return torch.exp(odeint(model, torch.log(z0), taus, **kwargs))
    return odeint(model, z0, taus, **kwargs)


def relative_errors(pred, truth):
    """Each species' largest |pred - true| / |true| over the times after the first."""
    return ((pred - truth).abs() / truth.abs())[1:].amax(dim=(0, 1)).tolist()


def explicit_attempt(model, z0, taus, max_steps=20_000):
    """dopri5 on the learned model over the whole log-time span: it fails (stiffness bounds
    its step) where the implicit method takes a few hundred steps."""
    stats = {}
    try:
        with torch.no_grad():
            species(model, z0, taus, method="dopri5", comm="self", stats=stats,
                    options={"max_num_steps": max_steps}, rtol=1e-6, atol=1e-9)
        return {"failed": None, "steps": stats.get("steps")}
    except SolverError as exc:
        return {"failed": str(exc).splitlines()[0], "max_num_steps": max_steps}


def memory_needs(args, rank, size):
    """What a rank holds at once (sizing.Need lists, lower bounds), while training and, on
    rank 0, while reporting on the held-out states: the initial states and the time grid, its
    trajectories (data, scaled, log), the solve's output and states, the parameters with the
    optimizer's state, rank 0's held-out truth and prediction."""
    lo, hi = workflow.shard(args.trajectories, rank, size)
    points, mine = args.points, (hi - lo) * args.points * 3
    data = f"--trajectories {args.trajectories} --points {points}"
    params = sizing.parameter_bytes(
        lambda: (RateLaw() if args.model == "rates" else LogTimeMLP(args.hidden)).double())
    common = [
        sizing.Need(f"the initial states ({args.trajectories} + {args.held_out} x 3 float64, "
                    "on every rank)", 24 * (args.trajectories + args.held_out),
                    f"--trajectories {args.trajectories} --held-out {args.held_out}"),
        sizing.Need(f"the time grid ({points} x 2 float64)", 16 * points, f"--points {points}"),
        sizing.Need(f"the trajectories ({mine} float64 x 3: data, scaled, log)", 24 * mine,
                    data, split=True),
        sizing.parameters_need(params, f"--hidden {args.hidden}" if args.model == "mlp" else "")]
    training = common + [
        sizing.Need(f"the solve's output ({mine} numbers)", sizing.SOLVER_BYTES * mine, data,
                    split=True),
        sizing.ode_states_need(args.method, 3 * (hi - lo), f"--trajectories {args.trajectories}",
                               "trajectories' ODE state")]
    if rank != 0:
        return [training]
    held = points * args.held_out * 3
    return [training, common + [sizing.Need(
        f"the held-out truth and prediction on rank 0 ({held} float64 x 2)", 16 * held,
        f"--held-out {args.held_out} --points {points}")]]


@workflow.reports_run_errors
def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    workflow.set_threads(comm)
    # Refused before the data are made if the run cannot fit.
    sizing.check_memory(comm, *memory_needs(args, rank, size))
    torch.manual_seed(args.seed)
    times = torch.logspace(-5, 5, args.points, dtype=torch.float64)
    gen = torch.Generator().manual_seed(args.seed)
    y0s = initial_states(args.trajectories, gen)
    held_out = initial_states(args.held_out, gen)        # drawn after, never trained on
    lo, hi = workflow.shard(args.trajectories, rank, size)
    data = reference_data(y0s[lo:hi], times.numpy())
    z_data = data / SCALE
    log_data = torch.log(z_data)
    taus = torch.log(times)
    rates = args.model == "rates"
    model = (RateLaw() if rates else LogTimeMLP(args.hidden)).double()
    broadcast_parameters(model)
    if rates:
        # Tolerances far below the loss's scale: L-BFGS must not stop on its own.
        opt = torch.optim.LBFGS(model.parameters(), lr=args.lr, max_iter=1, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-14,
                                tolerance_change=1e-16)
        sched = None
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iterations)
    step = float((taus[1] - taus[0]) / args.substeps)
    opts = {"step_size": step, "linear_solver": args.linear_solver}
    try:
        policy = ode_cli.checkpoint_policy(args)
    except InputError as exc:
        return workflow.fail(comm, exc)
    run = workflow.TrainingSession(args, comm, model, opt, sched)
    run.say(f"Robertson: {args.trajectories} trajectories over {size} ranks, {args.points} "
            f"log-time points, model {args.model}, {args.method} ({args.linear_solver} Newton, "
            f"{args.substeps} steps per interval)")
    scale = args.trajectories * (args.points - 1) * 3

    def closure():
        """The loss over every rank's trajectories (identical on all ranks, as L-BFGS's line
        search needs) and its gradient."""
        opt.zero_grad()
        stats = closure.stats = {}
        z = species(model, z_data[0], taus, method=args.method, options=opts,
                    checkpointing=policy, stats=stats, prefix="stiff_")
        loss = ((torch.log(z[1:].clamp_min(TINY)) - log_data[1:]) ** 2).sum() / scale
        loss.backward()
        closure.calls += 1
        return torch.tensor(comm.allreduce(loss.item()), dtype=torch.float64)

    closure.calls = 0
    def loop(resumed):
        start, history = 1, []
        if resumed is not None:
            start, history = resumed["iteration"] + 1, resumed["progress"]["history"]
        t0 = time.perf_counter()
        report_every = max(1, args.iterations // 10)
        for it in run.bar(range(start, args.iterations + 1), "training",
                          total=args.iterations - start + 1):
            closure.calls = 0
            total = float(opt.step(closure))     # the loss before this iteration's update
            if sched is not None:
                sched.step()
            history.append({"iteration": it, "loss": total, "evaluations": closure.calls})
            if it % report_every == 0 or it == 1:
                run.say(f"iteration {it:4d}  loss {total:.3e}  "
                        f"({time.perf_counter() - t0:.1f}s)")
                if args.verbose:
                    run.say(f"          ODE: {ode_cli.format_stats(closure.stats)}")
                run.plot(history, [("loss (log species)", ["loss"], True)], x="iteration")
            run.after_iteration(it, 1, {"history": history})
        return history, t0

    status, result = run.train(loop)
    if status:
        return status
    history, t0 = result
    final_state = run.save(args.iterations, 1, {"history": history})
    run.plot(history, [("loss (log species)", ["loss"], True)], x="iteration")
    with torch.no_grad():
        z = species(model, z_data[0], taus, method=args.method, options=opts, prefix="stiff_")
    train_errors = np.array(relative_errors(z * SCALE, data))
    comm.Allreduce(MPI.IN_PLACE, train_errors, op=MPI.MAX)
    report = {"model": args.model, "final_loss": closure().item(),
              "first_loss": history[0]["loss"], "train_seconds": time.perf_counter() - t0,
              "train_relative_error": train_errors.tolist(), "ranks": size,
              "method": args.method, "history": history, "training_state": final_state}
    if rates:
        report["initial_rate_constants"] = [k * f for k, f in zip(RATES, RateLaw.INITIAL_FACTORS)]
        report["rate_constants"] = torch.exp(model.log_k.detach()).tolist()
        report["true_rate_constants"] = list(RATES)
    if rank == 0:
        truth = reference_data(held_out, times.numpy())
        with torch.no_grad():
            pred = species(model, truth[0] / SCALE, taus, method=args.method, options=opts,
                           comm="self", prefix="stiff_") * SCALE
        report["held_out_relative_error"] = relative_errors(pred, truth)
        report["explicit_on_learned_model"] = explicit_attempt(
            model, truth[0] / SCALE, taus, max_steps=2_000 if args.quick else 20_000)
        report["stiffness"] = compare_with_explicit(times, args.method, args.linear_solver)
        _summary(report, args)
    run.write_metrics(report)                    # collective (rank 0 writes rank 0's report)
    if rank == 0:
        _plot(run.out / "fit.png", times, truth, pred)
    return 0


def _summary(report, args):
    """The result lines on rank 0."""
    percent = ", ".join(f"y{k + 1} {100 * e:.3g}%" for k, e in
                        enumerate(report["held_out_relative_error"]))
    print(f"fit: loss {report['first_loss']:.3e} -> {report['final_loss']:.3e}; held-out largest "
          f"relative error {percent}", flush=True)
    if "rate_constants" in report:
        print("rate constants: learned " + ", ".join(f"{k:.4g}" for k in report["rate_constants"])
              + "; true " + ", ".join(f"{k:g}" for k in RATES), flush=True)
    explicit = report["explicit_on_learned_model"]
    implicit_steps = args.substeps * (args.points - 1)
    print(f"learned model over 1e-5..1e5 (in log time tau = ln t): {args.method} "
          f"{implicit_steps} steps; dopri5 "
          + (f"failed: {explicit['failed']}" if explicit["failed"] else
             f"{explicit['steps']} steps"), flush=True)
    cmp = report["stiffness"]
    imp, exp = cmp[args.method], cmp["dopri5"]
    print(f"true Robertson on [0, {cmp['t_end']:g}]: {args.method} {imp['steps']} steps "
          f"{imp['seconds']:.3f}s (max scaled error {imp['max_scaled_error']:.1e}); dopri5 "
          f"{exp['steps']} steps {exp['seconds']:.3f}s (max scaled error "
          f"{exp['max_scaled_error']:.1e}): {exp['steps'] / imp['steps']:.0f}x the steps, "
          f"{exp['seconds'] / imp['seconds']:.0f}x the time", flush=True)


def _plot(path, times, data, pred):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for k, ax in enumerate(axes):
        ax.semilogx(times, data[:, 0, k], "k.", label="Radau (held out)")
        ax.semilogx(times, pred[:, 0, k].detach(), "r-", label="learned model")
        ax.set_title(f"y{k + 1}")
        ax.set_xlabel("t")
    axes[0].legend()
    fig.tight_layout()
    workflow.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
