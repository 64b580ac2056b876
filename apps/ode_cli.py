"""Command-line options the apps share for their ODE blocks: the checkpointing policy and the
verbose report of what the last backward pass did."""
import os

import pnode_dist
from pnode_dist import METHODS
from workflow import directory, nonnegative_int, positive_int

# Methods the apps can use: all but IMEX ones (those need a pnode_dist.IMEX pair as func).
APP_METHODS = sorted(name for name, m in METHODS.items() if m.kind != "imex")
ADAPTIVE_METHODS = sorted(name for name, m in METHODS.items() if m.adaptive and m.kind != "imex")


def check_steps(parser, method, steps, option="--steps"):
    """parser.error unless `steps` fits `method`: 0 (adaptive) needs an adaptive method."""
    if steps == 0 and not METHODS[method].adaptive:
        parser.error(f"{option} 0 means adaptive steps, but {method} is not adaptive (adaptive "
                     f"methods: {', '.join(ADAPTIVE_METHODS)}); give a number of steps >= 1")


def add_checkpoint_arguments(parser):
    g = parser.add_argument_group("memory (checkpointing of the forward states)")
    g.add_argument("--checkpoint", choices=pnode_dist.checkpointing.SCHEDULES, default="auto",
                   help="'auto' (default): the fastest strategy within --memory (stored graphs, "
                        "all steps, all states, binomial); 'all' keeps every step in memory; "
                        "'binomial' re-runs the fewest steps for --slots; 'uniform' spreads "
                        "--slots checkpoints evenly")
    g.add_argument("--memory", type=nonnegative_int, default=None,
                   help="bytes per rank 'auto' may keep for the backward pass (default: "
                        "--host-bytes if given, else half the free memory)")
    g.add_argument("--slots", type=positive_int, default=None,
                   help="checkpoints kept at once (y0 included); default: what the budgets hold")
    g.add_argument("--host-bytes", type=nonnegative_int, default=None,
                   help="host-memory budget per rank")
    g.add_argument("--disk-dir", type=directory, default=os.environ.get("PNODE_SCRATCH"),
                   help="directory for the HDF5 tier (checkpoints beyond the host budget); "
                        "default $PNODE_SCRATCH, which jobscripts/run_app.sh sets to the job's "
                        "node-local scratch")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the HDF5 checkpoint files for pnode-inspect")
    g.add_argument("--verbose", action="store_true",
                   help="print the solver statistics of the last batch after each epoch")


def check_checkpoint_arguments(parser, args):
    """parser.error (one line, every rank alike) for checkpoint options that do not combine."""
    if args.checkpoint == "all" and args.slots is not None:
        parser.error("--slots applies to --checkpoint uniform or binomial ('all' keeps every "
                     "step)")
    if args.checkpoint in ("uniform", "binomial") and args.slots is None \
            and (args.host_bytes is None or args.disk_dir is not None):
        parser.error(f"--checkpoint {args.checkpoint} needs --slots, or --host-bytes without "
                     "--disk-dir (an unbounded disk tier gives no slot count)"
                     + (f"; --disk-dir is {args.disk_dir} from $PNODE_SCRATCH"
                        if args.disk_dir == os.environ.get("PNODE_SCRATCH") else ""))
    if args.keep_checkpoints and args.disk_dir is None:
        parser.error("--keep-checkpoints keeps the HDF5 files of --disk-dir: give --disk-dir")
    try:
        checkpoint_policy(args)
    except pnode_dist.InputError as exc:
        parser.error(str(exc))


def checkpoint_policy(args):
    """The Checkpointing policy the options describe (an InputError says what is wrong)."""
    return pnode_dist.Checkpointing(schedule=args.checkpoint, slots=args.slots,
                                    memory=args.memory, host_bytes=args.host_bytes,
                                    disk_dir=args.disk_dir, keep_files=args.keep_checkpoints)


def format_stats(stats):
    """One line of the solver statistics that matter for time and memory."""
    keys = ("steps", "recomputed_steps", "checkpoint_schedule", "checkpoint_slots",
            "memory_budget", "memory_estimate", "memory_used", "spilled_at_step",
            "host_bytes_peak", "disk_bytes_peak", "disk_write_seconds", "disk_read_seconds",
            "disk_prefetch_hits", "disk_prefetch_misses", "newton_iterations")
    parts = []
    for k in keys:
        if k in stats:
            v = stats[k]
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)
