"""Command-line options the apps share for their ODE blocks: the checkpointing policy and the
verbose report of what the last backward pass did."""
import pnode_dist


def add_checkpoint_arguments(parser):
    g = parser.add_argument_group("memory (checkpointing of the forward states)")
    g.add_argument("--checkpoint", choices=pnode_dist.checkpointing.SCHEDULES, default="auto",
                   help="'all' keeps every step in memory; 'binomial' re-runs the fewest steps "
                        "for --slots; 'uniform' spreads --slots checkpoints evenly; 'auto' "
                        "keeps all unless --host-bytes is too small (default)")
    g.add_argument("--slots", type=int, default=None,
                   help="checkpoints kept at once (y0 included); default: what the budgets hold")
    g.add_argument("--host-bytes", type=int, default=None, help="host-memory budget per rank")
    g.add_argument("--disk-dir", default=None,
                   help="directory for the HDF5 tier (checkpoints beyond the host budget)")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the HDF5 checkpoint files for pnode-inspect")
    g.add_argument("--verbose", action="store_true",
                   help="print the solver statistics of the last batch after each epoch")


def checkpoint_policy(args):
    """The Checkpointing policy the options describe (an InputError says what is wrong)."""
    return pnode_dist.Checkpointing(schedule=args.checkpoint, slots=args.slots,
                                    host_bytes=args.host_bytes, disk_dir=args.disk_dir,
                                    keep_files=args.keep_checkpoints)


def format_stats(stats):
    """One line of the solver statistics that matter for time and memory."""
    keys = ("steps", "recomputed_steps", "checkpoint_schedule", "checkpoint_slots",
            "host_bytes_peak", "disk_bytes_peak", "disk_write_seconds", "disk_read_seconds",
            "disk_prefetch_hits", "disk_prefetch_misses", "newton_iterations")
    parts = []
    for k in keys:
        if k in stats:
            v = stats[k]
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)
