"""Training state in HDF5: :func:`save` it atomically with a whole-file checksum, keep the last
few of each run, :func:`verify` a file without trusting it, find the newest valid one
(:func:`latest_valid`), and :func:`load` it exactly (bitwise) on every rank. A run id ties the
files to their run: pruning keeps the newest ``keep`` of the saving run only and never touches
other files. The file layout is described under :func:`save`.
"""
import collections
import glob
import io
import json
import os
import random
import re

import numpy as np
import torch

from .._h5format import TRAINING_STATE_FORMAT as FORMAT
from .._h5format import utc_now
from .. import _sealed
from ..errors import FileFormatError, InputError, PnodeError

VERSION = 2
KIND = "training state"
_PATTERN = "state-{:010d}.h5"
USERBLOCK = _sealed.USERBLOCK        # the header's bytes (h5py's userblock: HDF5 skips them)
MAGIC = _sealed.magic(KIND)          # a state file's first bytes
_RUN_ID = re.compile(r"[0-9A-Za-z_.-]{1,64}")
open_regular = _sealed.open_regular

StateFile = collections.namedtuple("StateFile", "path run_id problem")
StateFile.__doc__ = """A ``state-*.h5`` file of a directory (:func:`scan`).

Attributes
----------
path : str
    The file.
run_id : str or None
    The run id from its header (None when the header cannot be read).
problem : str or None
    Why the header cannot be read (None when it can).
"""


class SaveError(PnodeError):
    """The training state could not be written.

    Raised by :func:`save` on every rank when rank 0 cannot write (a full disk, an unwritable
    directory, a file of the same name from another run); the temporary file is removed and
    the earlier states are kept. A ``pnode_dist.PnodeError``.

    Notes
    -----
    What to do: free disk space or choose another directory, then resume from the newest
    valid state (:func:`latest_valid`).
    """


def _header_bytes(length, run_id, digest):
    return _sealed.header_bytes(KIND, VERSION, length, run_id, digest)


def read_header(path):
    """The run id in a state file's header, read without trusting the rest of the file.

    A bounded read of the first 512 bytes; the rest of the file is not checked (a truncated
    file still names its run). Never raises.

    Returns
    -------
    run_id : str or None
        The run id ('' for a state saved without one), or None when the header cannot be read.
    problem : str or None
        Why the header cannot be read, or None.
    """
    fd, size, problem = open_regular(path)
    if problem is not None:
        return None, problem
    try:
        problem, header = _sealed.parse_header(_sealed.read_up_to(fd, USERBLOCK), size, KIND,
                                               VERSION, check_size=False)
    except Exception as exc:
        return None, f"unreadable ({exc})"
    finally:
        os.close(fd)
    return (None, problem) if problem else (header.run_id, None)


def _read_verified(path, keep=False):
    """(problem, header, data): see _sealed.read_verified."""
    return _sealed.read_verified(path, KIND, VERSION, keep)


def _content_problem(f, header):
    """Why an opened (checksum-verified) file is not a training state of this format, or None."""
    if f.attrs.get("format") != FORMAT:
        return "not a pnode_dist training state"
    if f.attrs.get("format_version") != VERSION:
        return f"format version {f.attrs.get('format_version')!r} inside, {VERSION} in its header"
    if str(f.attrs.get("run_id", "")) != header.run_id:
        return "its run id differs between header and content"
    missing = [g for g in ("model", "optimizer", "rng") if g not in f]
    if missing:
        return f"no {', '.join(missing)} group"
    return None


