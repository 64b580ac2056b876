"""``pnode-inspect FILE...``: read pnode_dist's HDF5 files and list what they hold.

For checkpoint files: the steps, times, step sizes, shapes, norms and sizes of the checkpoints,
and the ranks; for training states and other pnode_dist files: their datasets and attributes
(arguments, iteration, progress, parameter norms, checksum status). The entry point is
:func:`main`; :func:`describe` is the same reading for scripts.

Examples
--------
::

    pnode-inspect runs/ckpt/*.h5            # a table per file
    python -m pnode_dist.inspect --json F   # the same as JSON, for scripts

Notes
-----
Exit status 0 when every file was read, 1 otherwise (each failure says why on stderr: a file
that is missing, truncated or not written by pnode_dist). Sealed files (training states, kept
checkpoint files) are verified against their whole-file checksum before HDF5 reads them; other
files are read in a child process with a time limit, so no file can hang or crash
pnode-inspect. Only regular files are opened; datasets declared larger than the file (or 1 GiB)
are listed without their norms; text from a file is printed with control characters escaped.
"""
import argparse
import json
import math
import os
import stat
import sys
import time

import numpy as np

from . import _h5format, _sealed
from ._h5format import CHECKPOINT_FORMAT, FORMAT_PREFIX, TRAINING_STATE_FORMAT
from .errors import FileFormatError
from .training import state as training_state
from ._sealed import open_regular


MAX_READ_BYTES = 1 << 30     # describe reads no dataset or attribute declared larger than this
_BLOCK_BYTES = 64 << 20      # (nor larger than the file); norms are summed in blocks of this
UNVERIFIED_SECONDS = 20      # time limit for reading a file without a checksum header (plus
                             # a second per 50 MB)


def _open(path):
    """h5py.File of a regular file, read-only. The path is stat'ed first: a directory, FIFO,
    socket or device is refused without being opened (opening a FIFO would block)."""
    import h5py
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: cannot be read "
                              f"({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(mode):
        raise FileFormatError(f"{path}: is a directory; pass the .h5 files inside it")
    if not stat.S_ISREG(mode):
        raise FileFormatError(f"{path}: not a regular file (a FIFO, socket or device); "
                              "pnode_dist writes regular HDF5 files")
    try:
        return h5py.File(path, "r")
    except Exception as exc:
        try:
            with open(path, "rb") as raw:
                head = raw.read(8)
        except OSError as why:
            raise FileFormatError(f"{path}: cannot be read ({why.strerror or why})") from None
        if head != b"\x89HDF\r\n\x1a\n":
            raise FileFormatError(f"{path}: not an HDF5 file (pnode_dist writes HDF5 "
                                  "checkpoint and training-state files)") from None
        raise FileFormatError(f"{path}: HDF5 file cannot be read, probably truncated or "
                              f"still being written ({exc})") from None


def _attr(value):
    """An HDF5 attribute as a plain, JSON-ready Python value (bytes decoded, arrays as lists,
    anything else h5py may return, such as references, as its repr)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_attr(v) for v in value]
    if isinstance(value, bytes):
        return _attr(value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return repr(value)


def _declared_bytes(obj):
    """Bytes a dataset or attribute declares (shape x item size), before reading anything."""
    shape = obj.shape
    return 0 if shape is None else math.prod(shape) * obj.dtype.itemsize


def _attributes(obj, limit):
    """obj's attributes as plain values; one declared larger than `limit` bytes is not read."""
    out = {}
    for name in obj.attrs:
        size = _declared_bytes(obj.attrs.get_id(name))
        out[name] = (f"<not read: declares {size} bytes>" if size > limit
                     else _attr(obj.attrs[name]))
    return out


