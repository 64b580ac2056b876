"""Sealed files: an HDF5 file behind a plain-text header that holds the file's length and the
SHA-256 of all of it, checked with plain reads before HDF5 sees a byte (a damaged HDF5 file can
make the HDF5 library loop for ever or crash). Training states and kept checkpoint files are
sealed.

Header: bytes [0, 512) (HDF5's userblock: h5py.File(..., userblock_size=USERBLOCK)), ASCII,
zero padded:
    pnode_dist <kind>\\nversion <v>\\nlength <file bytes>\\nrun <run id or '-'>\\nsha256 <hex>\\n
The SHA-256 covers the whole file with the header's hex digits as '0's.

Reading never raises, never blocks on a FIFO or a device, and its work is bounded by the bytes
the file really holds: a header may claim up to MAX_BYTES, but a file whose claimed length is
mostly holes (a sparse file) is refused before it is read.
"""
import collections
import hashlib
import os
import re
import stat

USERBLOCK = 512
MAX_BYTES = 1 << 40                  # a larger length in a header is damage
HOLE_ALLOWANCE = 1 << 20             # unwritten bytes tolerated (file systems, HDF5's end)
_CHUNK = 1 << 20
PREFIX = b"pnode_dist "
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HEADER = re.compile(rb"pnode_dist ([a-z ]{1,32})\nversion (\d{1,6})\nlength (\d{1,16})\n"
                     rb"run ([0-9A-Za-z_.-]{1,64})\nsha256 ([0-9a-f]{64})\n\0*")
_NO_DIGEST = b"0" * 64

Header = collections.namedtuple("Header", "kind version length run_id sha256 digest_at")


def magic(kind):
    """The first bytes of a sealed file of `kind`."""
    return PREFIX + kind.encode() + b"\n"


def header_bytes(kind, version, length, run_id, digest):
    text = (f"pnode_dist {kind}\nversion {version}\nlength {length}\n"
            f"run {run_id or '-'}\nsha256 {digest}\n").encode()
    return text.ljust(USERBLOCK, b"\0")


def open_regular(path):
    """(fd, size, None) for a regular file opened for reading, else (None, None, problem).
    O_NONBLOCK: opening a FIFO does not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None, "no such file"
    except OSError as exc:
        return None, None, f"cannot open it ({exc.strerror or exc})"
    except Exception as exc:                     # a bad path (embedded NUL byte...)
        return None, None, f"cannot open it ({exc})"
    try:
        mode = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        return None, None, f"cannot read it ({exc.strerror or exc})"
    if not stat.S_ISREG(mode.st_mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode.st_mode) else
                "a FIFO" if stat.S_ISFIFO(mode.st_mode) else "a device, socket or other")
        return None, None, f"not a regular file ({kind})"
    return fd, mode.st_size, None


def read_up_to(fd, n):
    parts, got = [], 0
    while got < n:
        block = os.read(fd, n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def parse_header(head, size, kind, version, check_size=True):
    """(problem, Header) of a file of `kind` whose first bytes are `head` and whose size is
    `size`: the header's fields, checked against the size unless not `check_size` (the run id
    of a truncated file is still known)."""
    name = f"pnode_dist {kind}"
    if size == 0:
        return "empty file (truncated)", None
    if head.startswith(HDF5_SIGNATURE):
        return ("an HDF5 file without pnode_dist's checksum header: written by an older "
                "pnode_dist, or truncated or damaged; it was not opened"), None
    if not (head.startswith(magic(kind)) or magic(kind).startswith(head)):
        other = _HEADER.match(head)
        return (f"not a {name} (a pnode_dist {other[1].decode()} file)" if other else
                f"not a {name} (no pnode_dist header)"), None
    if len(head) < USERBLOCK:
        return f"truncated ({size} bytes, less than its header)", None
    m = _HEADER.fullmatch(head)
    if m is None:
        return "damaged header (the file was modified or damaged)", None
    got_version, length = int(m[2]), int(m[3])
    if got_version != version:
        return (f"format version {got_version}, written by a "
                f"{'newer' if got_version > version else 'different'} pnode_dist"), None
    if not USERBLOCK < length <= MAX_BYTES:
        return "damaged header (impossible length)", None
    if check_size and size < length:
        return f"truncated ({size} of {length} bytes)", None
    if check_size and size > length:
        return f"{size - length} bytes longer than its header says (damaged)", None
    run_id = m[4].decode()
    return None, Header(kind, version, length, "" if run_id == "-" else run_id, m[5].decode(),
                        m.start(5))


def kind_of(head):
    """The kind a file's first bytes name ('training state', 'checkpoints'), or None."""
    m = re.match(rb"pnode_dist ([a-z ]{1,32})\n", head)
    return m[1].decode() if m else None