def _write_file(path, data):
    """`data` into the file at `path` (created or truncated), flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:_CHUNK]):]
        os.fsync(fd)
    finally:
        os.close(fd)


_CHUNK = 1 << 24


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                                     # not every filesystem syncs directories
    finally:
        os.close(fd)


def error_reason(exc):
    """One line saying why an I/O step failed (``'no space left on device'``, the OS's reason
    with the file name, or the first line of the exception's message)."""
    import errno
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "errno = 28" in text \
            or "No space left" in text:
        return "no space left on device"
    if isinstance(exc, OSError) and exc.errno and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def scan(directory):
    """Every ``state-*.h5`` of ``directory`` as a :class:`StateFile` (run id from its header),
    oldest first."""
    return [StateFile(path, *read_header(path))
            for path in sorted(glob.glob(os.path.join(glob.escape(str(directory)), "state-*.h5")))]


def _tensor_dataset(group, name, tensor):
    group.create_dataset(name, data=tensor.detach().cpu().numpy())


def save(directory, *, model, optimizer, iteration, epoch, comm, scheduler=None, args=None,
         progress=None, keep=3, run_id=None):
    """Write the training state; collective: rank 0 writes, every rank's RNG state included.

    The file is built in memory (HDF5 never writes to the disk, so a full disk is a plain write
    error), sealed with its checksum header, written to a temporary name, flushed, then
    renamed, so a crash leaves either the previous files or a complete new one. Afterwards only
    the newest ``keep`` files *of this run id* remain; files of other runs or with unreadable
    headers are never removed, nor replaced.

    Parameters
    ----------
    directory : str
        Where ``state-<iteration>.h5`` goes (created if needed).
    model : nn.Module
        Its ``state_dict`` (parameters and buffers) is saved.
    optimizer : torch.optim.Optimizer
        Its state (tensors, lists of tensors such as L-BFGS's history, other values).
    iteration : int
        The training iteration; it names the file.
    epoch : int
        The training epoch.
    comm : mpi4py communicator
        The ranks (every rank's torch, numpy and Python ``random`` states are gathered).
    scheduler : optional
        A learning-rate scheduler whose ``state_dict`` is saved.
    args : dict, optional
        The run's arguments (saved as JSON).
    progress : dict, optional
        The caller's counters, such as the batch position (saved as JSON).
    keep : int, optional
        How many files of this run to keep, this one included (default 3; <= 0: all).
    run_id : str, optional
        Letters, digits and '_.-', at most 64; goes into the header and the root attributes.
        None: saved without one.

    Returns
    -------
    str
        The file's path, on every rank.

    Raises
    ------
    SaveError
        On every rank when rank 0 cannot write (a full disk, an unwritable directory): the
        temporary file is removed and the earlier states are kept. Also when a file of the
        same name exists that is not a state of this run (it is not replaced).
    pnode_dist.InputError
        For a ``run_id`` of other characters or longer than 64 (a ``ValueError`` too).

    Notes
    -----
    File layout (format version 2, one file per save, written by rank 0)::

        bytes [0, 512)   the sealed-file header of kind 'training state', version 2:
                         length, run id, SHA-256 of the whole file (`head -c 512` shows it)
        bytes [512, end) the HDF5 file (h5py userblock_size=512):
        root attributes: format, format_version, run_id, iteration, epoch, nranks, created,
                         args (JSON), progress (JSON: the caller's counters)
        /model/<name>             parameters and buffers (state_dict order)
        /optimizer/state/<i>/<k>  tensors of the optimizer state (a list of tensors, such as
                                  L-BFGS's history: a group of datasets 0..length-1, None
                                  entries absent); other values in attributes
        /optimizer attributes     param_groups (JSON)
        /scheduler attributes     state (JSON), when a scheduler is given
        /rng/rank_<r>             torch's CPU generator state of rank r
        /rng/numpy_rank_<r>       numpy's global MT19937 keys of rank r (position etc. in
                                  attributes)
        /rng attributes           python_rank_<r>: Python's `random` state of rank r (JSON)

    Reading checks the header and the checksum with plain file I/O before HDF5 sees a byte:
    :func:`verify` and :func:`load` never open a file whose checksum does not match. Files of
    version 1 (no header) are refused.

    Examples
    --------
    ::

        path = state.save("runs/x/state", model=model, optimizer=opt, iteration=it,
                          epoch=epoch, comm=MPI.COMM_WORLD, run_id=run_id)
    """
    import h5py
    if run_id is not None and not _RUN_ID.fullmatch(str(run_id)):
        raise InputError(f"run_id {run_id!r}: letters, digits and '_.-' only, at most 64")
    run_id = str(run_id or "")
    rng_states = comm.gather(_rng_states(), root=0)
    path = error = None
    if comm.Get_rank() == 0:
        path = os.path.join(directory, _PATTERN.format(iteration))
        tmp = path + ".tmp"
        try:
            os.makedirs(directory, exist_ok=True)
            if os.path.lexists(path):
                other, why = read_header(path)
                if other != run_id:
                    raise SaveError(
                        f"{path} exists and is not a state of this run ("
                        f"{'run ' + (other or '-') if other is not None else why}); it was "
                        "not replaced: move it away or save into another directory")
            image = io.BytesIO()             # HDF5 writes to memory; only plain writes
            with h5py.File(image, "w", userblock_size=USERBLOCK) as f:   # meet the disk
                _write_state(f, model, optimizer, scheduler, rng_states, iteration=iteration,
                             epoch=epoch, nranks=comm.Get_size(), run_id=run_id, args=args,
                             progress=progress)
            data = _sealed.sealed_bytes(image.getbuffer(), KIND, VERSION, run_id)
            del image
            try:
                _write_file(tmp, data)
                os.replace(tmp, path)
            except BaseException:
                _remove_quietly(tmp)
                raise
            _fsync_directory(directory)
            mine = [e.path for e in scan(directory) if e.run_id == run_id and e.path != path]
            for old in (mine[:max(0, len(mine) - (keep - 1))] if keep > 0 else []):
                os.remove(old)                   # the newest keep-1 others and this one remain
        except Exception as exc:
            error = (str(exc) if isinstance(exc, SaveError) else
                     f"cannot save the training state {path}: {error_reason(exc)} (the earlier "
                     "states are kept)")
    path, error = comm.bcast((path, error), root=0)
    if error is not None:
        raise SaveError(error)
    return path


def _write_state(f, model, optimizer, scheduler, rng_states, *, args, progress, **attrs):
    f.attrs.update(format=FORMAT, format_version=VERSION, created=utc_now(),
                   args=json.dumps(args or {}, sort_keys=True, default=str),
                   progress=json.dumps(progress or {}, sort_keys=True), **attrs)
    g = f.create_group("model")
    for name, tensor in model.state_dict().items():
        _tensor_dataset(g, name, tensor)
    _write_optimizer(f.create_group("optimizer"), optimizer.state_dict())
    if scheduler is not None:
        f.create_group("scheduler").attrs["state"] = json.dumps(scheduler.state_dict())
    g = f.create_group("rng")
    for r, (torch_state, numpy_state, python_state) in enumerate(rng_states):
        g.create_dataset(f"rank_{r}", data=torch_state)
        kind, keys, pos, has_gauss, cached = numpy_state
        d = g.create_dataset(f"numpy_rank_{r}", data=keys)
        d.attrs.update(kind=kind, pos=pos, has_gauss=has_gauss, cached_gaussian=cached)
        g.attrs[f"python_rank_{r}"] = json.dumps(python_state)


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _rng_states():
    """This rank's torch, numpy (global) and Python `random` generator states."""
    return torch.get_rng_state().numpy(), np.random.get_state(), random.getstate()


def _read_rng(group, rank):
    numpy_keys = group[f"numpy_rank_{rank}"]
    a = numpy_keys.attrs
    version, internal, gauss = json.loads(group.attrs[f"python_rank_{rank}"])
    return (np.array(group[f"rank_{rank}"][()]),
            (str(a["kind"]), np.array(numpy_keys[()]), int(a["pos"]), int(a["has_gauss"]),
             float(a["cached_gaussian"])),
            (version, tuple(internal), gauss))


def _set_rng_states(states):
    torch_state, numpy_state, python_state = states
    torch.set_rng_state(torch.from_numpy(torch_state))
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def _write_optimizer(group, state_dict):
    group.attrs["param_groups"] = json.dumps(state_dict["param_groups"])
    states = group.create_group("state")
    for index, entries in state_dict["state"].items():
        g = states.create_group(str(index))
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                _optimizer_tensor(g, key, value)
            elif _tensor_list(value):           # L-BFGS's history: lists of tensors and None
                items = g.create_group(key)
                items.attrs["length"] = len(value)
                for i, item in enumerate(value):
                    if item is not None:
                        _optimizer_tensor(items, str(i), item)
            else:
                g.attrs[key] = json.dumps(value)


def _tensor_list(value):
    return (isinstance(value, (list, tuple))
            and any(isinstance(v, torch.Tensor) for v in value)
            and all(v is None or isinstance(v, torch.Tensor) for v in value))


def _optimizer_tensor(group, name, tensor):
    _tensor_dataset(group, name, tensor)
    group[name].attrs["torch_dtype"] = str(tensor.dtype).replace("torch.", "")


def _read_optimizer_tensor(ds):
    return torch.from_numpy(np.array(ds[()])).to(getattr(torch, ds.attrs["torch_dtype"]))


def _read_optimizer(group):
    import h5py
    state = {}
    for index, g in group["state"].items():
        entries = {k: json.loads(v) for k, v in g.attrs.items()}
        for key, item in g.items():
            if isinstance(item, h5py.Group):
                entries[key] = [_read_optimizer_tensor(item[str(i)]) if str(i) in item else None
                                for i in range(int(item.attrs["length"]))]
            else:
                entries[key] = _read_optimizer_tensor(item)
        state[int(index)] = entries
    return {"state": state, "param_groups": json.loads(group.attrs["param_groups"])}


def verify(path):
    """Check a training-state file without trusting it: None if it is sound, else why not.

    Never raises and never hangs: non-regular files (FIFOs, directories, devices) are refused
    without reading, the header and the SHA-256 of the whole file are checked with plain reads
    (a damaged HDF5 file can make the HDF5 library loop for ever), and only a file that passes
    is opened with h5py.

    Parameters
    ----------
    path : str
        The file.

    Returns
    -------
    str or None
        None if ``path`` is a complete training state of this format whose checksum matches,
        else why not (a short reason).
    """
    problem, header, _ = _read_verified(path)
    if problem is not None:
        return problem
    try:
        import h5py
        with h5py.File(path, "r") as f:
            return _content_problem(f, header)
    except Exception as exc:
        return f"unreadable HDF5 content ({error_reason(exc)})"


def latest_valid(directory, run_id=None):
    """The newest state file of ``directory`` that verifies, and the ones skipped on the way.

    Parameters
    ----------
    directory : str
        A folder of ``state-*.h5`` files.
    run_id : str, optional
        Only files whose header names that run count ('' for states saved without one); files
        whose header cannot be read are then skipped (and listed), those of other runs ignored.

    Returns
    -------
    path : str or None
        The newest file that passes :func:`verify`, or None.
    skipped : list of (str, str)
        ``[(skipped path, reason)...]``, newest first.

    Notes
    -----
    Never raises for a damaged file: only headers and checksums are read before a file passes
    (see :func:`verify`); a header that claims more bytes than the file holds (a sparse file)
    is refused before the file is read.
    """
    skipped = []
    for entry in reversed(scan(directory)):
        if run_id is not None and entry.run_id != run_id:
            if entry.run_id is None:
                skipped.append((entry.path, entry.problem))
            continue
        problem = verify(entry.path)
        if problem is None:
            return entry.path, skipped
        skipped.append((entry.path, problem))
    return None, skipped


def load(path, *, model, optimizer, comm, scheduler=None):
    """Restore a state saved by :func:`save` on every rank, exactly (bitwise).

    Collective. Rank 0 verifies the file (as :func:`verify`) while reading it into memory,
    opens exactly the bytes it verified, and broadcasts; every rank then restores the model's
    parameters and buffers, the optimizer (and scheduler) state and its own torch, numpy and
    Python ``random`` generator states.

    Parameters
    ----------
    path : str
        A state file (see :func:`latest_valid` to find the newest valid one).
    model : nn.Module
        The model, restored in place (the same parameter names and shapes as saved).
    optimizer : torch.optim.Optimizer
        Restored with ``load_state_dict``.
    comm : mpi4py communicator
        The ranks, as many as when the state was saved.
    scheduler : optional
        A learning-rate scheduler, restored when the file holds one.

    Returns
    -------
    dict
        ``iteration``, ``epoch``, ``args``, ``progress`` and ``run_id`` as saved.

    Raises
    ------
    FileFormatError
        On every rank: a missing, damaged or foreign file, other ranks or another model than
        it was saved with (resume with the options it was saved with).
    """
    payload, error = None, None
    if comm.Get_rank() == 0:
        error, header, data = _read_verified(path, keep=True)
        if error is None:
            try:
                payload, error = _read_payload(data, header)
            except Exception as exc:
                error = f"unreadable HDF5 content ({error_reason(exc)})"
            del data
        if error is None and len(payload["rng"]) != comm.Get_size():
            error = (f"saved with {len(payload['rng'])} ranks, resumed with "
                     f"{comm.Get_size()}: resume with the same number of ranks")
    error = comm.bcast(error, root=0)
    if error is not None:
        raise FileFormatError(f"{path}: {error}")
    payload = comm.bcast(payload, root=0)
    try:
        _restore(payload, model, optimizer, scheduler, comm.Get_rank())
    except Exception as exc:                 # the same payload on every rank: raised everywhere
        raise FileFormatError(
            f"{path}: does not fit this model and optimizer ({error_reason(exc)}); resume with the "
            "options it was saved with") from None
    return payload["info"]


def _read_payload(data, header):
    """(payload, None) from a verified file's bytes, or (None, problem)."""
    import h5py
    with h5py.File(io.BytesIO(data), "r") as f:
        problem = _content_problem(f, header)
        if problem is not None:
            return None, problem
        return {
            "model": {k: torch.from_numpy(np.array(v[()])) for k, v in f["model"].items()},
            "optimizer": _read_optimizer(f["optimizer"]),
            "scheduler": (json.loads(f["scheduler"].attrs["state"])
                          if "scheduler" in f else None),
            "rng": [_read_rng(f["rng"], r) for r in range(int(f.attrs["nranks"]))],
            "info": {"iteration": int(f.attrs["iteration"]),
                     "epoch": int(f.attrs["epoch"]),
                     "args": json.loads(f.attrs["args"]),
                     "progress": json.loads(f.attrs["progress"]),
                     "run_id": header.run_id}}, None


def _restore(payload, model, optimizer, scheduler, rank):
    state = model.state_dict()
    if set(state) != set(payload["model"]):
        raise ValueError(f"parameters differ: saved {sorted(set(payload['model']) - set(state))},"
                       f" expected {sorted(set(state) - set(payload['model']))}")
    for name, value in payload["model"].items():
        if state[name].shape != value.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)} in the file, "
                             f"{tuple(state[name].shape)} in the model")
    with torch.no_grad():
        for name, value in payload["model"].items():
            state[name].copy_(value)
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    _set_rng_states(payload["rng"][rank])
