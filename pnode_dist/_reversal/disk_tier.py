"""The disk tier of the checkpoint store: checkpoints in one HDF5 file per rank (h5format's
layout), written behind the solve and read ahead of the backward pass on a worker thread, each
checked against its SHA-256; kept files sealed for inspection; no file left behind by a dead
process (orphans of this host's dead processes removed)."""
import collections
import errno
import os
import re
import socket
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import _h5format as h5format
from .. import _sealed
from .._distributed.collective import SYMPTOM
from .store import Tier


class _Damaged(Exception):
    """A checkpoint read back differs from what was written."""


class DiskTier(Tier):
    """Checkpoints in one HDF5 file of this rank (created on the first write). With
    keep_files, checkpoints the schedule frees stay in the file (for inspection); the budget
    counts only those the schedule holds. I/O errors are recorded in `error` (the first one)
    rather than raised, so that the solve reaches the point where all ranks learn of it.

    Each checkpoint's SHA-256 is kept in memory when it is written (and stored with it); a
    restore whose bytes differ (a file truncated, overwritten or damaged meanwhile) is an
    error, never a wrong gradient. A write that would not fit on the disk is refused before
    HDF5 sees it: HDF5 was seen to crash closing a file after running out of space.

    No death of the process leaves a file behind, not even SIGKILL (MPI launchers end the other
    ranks of a failed job so): a file that is not kept is unlinked as soon as it is created (the
    open handle holds it); a kept one is written under a name carrying its process's id, sealed,
    then renamed, and a later disk tier on the same host removes such files of dead
    processes."""

    name = "disk"
    trusted = True               # its own SHA-256 per checkpoint
    MARGIN = 1 << 20             # free bytes left for HDF5's own metadata

    def __init__(self, path, capacity, root_attributes, method, depth, keep_files=False):
        super().__init__(capacity)
        self.path, self.keep_files = path, keep_files
        self.root_attributes, self.method, self.depth = root_attributes, method, depth
        self.file = None
        self.named = None                          # the open file's name (None: unlinked)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pnode-disk")
        self.writes = collections.OrderedDict()   # pos -> (state copy, future): recent writes
        self.reads = {}                            # pos -> future of a read-ahead
        self.write_seconds = self.read_seconds = 0.0
        self.hits = self.misses = 0
        self.digests = {}                          # pos -> checksum of what was written

    def _failed(self, exc, what, hint=None):
        if self.error is None:
            hint = hint or _io_hint(exc, os.path.dirname(self.path) or ".")
            self.error = (SYMPTOM, f"{what} checkpoint file {self.path} failed ({exc}): {hint}")

    # ---------------------------------------------------------------- worker-side I/O
    def _open(self):
        import h5py
        if self.file is None:
            directory = os.path.dirname(self.path) or "."
            os.makedirs(directory, exist_ok=True)
            remove_orphans(directory)
            self.named = f"{self.path}.part-{os.getpid()}-{_PROCESS_SPACE}"
            self.file = h5py.File(self.named, "w", userblock_size=_sealed.USERBLOCK)
            if not self.keep_files:
                os.unlink(self.named)
                self.named = None
            h5format.write_root_attributes(self.file, **self.root_attributes)
            self.file.create_group("checkpoints")
        return self.file

    def _check_space(self, nbytes):
        """Refuse a write the file system cannot hold (with room for HDF5's metadata)."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        stat = os.statvfs(directory)
        if stat.f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, f"{directory} is on a read-only file system")
        free = stat.f_bavail * stat.f_frsize
        if free < nbytes + self.MARGIN:
            raise OSError(errno.ENOSPC, f"disk full: {free} bytes free in {directory}, a "
                          f"checkpoint needs {nbytes} bytes plus {self.MARGIN} of headroom")

    def _write(self, pos, array, meta):
        if self.error is not None:         # after a failure the file is left alone
            return
        start = time.perf_counter()
        digest = h5format.array_checksum(array)
        self._check_space(array.nbytes)
        group = self._open()["checkpoints"]
        name = h5format.dataset_name(pos)
        if name in group:                  # kept from an earlier placement at this step
            del group[name]
        ds = group.create_dataset(name, data=array)
        ds.attrs.update(meta, **{h5format.CHECKSUM_ATTR: digest})
        self.digests[pos] = digest
        self.write_seconds += time.perf_counter() - start

    def _read(self, pos):
        """The checkpoint at `pos`, checked against the checksum kept when it was written."""
        start = time.perf_counter()
        name = h5format.dataset_name(pos)
        try:
            array = self.file["checkpoints"][name][()]
        except (KeyError, OSError, ValueError) as exc:
            raise _Damaged(f"step {pos} ({name}) cannot be read: {exc}") from None
        if h5format.array_checksum(array) != self.digests.get(pos):
            raise _Damaged(f"step {pos} ({name}) does not match the checksum written with it")
        self.read_seconds += time.perf_counter() - start
        return torch.from_numpy(array)

    def _delete(self, pos):
        if self.file is None or self.error is not None:
            return
        del self.file["checkpoints"][h5format.dataset_name(pos)]

    # ---------------------------------------------------------------- tier interface
    def settle(self):
        """Wait for every write in flight (errors land in `error`)."""
        self._settle(keep=0)

    def _settle(self, keep):
        """Keep the `keep` most recent written checkpoints in memory too (a backward pass often
        restores a checkpoint it has just stored); finish and forget the older writes."""
        while len(self.writes) > keep:
            _, (_, future) = self.writes.popitem(last=False)
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - reported collectively by the strategy
                self._failed(exc, "writing")

    def put(self, pos, state, meta):
        copy = state.to("cpu", copy=True)
        meta = dict(meta, dtype=self.root_attributes["dtype"], shape=list(copy.shape),
                    rank=self.root_attributes["rank"], method=self.method)
        self.writes[pos] = (copy, self.worker.submit(self._write, pos, copy.numpy(), meta))
        self._settle(keep=self.depth)

    def prefetch(self, pos):
        if pos not in self.writes and pos not in self.reads and len(self.reads) < self.depth:
            self.reads[pos] = self.worker.submit(self._read, pos)

    def get(self, pos):
        """The checkpoint; a read that fails is recorded in `error` (with the file and what to
        do) and raised (the store then restores NaN)."""
        if pos in self.writes:
            self.hits += 1
            return self.writes[pos][0]
        future = self.reads.pop(pos, None)
        if future is not None:
            self.hits += 1
        else:
            self.misses += 1
            future = self.worker.submit(self._read, pos)
        try:
            return future.result()
        except _Damaged as exc:
            self._failed(exc, "reading", "the file was truncated, overwritten or damaged after "
                         "it was written; nothing restored from it is used")
            raise
        except Exception as exc:
            self._failed(exc, "reading")
            raise

    def drop(self, pos):
        write = self.writes.pop(pos, None)
        if write is not None:
            try:
                write[1].result()
            except Exception as exc:  # noqa: BLE001
                self._failed(exc, "writing")
        read = self.reads.pop(pos, None)
        if read is not None:
            try:
                read.result()
            except Exception:  # noqa: BLE001 - the checkpoint is no longer needed
                pass
        if not self.keep_files:
            self.worker.submit(self._delete, pos)

    def _write_times(self, times):
        if self.error is not None:
            return
        try:
            self._open().create_dataset("step_times", data=times)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc, "writing")

    def finish_forward(self, times):
        """The forward's step times, next to the checkpoints (if any were written)."""
        if self.file is not None or self.writes:
            self.worker.submit(self._write_times, torch.tensor(times, dtype=torch.float64).numpy())

    def stats(self):
        self.settle()
        return {"disk_bytes_peak": self.peak, "disk_checkpoints": self.stored,
                "disk_write_seconds": self.write_seconds, "disk_read_seconds": self.read_seconds,
                "disk_prefetch_hits": self.hits, "disk_prefetch_misses": self.misses}

    def close(self):
        """Finish the I/O in flight and close the file; if asked to keep it, seal it with its
        checksum header (_sealed.py) and give it its final name (a kept file whose writing,
        closing or sealing failed is removed). Never raises: it runs while an error
        is being raised, which must not be replaced; a failure here is a warning."""
        problems = []
        try:
            self.worker.shutdown(wait=True)
        except Exception as exc:  # noqa: BLE001
            problems.append(exc)
        self.writes.clear()
        self.reads.clear()
        if self.file is not None:
            try:
                self.file.close()
            except Exception as exc:  # noqa: BLE001
                problems.append(exc)
            self.file = None
        if self.keep_files and self.named is not None and self.error is None and not problems:
            try:                               # pnode-inspect checks it before HDF5 reads it
                _sealed.seal(self.named, h5format.CHECKPOINT_KIND, h5format.FORMAT_VERSION, "")
                os.replace(self.named, self.path)
                self.named = None
            except Exception as exc:  # noqa: BLE001
                problems.append(exc)
        if self.named is not None:             # a kept file that failed: removed
            try:
                os.remove(self.named)
            except OSError as exc:
                problems.append(exc)
            self.named = None
        self.bytes = 0
        if problems:
            warnings.warn(f"closing checkpoint file {self.path}: {problems[0]}", RuntimeWarning,
                          stacklevel=2)


