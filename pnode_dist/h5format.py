"""HDF5 layouts written by pnode_dist, and their reading for `pnode-inspect`.

Checkpoint files (the disk tier): one file per rank and solve,
    <dir>/<name>-<run>-<solve>.rank<r>-of-<n>.h5
  root attributes: format='pnode_dist.checkpoints', format_version, rank, nranks, method,
                   local_shape, global_shape, dtype (the model's), created (UTC ISO time)
  /checkpoints/step_<8 digits>: float64 array of this rank's shard of y_step, attributes
                   time, step, step_size (of the step that reached it; 0 for step 0), dtype,
                   shape, rank, method
  /step_times:     every accepted step time of the forward solve (written when it ends)
One file per rank: serial h5py (no parallel HDF5 build needed), no collective call per
checkpoint (ranks write when they reach a step, without synchronising), node-local scratch
disks work; the rank and shape attributes say how the shards form the global state.

Other pnode_dist files carry their own `format` attribute; `describe` lists any of them
generically (training states, see training_state.py, also get their checksum verified).
"""
import datetime
import os

import numpy as np

CHECKPOINT_FORMAT = "pnode_dist.checkpoints"
TRAINING_STATE_FORMAT = "pnode_dist.training_state"
FORMAT_VERSION = 1
FORMAT_PREFIX = "pnode_dist."


class FileFormatError(Exception):
    """A file that is missing, unreadable, truncated or not written by pnode_dist."""


def dataset_name(step):
    return f"step_{step:08d}"


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def checkpoint_file_name(directory, name, run, solve, rank, nranks):
    return os.path.join(directory, f"{name}-{run}-{solve:05d}.rank{rank:04d}-of-{nranks:04d}.h5")


def write_root_attributes(f, *, rank, nranks, method, local_shape, global_shape, dtype):
    f.attrs.update(format=CHECKPOINT_FORMAT, format_version=FORMAT_VERSION, rank=rank,
                   nranks=nranks, method=method, local_shape=np.asarray(local_shape, np.int64),
                   global_shape=np.asarray(global_shape, np.int64), dtype=dtype,
                   created=utc_now())


def _open(path):
    import h5py
    if not os.path.exists(path):
        raise FileFormatError(f"{path}: no such file")
    if os.path.isdir(path):
        raise FileFormatError(f"{path}: is a directory; pass the .h5 files inside it")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        with open(path, "rb") as raw:
            head = raw.read(8)
        if head != b"\x89HDF\r\n\x1a\n":
            raise FileFormatError(f"{path}: not an HDF5 file (pnode_dist writes HDF5 "
                                  "checkpoint and training-state files)") from None
        raise FileFormatError(f"{path}: HDF5 file cannot be read, probably truncated or "
                              f"still being written ({exc})") from None


def _attr(value):
    """An HDF5 attribute as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def describe(path):
    """What a pnode_dist HDF5 file holds, as a JSON-ready dict."""
    with _open(path) as f:
        fmt = _attr(f.attrs.get("format", ""))
        if not str(fmt).startswith(FORMAT_PREFIX):
            raise FileFormatError(f"{path}: an HDF5 file not written by pnode_dist (no "
                                  f"'format' attribute starting with {FORMAT_PREFIX!r})")
        try:
            info = {"file": path, "bytes": os.path.getsize(path),
                    "attributes": {k: _attr(v) for k, v in f.attrs.items()}}
            if fmt == CHECKPOINT_FORMAT:
                info.update(_describe_checkpoints(f))
            else:
                info["datasets"] = _describe_datasets(f)
        except (OSError, KeyError, RuntimeError) as exc:
            raise FileFormatError(f"{path}: damaged pnode_dist file ({exc}); it was probably "
                                  "truncated") from None
    info["format"] = fmt
    if fmt == TRAINING_STATE_FORMAT:
        from .training_state import verify
        info["checksum_status"] = verify(path) or "ok"
    return info


def _describe_checkpoints(f):
    group = f.get("checkpoints")
    rows = []
    for name in sorted(group) if group is not None else []:
        ds = group[name]
        data = ds[()]
        rows.append({"name": name, "step": int(ds.attrs["step"]),
                     "time": float(ds.attrs["time"]),
                     "step_size": float(ds.attrs["step_size"]),
                     "shape": list(data.shape), "dtype": str(data.dtype),
                     "norm": float(np.linalg.norm(data.ravel())),
                     "bytes": int(data.nbytes)})
    out = {"checkpoints": rows}
    if "step_times" in f:
        times = f["step_times"][()]
        out["steps"] = int(len(times) - 1)
        out["t_start"], out["t_end"] = float(times[0]), float(times[-1])
    return out


def _describe_datasets(f):
    """Every dataset of a file: path, shape, dtype, norm (numeric), attributes."""
    rows = []

    def visit(name, obj):
        if hasattr(obj, "shape") and hasattr(obj, "dtype"):
            row = {"name": name, "shape": list(obj.shape), "dtype": str(obj.dtype),
                   "attributes": {k: _attr(v) for k, v in obj.attrs.items()}}
            if obj.dtype.kind in "fiu" and obj.size:
                row["norm"] = float(np.linalg.norm(np.asarray(obj[()], np.float64).ravel()))
            rows.append(row)
    f.visititems(visit)
    return rows