def _holes_exceed(fd, size, allowance):
    """Whether more than `allowance` bytes of the file are holes (never written): a sparse file
    claiming a length it does not hold. File systems without SEEK_HOLE report no holes."""
    holes, pos = 0, 0
    try:
        while pos < size:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:                      # ENXIO: a hole up to the end
                data = size
            holes += data - hole
            if holes > allowance:
                return True
            pos = data
    except OSError:
        return False
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return False


def read_verified(path, kind, version, keep=False):
    """(problem, header, data): problem is None when the header of a `kind` file is sound and
    the SHA-256 of the whole file matches it; data: the verified bytes when `keep`. Never
    raises, never blocks on a FIFO or device, reads at most the length the header states (and
    one byte more), and refuses a file that does not hold that many bytes (holes)."""
    fd, size, problem = open_regular(path)
    if problem is not None:
        return problem, None, None
    try:
        head = read_up_to(fd, USERBLOCK)
        problem, header = parse_header(head, size, kind, version)
        if problem is not None:
            return problem, None, None
        if _holes_exceed(fd, size, HOLE_ALLOWANCE):
            return (f"its header claims {header.length} bytes but the file holds far fewer "
                    "(a sparse file: damaged or crafted); it was not read"), None, None
        os.lseek(fd, USERBLOCK, os.SEEK_SET)
        i = header.digest_at
        digest = hashlib.sha256(head[:i] + _NO_DIGEST + head[i + 64:])
        parts = [head] if keep else None
        remaining = header.length - len(head)
        while remaining > 0:
            block = os.read(fd, min(_CHUNK, remaining))
            if not block:
                return "truncated while being read", None, None
            digest.update(block)
            remaining -= len(block)
            if keep:
                parts.append(block)
        if os.read(fd, 1):
            return "longer than its header says (changed while being read)", None, None
        if digest.hexdigest() != header.sha256:
            return "checksum mismatch (the file was modified or damaged)", None, None
        return None, header, (b"".join(parts) if keep else None)
    except MemoryError:
        return "too large to read into memory", None, None
    except Exception as exc:
        return f"unreadable ({exc})", None, None
    finally:
        os.close(fd)


def sealed_bytes(data, kind, version, run_id):
    """An HDF5 file image made with userblock_size=USERBLOCK, with its header written."""
    digest = hashlib.sha256(header_bytes(kind, version, len(data), run_id,
                                         _NO_DIGEST.decode()))
    digest.update(memoryview(data)[USERBLOCK:])
    return header_bytes(kind, version, len(data), run_id, digest.hexdigest()) + \
        bytes(memoryview(data)[USERBLOCK:])


def seal(path, kind, version, run_id):
    """Write the header of a closed HDF5 file (made with userblock_size=USERBLOCK): its SHA-256
    computed from the bytes read back; flushed to disk."""
    with open(path, "r+b") as raw:
        length = os.fstat(raw.fileno()).st_size
        digest = hashlib.sha256(header_bytes(kind, version, length, run_id, _NO_DIGEST.decode()))
        raw.seek(USERBLOCK)
        while True:
            block = raw.read(_CHUNK)
            if not block:
                break
            digest.update(block)
        raw.seek(0)
        raw.write(header_bytes(kind, version, length, run_id, digest.hexdigest()))
        raw.flush()
        os.fsync(raw.fileno())
