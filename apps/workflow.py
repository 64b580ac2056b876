"""What every app shares around its training loop: the run options (--out, --quick, --seed,
--save-every, --resume, --state-dir, --no-progress), rank-0 output (progress bar, summary lines,
errors), training-curve PNGs, the metrics JSON, training-state save/resume, and a clean stop on
SIGTERM/SIGUSR1 (state saved, exit status 75 so that a job script requeues itself).

Every step of TrainingSession that touches files runs on rank 0 and is collective: its outcome is
broadcast, so a failure (an unwritable --out, a full disk, a damaged state, a state directory
in use) raises the same RunError on every rank, and `reports_run_errors` turns it into one line
and an exit status instead of a hang or a traceback."""
import argparse
import fcntl
import functools
import json
import math
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pnode_dist.training import state as training_state
from pnode_dist import FileFormatError, PnodeError
from pnode_dist.parallel import MPI
from pnode_dist.training.preemption import REQUEUE_EXIT_CODE, StopSignals


def _one_line(text):
    """`text` with every non-printable character escaped (a message stays one line)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class ArgumentParser(argparse.ArgumentParser):
    """An app's argparse under mpiexec: every rank parses the same argv and so exits alike
    (status 2 for bad arguments, 0 after --help), but only rank 0 prints; an error is one line
    on stderr (no usage block, control characters escaped)."""

    def _print_message(self, message, file=None):
        if MPI.COMM_WORLD.Get_rank() == 0:
            super()._print_message(message, file)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


def _checked(kind, test, expected):
    """An argparse type: kind(text), accepted when test(value) holds; else a one-line error
    naming what was expected."""
    def convert(text):
        try:
            value = kind(text)
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {_one_line(repr(text))}")
        return value
    convert.__name__ = expected
    return convert


def int_range(low, high=None):
    """argparse type: an integer in [low, high] (high None: no upper bound)."""
    if high is None:
        return _checked(int, lambda v: v >= low, f"an integer >= {low}")
    return _checked(int, lambda v: low <= v <= high, f"an integer from {low} to {high}")


positive_int = int_range(1)
nonnegative_int = int_range(0)
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonnegative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0,
                             "a finite number >= 0")
probability = _checked(float, lambda v: 0 <= v <= 1, "a probability from 0 to 1")
seed_int = int_range(0, 2 ** 32 - 1)


directory = _checked(str, lambda v: v != "" and "\0" not in v, "a directory path")
DIRECTORY_OPTIONS = ("out", "state_dir", "disk_dir")   # checked by parse_with_petsc_options


def at_least_ranks(parser, args, *names):
    """parser.error unless each named option is at least the number of ranks (the same
    outcome on every rank: same argv, same size)."""
    size = MPI.COMM_WORLD.Get_size()
    for name in names:
        value = getattr(args, name)
        if value < size:
            parser.error(f"--{name.replace('_', '-')} {value} is smaller than the {size} ranks: "
                         "every rank needs at least one")


def add_run_arguments(parser, out):
    g = parser.add_argument_group("run (output, training state, restart)")
    g.add_argument("--seed", type=seed_int, default=0, help="random seed, 0 to 2^32-1")
    g.add_argument("--out", type=directory, default=out,
                   help=f"output directory (default {out})")
    g.add_argument("--quick", action="store_true", help="smoke test: finishes in under a minute")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--save-every", type=nonnegative_int, default=0, metavar="K",
                   help="write the training state every K iterations (and always at the end; "
                        "0: only at the end)")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a training-state file, or from the newest valid one in "
                        "the state directory ('auto'; starts fresh if there is none)")
    g.add_argument("--state-dir", type=directory, default=None,
                   help="training-state directory (default OUT/state)")


def parse_with_petsc_options(parser, argv):
    """argparse's known options; the rest must be PETSc options (one dash, each maybe followed
    by its value)."""
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("--")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (PETSc options take one dash)")
    if rest and not rest[0].startswith("-"):
        parser.error(f"unexpected argument {rest[0]!r} (PETSc options start with one dash)")
    if args.resume == "":
        parser.error("--resume needs a training-state file or 'auto'")
    # Directories must not be existing files; agreed over the ranks (node-local paths may
    # differ), so that every rank exits or none does.
    for name in DIRECTORY_OPTIONS:
        path = getattr(args, name, None)
        not_dir = path is not None and os.path.exists(path) and not os.path.isdir(path)
        if MPI.COMM_WORLD.allreduce(int(not_dir), op=MPI.MAX):
            parser.error(f"--{name.replace('_', '-')} {path}: exists and is not a directory"
                         + ("" if not_dir else " (on another rank's node)"))
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


class RunError(Exception):
    """A step of the run failed; raised on every rank with the same one-line message.
    exit_code: 2 for what the user can fix in the command line or folders, 1 for a failure
    during the run (a full disk)."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