def _child(group, name):
    """group[name] if it is an object of this file (a hard link): soft and external links,
    which could lead to other files, FIFOs or cycles, are an error. None if absent."""
    import h5py
    link = group.get(name, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise ValueError(f"{name!r} is a {type(link).__name__}, not an object of this file")
    return group[name]


def _unreadable(ds, limit):
    """Why the data of dataset `ds` is not read (None: it can be read)."""
    size = _declared_bytes(ds)
    if size > limit:
        return (f"declares {size} bytes, more than the file or the {MAX_READ_BYTES}-byte "
                "limit")
    if ds.is_virtual or ds.id.get_create_plist().get_external_count():
        return "its data lies in other files"
    return None


def _norm(ds):
    """2-norm of a numeric dataset (read as float64, in blocks along its first axis)."""
    if ds.shape is None or ds.size == 0:
        return 0.0
    if len(ds.shape) == 0:
        x = np.asarray(ds[()], np.float64).ravel()
        return float(np.sqrt(x.dot(x)))
    row = max(1, math.prod(ds.shape[1:])) * 8
    step = max(1, _BLOCK_BYTES // row)
    total = 0.0
    for i in range(0, ds.shape[0], step):
        x = np.asarray(ds[i:i + step], np.float64).ravel()
        total += float(x.dot(x))
    return float(np.sqrt(total))


def describe(path):
    """What a pnode_dist HDF5 file holds, as a JSON-ready dict.

    Whatever the file holds, a problem is a FileFormatError naming it; no dataset or attribute
    declared larger than the file (or ``MAX_READ_BYTES``, 1 GiB) is read, and no link to
    another file is followed.

    Parameters
    ----------
    path : str
        The file.

    Returns
    -------
    dict
        ``file``, ``bytes``, ``format``, ``attributes`` (the root's), ``checksum_status``
        (``'ok'`` or ``'not verified ...'``); for a checkpoint file ``checkpoints`` (one row
        per checkpoint: ``name``, ``step``, ``time``, ``step_size``, ``shape``, ``dtype``,
        ``norm``, ``bytes``, and ``skipped`` with why its data was not read) and, with step
        times, ``steps``, ``t_start``, ``t_end``; for another pnode_dist file ``datasets``
        (``name``, ``shape``, ``dtype``, ``attributes``, ``norm`` or ``skipped``).

    Raises
    ------
    FileFormatError
        A file that is missing, not a regular file (a directory, FIFO, socket or device), not
        HDF5, not written by pnode_dist, a sealed file that fails its checksum or whose header
        disagrees with its content, a damaged or truncated file, or one that HDF5 hangs on or
        crashes reading.

    Notes
    -----
    A sealed file (a training state, a kept checkpoint file) is opened with HDF5 only once its
    whole-file checksum matches; a file without that header (a checkpoint file still being
    written or left by a run that stopped, a file of an older pnode_dist or of another program)
    is read in a child process with a time limit (20 s plus a second per 50 MB), since a damaged
    HDF5 file can make the HDF5 library loop for ever or crash: that is then a FileFormatError
    too.
    """
    kind = _sealed_kind(path)
    if kind is None:
        info = _isolated(_describe_hdf5, path, UNVERIFIED_SECONDS + os.path.getsize(path) / 50e6)
        info["checksum_status"] = "not verified (no pnode_dist checksum header)"
        return info
    info = _describe_hdf5(path)
    expected = {_h5format.CHECKPOINT_KIND: CHECKPOINT_FORMAT,
                training_state.KIND: TRAINING_STATE_FORMAT}[kind]
    if info["format"] != expected:
        raise FileFormatError(f"{path}: its header says {kind}, its content {info['format']}")
    info["checksum_status"] = "ok"
    return info


def _sealed_kind(path):
    """The kind of a sealed file whose checksum matches; None for a file that does not start
    with a pnode_dist header; FileFormatError (the file is not opened) for one that fails."""
    fd, _, problem = open_regular(path)
    if problem is not None:
        _open(path).close()          # raises, saying why (else the file changed meanwhile)
        raise FileFormatError(f"{path}: {problem}")
    try:
        head = os.read(fd, _sealed.USERBLOCK)
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    kind = _sealed.kind_of(head)
    versions = {training_state.KIND: training_state.VERSION,
                _h5format.CHECKPOINT_KIND: _h5format.FORMAT_VERSION}
    if kind is None:
        if head.startswith(_sealed.HDF5_SIGNATURE) or (len(head) == _sealed.USERBLOCK
                                                        and not any(head)):
            return None              # plain HDF5, or a kept checkpoint file not sealed yet
        raise FileFormatError(f"{path}: not an HDF5 file, nor a pnode_dist file with a sound "
                              "header (pnode_dist writes HDF5 checkpoint and training-state "
                              "files); not opened")
    if kind not in versions:
        raise FileFormatError(f"{path}: a pnode_dist file of an unknown kind ({safe(kind)}): "
                              "damaged, or written by a newer pnode_dist; not opened")
    problem, _, _ = _sealed.read_verified(path, kind, versions[kind])
    if problem is not None:
        raise FileFormatError(f"{path}: a pnode_dist {kind} file that fails its check: "
                              f"{problem}; not opened")
    return kind


def _describe_hdf5(path):
    """describe's reading of the HDF5 content (no checksum involved)."""
    f = _open(path)
    try:
        size = os.path.getsize(path)
        limit = min(size, MAX_READ_BYTES)
        attributes = _attributes(f, limit)
        fmt = attributes.get("format", "")
        if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
            raise FileFormatError(f"{path}: an HDF5 file not written by pnode_dist (no "
                                  f"'format' attribute starting with {FORMAT_PREFIX!r})")
        info = {"file": str(path), "bytes": size, "attributes": attributes}
        if fmt == CHECKPOINT_FORMAT:
            info.update(_describe_checkpoints(f, limit))
        else:
            info["datasets"] = _describe_datasets(f, limit)
    except FileFormatError:
        raise
    except Exception as exc:         # h5py: OSError, KeyError, ValueError, TypeError, ...
        raise FileFormatError(f"{path}: damaged pnode_dist file ({type(exc).__name__}: "
                              f"{exc}); it was probably truncated or modified") from None
    finally:
        try:
            f.close()
        except Exception:
            pass
    info["format"] = fmt
    return info


def _isolated(read, path, seconds):
    """read(path) (a JSON-ready result) in a forked child process that may take at most
    `seconds`: a hang or a crash there is a FileFormatError here. The child touches only HDF5
    and the pipe, dies of a crash signal (PETSc's handlers are reset), prints nothing, and
    leaves with os._exit (no exit handlers, no MPI)."""
    import select
    import signal
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                              # the child
        try:
            os.close(r)
            for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL):
                signal.signal(sig, signal.SIG_DFL)            # not PETSc's handler (an abort)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)                               # no HDF5 error stacks
            try:
                result = {"info": read(path)}
            except FileFormatError as exc:
                result = {"error": str(exc)}
            except BaseException as exc:
                result = {"error": f"{path}: unexpected {type(exc).__name__}: {exc}"}
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise FileFormatError(f"{path}: HDF5 did not finish reading it within "
                                      f"{seconds:.0f} s (a damaged file); stopped")
            block = os.read(r, 1 << 16)
            if not block:
                break
            chunks.append(block)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or not chunks:
        why = (signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status)
               else f"exit status {os.WEXITSTATUS(status)}")
        raise FileFormatError(f"{path}: HDF5 crashed reading it ({why}): the file is damaged")
    result = json.loads(b"".join(chunks))
    if "error" in result:
        raise FileFormatError(result["error"])
    return result["info"]


