"""What every app shares around its training loop: the run options (--out, --quick, --seed,
--save-every, --resume, --state-dir, --no-progress), rank-0 output (progress bar, summary lines,
errors), training-curve PNGs, the metrics JSON, training-state save/resume, and a clean stop on
SIGTERM/SIGUSR1 (state saved, exit status 75 so that a job script requeues itself)."""
import json
import os
import sys
import time
from pathlib import Path

from pnode_dist import training_state
from pnode_dist.parallel import MPI
from pnode_dist.preemption import REQUEUE_EXIT_CODE, StopSignals


def add_run_arguments(parser, out):
    g = parser.add_argument_group("run (output, training state, restart)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=out, help=f"output directory (default {out})")
    g.add_argument("--quick", action="store_true", help="smoke test: finishes in under a minute")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--save-every", type=int, default=0, metavar="K",
                   help="write the training state every K iterations (and always at the end)")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a training-state file, or from the newest valid one in "
                        "the state directory ('auto'; starts fresh if there is none)")
    g.add_argument("--state-dir", default=None, help="training-state directory (default OUT/state)")


def parse_with_petsc_options(parser, argv):
    """argparse's known options; the rest must be PETSc options (one dash)."""
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("--")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (PETSc options take one dash)")
    return args


def shard(n, rank, size):
    """This rank's [lo, hi) of n items (uneven shards allowed, never empty when n >= size)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def set_threads(comm):
    """torch threads per rank: OMP_NUM_THREADS when set (job scripts set it from
    --cpus-per-task), else this node's usable cores shared by the ranks on this node."""
    import torch
    if os.environ.get("OMP_NUM_THREADS"):
        return
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // node.Get_size()))
    node.Free()


def say(comm, text):
    """Print on rank 0 (above a progress bar when one is active)."""
    if comm.Get_rank() == 0:
        from tqdm import tqdm
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()


def fail(comm, message):
    """Print `message` as an error on rank 0; returns the exit status for bad input (2)."""
    if comm.Get_rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


class Stopped(Exception):
    """A stop signal arrived; the state is saved. Carries the exit status for the job script."""
    exit_code = REQUEUE_EXIT_CODE


class TrainingRun:
    """One app run on `comm`: output on rank 0, training state in args.state_dir (or OUT/state),
    stop signals turned into a saved state and `Stopped` at the next iteration boundary."""

    def __init__(self, args, comm, model, optimizer, scheduler=None):
        self.args, self.comm = args, comm
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.rank = comm.Get_rank()
        self.out = Path(args.out)
        self.state_dir = Path(args.state_dir or self.out / "state")
        self.signals = StopSignals()

    # -- output ---------------------------------------------------------------------------
    def say(self, text):
        say(self.comm, text)

    def fail(self, message):
        return fail(self.comm, message)

    def bar(self, iterable, desc, total=None):
        """A tqdm progress bar on rank 0 (unless --no-progress); the iterable elsewhere."""
        if self.rank != 0 or self.args.no_progress:
            return iterable
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stdout)

    def plot(self, history, panels, name="curves.png", x="epoch"):
        """PNG of the training curves on rank 0: one panel per (ylabel, keys, log_scale)."""
        if self.rank != 0 or not history:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
        xs = [h[x] for h in history]
        for ax, (ylabel, keys, log) in zip(axes[0], panels):
            for key in keys:
                ax.plot(xs, [h[key] for h in history], label=key.replace("_", " "))
            ax.set(xlabel=x, ylabel=ylabel, yscale="log" if log else "linear")
            if len(keys) > 1:
                ax.legend()
        fig.tight_layout()
        self.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.out / name, dpi=80)
        plt.close(fig)

    def write_metrics(self, metrics):
        """OUT/metrics.json on rank 0 (the run's arguments added); returns its path."""
        path = self.out / "metrics.json"
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**metrics, "args": vars(self.args)}, indent=2,
                                       default=str))
        return path

    def finish(self, iteration, epoch, progress, metrics, started):
        """End of a run (collective): save the final training state, then write metrics.json
        with its path and the seconds since `started` added. Returns (metrics, json path)."""
        metrics = dict(metrics, training_state=self.save(iteration, epoch, progress),
                       total_seconds=time.perf_counter() - started)
        return metrics, self.write_metrics(metrics)

    # -- training state -------------------------------------------------------------------
    def resume(self):
        """Load the state --resume names ('auto': the newest valid file in the state directory,
        damaged ones skipped and reported). Returns dict(iteration, epoch, args, progress) or
        None. Raises FileFormatError for a named file that is missing or damaged."""
        spec = self.args.resume
        if spec is None:
            return None
        path = spec
        if spec == "auto":
            found = training_state.latest_valid(self.state_dir) if self.rank == 0 else None
            path, skipped = self.comm.bcast(found, root=0)
            for bad, why in skipped:
                self.say(f"skipping {bad}: {why}")
            if path is None:
                self.say(f"no training state in {self.state_dir}: starting fresh")
                return None
        info = training_state.load(path, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, comm=self.comm)
        self.say(f"resumed from {path} (iteration {info['iteration']})")
        return info

    def save(self, iteration, epoch, progress):
        """Write the training state (collective); returns its path."""
        return training_state.save(self.state_dir, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, iteration=iteration, epoch=epoch,
                                   comm=self.comm, args=vars(self.args), progress=progress)

    def after_iteration(self, iteration, epoch, progress):
        """Call on every rank after each optimizer step: saves every --save-every iterations,
        and on a stop signal saves and raises Stopped (the same iteration on every rank)."""
        if self.signals.requested(self.comm):
            path = self.save(iteration, epoch, progress)
            self.say(f"stop signal ({self.signals.received or 'on another rank'}): state saved "
                     f"to {path} at iteration {iteration}; continue with --resume auto")
            raise Stopped(path)
        if self.args.save_every and iteration % self.args.save_every == 0:
            self.save(iteration, epoch, progress)

    def __enter__(self):
        self.signals.__enter__()
        return self

    def __exit__(self, *exc):
        return self.signals.__exit__(*exc)