def on_rank0(comm, step, *args, what=None, exit_code=2):
    """Collective: `step(*args)` on rank 0 only; returns its (picklable) result on every rank,
    or raises RunError on every rank: "what: reason" (a RunError raised by `step` keeps its
    message and exit code)."""
    result = error = None
    if comm.Get_rank() == 0:
        try:
            result = step(*args)
        except RunError as exc:
            error = (str(exc), exc.exit_code)
        except Exception as exc:
            reason = training_state.error_reason(exc)
            error = (f"{what}: {reason}" if what else reason, exit_code)
    result, error = comm.bcast((result, error), root=0)
    if error is not None:
        raise RunError(*error)
    return result


def reports_run_errors(main):
    """Decorator for an app's main(argv): a RunError (raised on every rank) is printed once, by
    rank 0, as `error: ...`, and its exit_code returned."""
    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except RunError as exc:
            fail(MPI.COMM_WORLD, exc)
            return exc.exit_code
    return wrapper


def _check_writable(directory, option):
    """Create `directory` (and parents) and write and remove a small file in it."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        try:
            os.write(fd, b"pnode_dist")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as exc:
        raise RunError(f"{option} {directory} cannot be written "
                       f"({training_state.error_reason(exc)})") from None


def _write_atomically(path, text):
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure(fig, path):
    """fig as a PNG at `path`, written to a temporary name then renamed (a failure, such as a
    full disk, leaves the earlier picture); the figure is closed."""
    import matplotlib.pyplot as plt
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=80)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def _lock(directory):
    """(fd, None) holding an exclusive flock on directory/.lock (released when the process
    ends); (None, warning) where the filesystem has no locks. RunError when another process
    holds it."""
    path = os.path.join(directory, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunError(f"{directory} is in use by another run ({holder or 'lock ' + path}): "
                       "wait until it ends, or use a new --out or --state-dir") from None
    except OSError as exc:
        os.close(fd)
        return None, (f"warning: cannot lock {path} ({exc.strerror}): a second run using "
                      f"{directory} at the same time would not be detected")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd, None


# Options a resumed run may change: where files go, how often it saves, what it prints, how
# many iterations it runs, how its solves keep checkpoints (the gradients are the same).
RESUMABLE_CHANGES = {"resume", "out", "state_dir", "save_every", "no_progress", "verbose",
                     "epochs", "iterations", "eval_every", "disk_dir", "keep_checkpoints",
                     "checkpoint", "memory", "slots", "host_bytes"}


def _changed_options(saved, current):
    """'--lr 0.01 (saved 0.003), ...' for the options of `current` (this command line's args)
    that differ from the `saved` run's and may not change on resume ('' when none do)."""
    now = json.loads(json.dumps(current, sort_keys=True, default=str))
    changed = [f"--{key.replace('_', '-')} {_one_line(now[key])} (saved "
               f"{_one_line(saved.get(key))})"
               for key in sorted(now) if key not in RESUMABLE_CHANGES and key in saved
               and saved[key] != now[key]]
    return ", ".join(changed)


OWNER_FILE = ".pnode-run"    # in OUT: the id of the run whose results OUT holds


def _results_owner(out):
    """The run id whose results `out` holds: from OUT/.pnode-run, else from a metrics.json
    written before that file existed ('unknown' if unreadable); None for a folder without
    results."""
    try:
        return (Path(out) / OWNER_FILE).read_text().strip() or "unknown"
    except FileNotFoundError:
        pass
    metrics = Path(out) / "metrics.json"
    if not metrics.exists():
        return None
    try:
        return str(json.loads(metrics.read_text()).get("run_id") or "unknown")
    except (OSError, ValueError, AttributeError):
        return "unknown"


def _results(out):
    """What of a run's results `out` holds: metrics.json, pictures, training states in
    OUT/state ([] when none)."""
    out = Path(out)
    found = [name for name in ("metrics.json",) if (out / name).exists()]
    found += sorted(p.name for p in out.glob("*.png"))
    states = training_state.scan(out / "state") if (out / "state").is_dir() else []
    return found + ([f"{len(states)} training state(s) in {out / 'state'}"] if states else [])


class Stopped(Exception):
    """A stop signal arrived; the state is saved. Carries the exit status for the job script."""
    exit_code = REQUEUE_EXIT_CODE


class TrainingSession:
    """One app run on `comm`: output on rank 0, training state in args.state_dir (or OUT/state),
    stop signals turned into a saved state and `Stopped` at the next iteration boundary.

    `resume()` starts the run (collective; call it first): OUT and the state directory must be
    writable, rank 0 holds an exclusive lock on STATE_DIR/.lock for the life of the process (a
    second run using the same folder at the same time is refused), and the run gets its id:
    a new one (uuid hex) for a fresh run, the resumed state's otherwise. The id is written
    into every state file and metrics.json; pruning only removes this run's states. A state
    directory holds one run: a fresh run (no --resume, or --resume auto finding no state file)
    into a folder that already holds state files is refused (continue that run with --resume
    auto, or use a new --out or --state-dir); so is --resume auto over the states of several
    runs, or over files whose header cannot be read, and --resume FILE into a folder that holds
    another run's states. Nothing is ever deleted or replaced to make room.

    Failures of file steps (start, save, metrics) raise RunError on every rank."""

    def __init__(self, args, comm, model, optimizer, scheduler=None):
        self.args, self.comm = args, comm
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.rank = comm.Get_rank()
        self.out = Path(args.out)
        self.state_dir = Path(args.state_dir or self.out / "state")
        self.signals = StopSignals()
        self.hosts = comm.allgather(socket.gethostname())   # rank -> host, in metrics.json
        self.run_id = None                      # set by resume()
        self._lock = None                       # rank 0: the fd holding STATE_DIR/.lock
        self._out_lock = None                   # rank 0: the fd holding OUT/.lock
        self._plot_warned = set()

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
        """PNG of the training curves on rank 0: one panel per (ylabel, keys, log_scale). A
        failure to write it is reported once (a warning) and does not stop the run."""
        if self.rank != 0 or not history:
            return
        try:
            self._plot(history, panels, name, x)
        except Exception as exc:        # a missing plot is not worth the run: said once
            if name not in self._plot_warned:
                self._plot_warned.add(name)
                self.say(f"warning: cannot write {self.out / name} "
                         f"({training_state.error_reason(exc)}); training goes on")

    def _plot(self, history, panels, name, x):
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
        save_figure(fig, self.out / name)

    def write_metrics(self, metrics):
        """OUT/metrics.json (collective: rank 0 writes it atomically, with the run id, each
        rank's host name and the run's arguments added); returns its path. RunError on every
        rank when it fails."""
        path = self.out / "metrics.json"

        def write():
            self.out.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, json.dumps(
                {**metrics, "run_id": self.run_id, "hosts": self.hosts,
                 "args": vars(self.args)}, indent=2,
                default=str))
        on_rank0(self.comm, write, what=f"cannot write {path}", exit_code=1)
        return path

    def finish(self, iteration, epoch, progress, metrics, started):
        """End of a run (collective): save the final training state, then write metrics.json
        with its path and the seconds since `started` added. Returns (metrics, json path)."""
        metrics = dict(metrics, training_state=self.save(iteration, epoch, progress),
                       total_seconds=time.perf_counter() - started)
        path = self.write_metrics(metrics)
        self.close()
        return metrics, path

    # -- training state -------------------------------------------------------------------
    def resume(self):
        """Start the run (collective, see the class) and load the state --resume names ('auto':
        the newest valid file of the state directory's run, damaged ones skipped and reported;
        a fresh start when the directory holds no state file). Returns dict(iteration, epoch,
        args, progress, run_id) or None. Raises RunError (folders, lock, another run's states)
        or FileFormatError (a named file that is missing or damaged) on every rank."""
        if self.run_id is not None:
            raise RuntimeError("TrainingSession.resume() is called once, at the start")
        try:
            self._check_disk_dir()
            run_id, path, notes = on_rank0(self.comm, self._start)
            if len(set(self.hosts)) > 1:
                self.say(f"ranks on {len(set(self.hosts))} hosts: " + ", ".join(
                    f"{host} ({self.hosts.count(host)})" for host in dict.fromkeys(self.hosts)))
            for note in notes:
                self.say(note)
            if path is None:
                self.run_id = run_id
                return None
            info = training_state.load(path, model=self.model, optimizer=self.optimizer,
                                       scheduler=self.scheduler, comm=self.comm)
            changed = _changed_options(info["args"], vars(self.args))
            if changed:
                raise RunError(f"{path} was saved with other options ({changed}): a resumed run "
                               "goes on with the options it was saved with; drop them from the "
                               "command line, or start a new run with a new --out")
        except BaseException:
            self.close()                        # a run that does not start holds no lock
            raise
        self.run_id = info["run_id"]
        self.say(f"resumed from {path} (iteration {info['iteration']})")
        return info

    def _check_disk_dir(self):
        """Collective: --disk-dir (a node-local scratch folder, maybe) writable on every rank."""
        disk_dir = getattr(self.args, "disk_dir", None)
        error = None
        if disk_dir is not None:
            try:
                _check_writable(disk_dir, "--disk-dir")
            except RunError as exc:
                error = str(exc)
        errors = [e for e in self.comm.allgather(error) if e is not None]
        if errors:
            raise RunError(errors[0] + ("" if error is not None else " (on another rank)"))

    def _start(self):
        """Rank 0: folders writable, lock taken, state directory checked. Returns (run id of a
        fresh run or None, the state file to load or None, lines to print)."""
        _check_writable(self.out, "--out")
        _check_writable(self.state_dir, "--state-dir" if self.args.state_dir else "OUT/state")
        self._lock, warning = _lock(self.state_dir)
        notes = [warning] if warning else []
        files = training_state.scan(self.state_dir)
        runs = sorted({f.run_id or "-" for f in files if f.run_id is not None})
        unknown = [f for f in files if f.run_id is None]
        where = f"the state directory {self.state_dir}"
        spec = self.args.resume
        if spec is None:
            if files:
                what = ", ".join(([f"run {', '.join(runs)}"] if runs else []) + (
                    [f"{len(unknown)} unreadable or older file(s)"] if unknown else []))
                raise RunError(f"{where} already holds {len(files)} training state file(s) of "
                               f"another run ({what}): continue it with --resume auto, or use a "
                               "new --out or --state-dir")
            run_id, claimed = self._claim_out(uuid.uuid4().hex)
            return run_id, None, notes + claimed
        if spec != "auto":
            run, _ = training_state.read_header(spec)
            foreign = [f for f in files if f.run_id != run]
            if run is not None and foreign:
                raise RunError(f"{where} holds {len(foreign)} training state file(s) of another "
                               f"run than {spec} (e.g. {foreign[0].path}): resume into a new "
                               "--out or --state-dir")
            if run is not None:
                notes += self._claim_out(run)[1]
            return None, spec, notes
        if not files:
            run_id, claimed = self._claim_out(uuid.uuid4().hex)
            return run_id, None, notes + claimed + [
                f"no training state in {self.state_dir}: starting fresh"]
        if len(runs) > 1:
            raise RunError(f"{where} holds the states of {len(runs)} runs ({', '.join(runs)}): "
                           "resume one with --resume FILE into a new --out or --state-dir, or "
                           "move the others away")
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise RunError(f"{where}: {unknown[0].path}{more} may belong to another run, its "
                           f"header cannot be read ({unknown[0].problem}): move it away, or "
                           "use a new --out or --state-dir")
        notes += self._claim_out(files[0].run_id)[1]
        path, skipped = training_state.latest_valid(self.state_dir, run_id=files[0].run_id)
        notes += [f"skipping {bad}: {why}" for bad, why in skipped]
        if path is None:
            raise RunError(f"no valid training state in {self.state_dir}: its {len(files)} "
                           f"file(s) are damaged (newest: {skipped[0][1]}); move them away to "
                           "start fresh, or use a new --out or --state-dir")
        return None, path, notes

    def _claim_out(self, run_id):
        """Rank 0: make OUT the results folder of run `run_id` (OUT/.pnode-run names it). While
        the run lives, rank 0 holds OUT/.lock (unless OUT is the state directory, whose lock
        covers it). RunError if another live run uses OUT, or OUT holds another run's results;
        a folder whose run left no results (killed or failed before it wrote any) is taken
        over. Returns (run_id, lines to print)."""
        notes = []
        if self.out.resolve() != self.state_dir.resolve():
            self._out_lock, warning = _lock(self.out)
            notes += [warning] if warning else []
        mine = run_id or "-"
        owner = _results_owner(self.out)
        if owner is None:
            try:                           # exclusive: of two runs starting at once, one wins
                fd = os.open(self.out / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, f"{mine}\n".encode())
                os.close(fd)
                return run_id, notes
            except FileExistsError:
                owner = _results_owner(self.out)
        if owner == mine:
            return run_id, notes
        results = _results(self.out)
        if results:
            raise RunError(f"--out {self.out} holds the results of another run ({owner}: "
                           f"{', '.join(results)}); they are not replaced: use a new --out, or "
                           "continue that run with --resume auto and its --state-dir")
        _write_atomically(self.out / OWNER_FILE, f"{mine}\n")
        return run_id, notes + [f"--out {self.out}: run {owner} left no results there; this "
                                "run takes it over"]

    def save(self, iteration, epoch, progress):
        """Write the training state (collective); returns its path. RunError (exit status 1)
        on every rank when it cannot be written: the temporary file is removed, the earlier
        states are kept."""
        if self.run_id is None:
            raise RuntimeError("call TrainingSession.resume() (it starts the run) before saving")
        try:
            return training_state.save(self.state_dir, model=self.model,
                                       optimizer=self.optimizer, scheduler=self.scheduler,
                                       iteration=iteration, epoch=epoch, comm=self.comm,
                                       args=vars(self.args), progress=progress,
                                       run_id=self.run_id)
        except training_state.SaveError as exc:
            raise RunError(str(exc), exit_code=1) from None

    def close(self):
        """Release the locks on the state directory and OUT (also released when the process
        ends)."""
        for name in ("_lock", "_out_lock"):
            if getattr(self, name) is not None:
                os.close(getattr(self, name))
                setattr(self, name, None)

    def train(self, loop):
        """What every app's training shares: start the run (`resume`; a --resume file that is
        missing or damaged is a one-line error), run `loop(resumed)` under the stop signals,
        and turn a stop into its exit status. Returns (status, what loop returned): status 0
        when the loop ran to its end, 75 (REQUEUE_EXIT_CODE) when a stop signal saved the
        state, 2 when the run could not start, 1 when a solve failed (a PnodeError on every
        rank: one line naming its cause and the newest state to resume from)."""
        try:
            resumed = self.resume()
        except FileFormatError as exc:
            return self.fail(exc), None
        with self:
            try:
                return 0, loop(resumed)
            except Stopped as stop:
                return stop.exit_code, None
            except PnodeError as exc:        # raised on every rank (a solve that failed)
                return self._failed_solve(exc), None

    def _failed_solve(self, exc):
        """One line on rank 0 for a solve that failed during training (its cause, and where
        the run can continue from); exit status 1."""
        if self.rank == 0:
            mine = [f.path for f in training_state.scan(self.state_dir)
                    if f.run_id == self.run_id]
            where = (f"the newest training state is {mine[-1]}: continue with --resume auto "
                     "once the cause is fixed" if mine else
                     "no training state was saved yet (--save-every K saves one every K "
                     "iterations)")
            self.fail(f"{type(exc).__name__}: {' '.join(str(exc).split())}; {where}")
        return 1

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