def _describe_checkpoints(f, limit):
    import h5py
    group = _child(f, "checkpoints")
    if group is not None and not isinstance(group, h5py.Group):
        raise ValueError("/checkpoints is not a group")
    rows = []
    for name in sorted(group) if group is not None else []:
        ds = _child(group, name)
        if not isinstance(ds, h5py.Dataset):
            raise ValueError(f"/checkpoints/{name} is not a dataset")
        a = _attributes(ds, limit)
        row = {"name": name, "step": int(a["step"]), "time": float(a["time"]),
               "step_size": float(a["step_size"]), "shape": list(ds.shape or ()),
               "dtype": str(ds.dtype), "norm": None, "bytes": _declared_bytes(ds)}
        why = _unreadable(ds, limit) or (None if ds.dtype.kind in "fiu" else "not numeric")
        if why is None:
            row["norm"] = _norm(ds)
        else:
            row["skipped"] = why
        rows.append(row)
    out = {"checkpoints": rows}
    times = _child(f, "step_times")
    if times is not None:
        if not isinstance(times, h5py.Dataset) or _unreadable(times, limit) \
                or times.dtype.kind not in "fiu" or len(times.shape or ()) != 1 \
                or times.shape[0] == 0:
            raise ValueError("/step_times is not a non-empty numeric 1-D dataset in the file")
        times = np.asarray(times[()], np.float64)
        out["steps"] = int(len(times) - 1)
        out["t_start"], out["t_end"] = float(times[0]), float(times[-1])
    return out


