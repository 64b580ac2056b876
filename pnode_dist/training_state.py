"""Training state in HDF5: save it atomically with a checksum, keep the last few, and restore
it exactly (bitwise) on every rank.

Layout (format 'pnode_dist.training_state', one file per save, written by rank 0):
  root attributes: format, format_version, iteration, epoch, nranks, created, checksum (SHA-256
                   of every dataset's bytes and attributes below, in name order), args (JSON),
                   progress (JSON: the caller's counters such as the batch position)
  /model/<name>             parameters and buffers (state_dict order)
  /optimizer/state/<i>/<k>  tensors of the optimizer state; other values in attributes
  /optimizer attributes     param_groups (JSON)
  /scheduler attributes     state (JSON), when a scheduler is given
  /rng/rank_<r>             torch's CPU generator state of rank r
  /rng/numpy_rank_<r>       numpy's global MT19937 keys of rank r (position etc. in attributes)
  /rng attributes           python_rank_<r>: Python's `random` state of rank r (JSON)
"""
import glob
import hashlib
import json
import os
import random

import numpy as np
import torch

from .h5format import TRAINING_STATE_FORMAT as FORMAT
from .h5format import FileFormatError, utc_now

VERSION = 1
_PATTERN = "state-{:010d}.h5"


def _checksum(f):
    """SHA-256 over every dataset (name, dtype, shape, bytes) and every group/dataset attribute
    except the root's checksum itself."""
    h = hashlib.sha256()

    def visit(name, obj):
        h.update(name.encode())
        for k in sorted(obj.attrs):
            h.update(k.encode() + repr(obj.attrs[k]).encode())
        if hasattr(obj, "dtype"):
            data = obj[()]
            h.update(str(data.dtype).encode() + str(data.shape).encode())
            h.update(np.ascontiguousarray(data).tobytes())
    f.visititems(visit)
    for k in sorted(f.attrs):
        if k != "checksum":
            h.update(k.encode() + repr(f.attrs[k]).encode())
    return h.hexdigest()


def _tensor_dataset(group, name, tensor):
    group.create_dataset(name, data=tensor.detach().cpu().numpy())


def save(directory, *, model, optimizer, iteration, epoch, comm, scheduler=None, args=None,
         progress=None, keep=3):
    """Write the training state (collective: rank 0 writes, every rank's RNG state included);
    returns the file's path. Written to a temporary name, flushed, then renamed, so a crash
    leaves either the previous files or a complete new one; only the newest `keep` remain."""
    import h5py
    rng_states = comm.gather(_rng_states(), root=0)
    path = None
    if comm.Get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, _PATTERN.format(iteration))
        tmp = path + ".tmp"
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=FORMAT, format_version=VERSION, iteration=iteration,
                           epoch=epoch, nranks=comm.Get_size(), created=utc_now(),
                           args=json.dumps(args or {}, sort_keys=True, default=str),
                           progress=json.dumps(progress or {}, sort_keys=True))
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
            f.attrs["checksum"] = _checksum(f)
            f.flush()
        with open(tmp, "rb") as raw:
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        for old in sorted(glob.glob(os.path.join(directory, "state-*.h5")))[:-keep]:
            os.remove(old)
    return comm.bcast(path, root=0)


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
                _tensor_dataset(g, key, value)
                g[key].attrs["torch_dtype"] = str(value.dtype).replace("torch.", "")
            else:
                g.attrs[key] = json.dumps(value)


def _read_optimizer(group):
    state = {}
    for index, g in group["state"].items():
        entries = {k: json.loads(v) for k, v in g.attrs.items()}
        for key, ds in g.items():
            dtype = getattr(torch, ds.attrs["torch_dtype"])
            entries[key] = torch.from_numpy(np.array(ds[()])).to(dtype)
        state[int(index)] = entries
    return {"state": state, "param_groups": json.loads(group.attrs["param_groups"])}


def verify(path):
    """None if the file is a complete training state whose checksum matches, else why not."""
    import h5py
    if not os.path.isfile(path):
        return "no such file"
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                return "not a pnode_dist training state"
            if f.attrs.get("checksum") != _checksum(f):
                return "checksum mismatch (the file was modified or damaged)"
    except (OSError, KeyError, RuntimeError) as exc:
        return f"unreadable ({exc}); probably truncated"
    return None


def latest_valid(directory):
    """(path, [(skipped path, reason)...]): the newest state file that verifies."""
    skipped = []
    for path in sorted(glob.glob(os.path.join(directory, "state-*.h5")), reverse=True):
        problem = verify(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def load(path, *, model, optimizer, comm, scheduler=None):
    """Restore a state saved by `save` on every rank (rank 0 reads and verifies, then
    broadcasts). Returns dict(iteration, epoch, args, progress). Raises FileFormatError."""
    import h5py
    payload, error = None, None
    if comm.Get_rank() == 0:
        error = verify(path)
        if error is None:
            with h5py.File(path, "r") as f:
                payload = {
                    "model": {k: torch.from_numpy(np.array(v[()])) for k, v in f["model"].items()},
                    "optimizer": _read_optimizer(f["optimizer"]),
                    "scheduler": (json.loads(f["scheduler"].attrs["state"])
                                  if "scheduler" in f else None),
                    "rng": [_read_rng(f["rng"], r) for r in range(int(f.attrs["nranks"]))],
                    "info": {"iteration": int(f.attrs["iteration"]),
                             "epoch": int(f.attrs["epoch"]),
                             "args": json.loads(f.attrs["args"]),
                             "progress": json.loads(f.attrs["progress"])}}
            if len(payload["rng"]) != comm.Get_size():
                error = (f"saved with {len(payload['rng'])} ranks, resumed with "
                         f"{comm.Get_size()}: resume with the same number of ranks")
    error = comm.bcast(error, root=0)
    if error is not None:
        raise FileFormatError(f"{path}: {error}")
    payload = comm.bcast(payload, root=0)
    state = model.state_dict()
    with torch.no_grad():
        for name, value in payload["model"].items():
            state[name].copy_(value)
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    _set_rng_states(payload["rng"][comm.Get_rank()])
    return payload["info"]
