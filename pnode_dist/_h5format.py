"""HDF5 layouts written by pnode_dist (read back for `pnode-inspect` by pnode_dist.inspect).

Checkpoint files (the disk tier): one file per rank and solve,
    <dir>/<name>-<run>-<solve>.rank<r>-of-<n>.h5
  bytes [0, 512): the sealed-file header (_sealed.py) of kind 'checkpoints', version 2, written
                   when a kept file is closed (its length and SHA-256); until then zeros
  root attributes: format='pnode_dist.checkpoints', format_version, rank, nranks, method,
                   local_shape, global_shape, dtype (the model's), created (UTC ISO time)
  /checkpoints/step_<8 digits>: float64 array of this rank's shard of y_step, attributes
                   time, step, step_size (of the step that reached it; 0 for step 0), dtype,
                   shape, rank, method, sha256 (array_checksum of the array: checked when the
                   backward pass restores it, against the value the writer kept in memory)
  /step_times:     every accepted step time of the forward solve (written when it ends)
One file per rank: serial h5py (no parallel HDF5 build needed), no collective call per
checkpoint (ranks write when they reach a step, without synchronising), node-local scratch
disks work; the rank and shape attributes say how the shards form the global state.

Other pnode_dist files carry their own `format` attribute (training states: training_state.py).
"""
import datetime
import hashlib
import os

import numpy as np

CHECKPOINT_FORMAT = "pnode_dist.checkpoints"
TRAINING_STATE_FORMAT = "pnode_dist.training_state"
FORMAT_VERSION = 2               # checkpoint files (2: sealed with a checksum header)
CHECKPOINT_KIND = "checkpoints"  # their sealed-file kind
FORMAT_PREFIX = "pnode_dist."


CHECKSUM_ATTR = "sha256"              # a checkpoint dataset's checksum of its bytes


def dataset_name(step):
    return f"step_{step:08d}"


def array_checksum(array):
    """SHA-256 (hex) of an array's dtype, shape and bytes: what a checkpoint dataset carries
    and what its restore checks."""
    h = hashlib.sha256(f"{array.dtype.str}{tuple(array.shape)}".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def checkpoint_file_name(directory, name, run, solve, rank, nranks):
    return os.path.join(directory, f"{name}-{run}-{solve:05d}.rank{rank:04d}-of-{nranks:04d}.h5")


def write_root_attributes(f, *, rank, nranks, method, local_shape, global_shape, dtype):
    f.attrs.update(format=CHECKPOINT_FORMAT, format_version=FORMAT_VERSION, rank=rank,
                   nranks=nranks, method=method, local_shape=np.asarray(local_shape, np.int64),
                   global_shape=np.asarray(global_shape, np.int64), dtype=dtype,
                   created=utc_now())