def _describe_datasets(f, limit):
    """Every dataset of a file: path, shape, dtype, norm (numeric), attributes; a dataset
    whose data is not read (see _unreadable) has 'skipped' (why) instead of a norm."""
    import h5py
    rows = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            row = {"name": name, "shape": list(obj.shape or ()), "dtype": str(obj.dtype),
                   "attributes": _attributes(obj, limit)}
            if obj.dtype.kind in "fiu" and _declared_bytes(obj):
                why = _unreadable(obj, limit)
                if why is None:
                    row["norm"] = _norm(obj)
                else:
                    row["skipped"] = why
            rows.append(row)
    f.visititems(visit)
    return rows



def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def safe(value):
    """``str(value)`` with every non-printable character escaped as in a Python literal
    (``\\n``, ``\\r``, ``\\x1b``, ``\\u202e``, ...): text from a file can neither break lines
    nor send terminal escape sequences, so it cannot fake output lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def format_text(info):
    """A file's description (from :func:`describe`) as readable lines, everything taken from
    the file escaped (see :func:`safe`); returns one string."""
    a = {safe(k): safe(v) for k, v in info["attributes"].items()}
    lines = [f"{safe(info['file'])}  ({safe(info['format'])}, {_human_bytes(info['bytes'])}, "
             f"checksum {safe(info.get('checksum_status', 'not verified'))})"]
    if info["format"] == CHECKPOINT_FORMAT:
        lines.append(f"  rank {a.get('rank')} of {a.get('nranks')}, method {a.get('method')}, "
                     f"model dtype {a.get('dtype')}, shard {a.get('local_shape')} of global "
                     f"{a.get('global_shape')}, created {a.get('created')}")
        if "steps" in info:
            lines.append(f"  forward solve: {info['steps']} steps from t={info['t_start']:g} "
                         f"to t={info['t_end']:g}")
        rows = info["checkpoints"]
        lines.append(f"  {len(rows)} checkpoint(s) in the file")
        if rows:
            lines.append(f"  {'step':>8} {'time':>14} {'step size':>12} {'shape':>14} "
                         f"{'norm':>14} {'size':>10}")
            for r in rows:
                norm = "not read" if r["norm"] is None else f"{r['norm']:.8g}"
                lines.append(f"  {r['step']:>8} {r['time']:>14.8g} {r['step_size']:>12.5g} "
                             f"{str(r['shape']):>14} {norm:>14} "
                             f"{_human_bytes(r['bytes']):>10}")
                if "skipped" in r:
                    lines.append(f"  {'':>8} (data not read: {safe(r['skipped'])})")
    else:
        for k, v in a.items():
            if k != "format":
                lines.append(f"  {k}: {v}")
        for d in info["datasets"]:
            norm = f"  norm {d['norm']:.8g}" if "norm" in d else ""
            if "skipped" in d:
                norm = f"  (data not read: {safe(d['skipped'])})"
            lines.append(f"  /{safe(d['name'])}  {safe(d['dtype'])} {d['shape']}{norm}")
    return "\n".join(lines)


def main(argv=None):
    """The ``pnode-inspect`` command (also ``python -m pnode_dist.inspect``).

    Describes every file (see :func:`describe`) and prints a table per file, or with
    ``--json`` one JSON document (a list with one object per file that could be read). Each
    file that cannot be read is one line on stderr saying why; the other files are still
    listed.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (``FILE... [--json]``); None: the command line's.

    Returns
    -------
    int
        The exit status: 0 when every file was read, 1 otherwise.

    Raises
    ------
    SystemExit
        From argparse, for ``--help`` (status 0) or bad usage such as no file (status 2).
    """
    parser = argparse.ArgumentParser(
        prog="pnode-inspect",
        description="List what pnode_dist HDF5 files (checkpoints, training states) hold.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="HDF5 files written by pnode_dist")
    parser.add_argument("--json", action="store_true", help="print one JSON document (a list "
                        "with one object per file that could be read)")
    args = parser.parse_args(argv)
    infos, failed = [], 0
    for path in args.files:
        try:
            infos.append(describe(path))
        except FileFormatError as exc:
            print(f"pnode-inspect: {safe(exc)}", file=sys.stderr)
            failed += 1
        except Exception as exc:        # describe turns a file's problems into the above
            print(f"pnode-inspect: {safe(path)}: unexpected {type(exc).__name__}: {safe(exc)}",
                  file=sys.stderr)
            failed += 1
    if args.json:
        print(json.dumps(infos, indent=2))
    else:
        print("\n\n".join(format_text(i) for i in infos))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