# This process's host and PID namespace: a file named with a pid of this space whose process is
# gone is an orphan (a pid seen from another namespace proves nothing).
try:
    _PROCESS_SPACE = f"{socket.gethostname()}-{os.stat('/proc/self/ns/pid').st_ino}"
except OSError:
    _PROCESS_SPACE = socket.gethostname()
_PARTIAL = re.compile(r"\.h5\.part-(\d+)-(.+)$")


def remove_orphans(directory):
    """Remove the kept checkpoint files in `directory` that a process of this host and PID
    namespace was still writing when it died (their names say which)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _PARTIAL.search(name)
        if match is None or match.group(2) != _PROCESS_SPACE:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue                           # alive (or not ours to signal): kept
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.remove(os.path.join(directory, name))
        except OSError:
            pass


def _io_hint(exc, directory):
    """What to do about a checkpoint file's I/O error, from its cause."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "No space left" in text:
        return "free disk space or choose another Checkpointing(disk_dir=...)"
    if code == errno.EROFS or "Read-only file system" in text:
        return (f"{directory} is read-only: choose a writable Checkpointing(disk_dir=...) "
                "(--disk-dir)")
    if code in (errno.ENOTDIR, errno.ENOENT, errno.EEXIST) or not os.path.isdir(directory):
        return (f"the checkpoint folder {directory} was removed or replaced while the run used "
                "it: keep it in place, or choose another Checkpointing(disk_dir=...)")
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {directory}: choose another Checkpointing(disk_dir=...)"
    return "check the disk, or choose another Checkpointing(disk_dir=...)"
