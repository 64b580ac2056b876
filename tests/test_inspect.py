"""pnode-inspect: what it lists for checkpoint files and other pnode_dist files, --json, and
the errors for missing, truncated and foreign files."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, TimeMLP, run_mpi
from pnode_dist import Checkpointing, odeint


def _inspect(*args):
    return subprocess.run([sys.executable, "-m", "pnode_dist.inspect", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture
def checkpoint_file(tmp_path, y0):
    y = y0.clone().requires_grad_(True)
    policy = Checkpointing(schedule="uniform", slots=3, host_bytes=0, disk_dir=str(tmp_path),
                           keep_files=True)
    ys = odeint(TimeMLP(), y, torch.tensor([0.0, 1.0]), method="rk4",
                options={"step_size": 0.1}, checkpointing=policy)
    ys.sum().backward()
    (path,) = tmp_path.iterdir()
    return path


def test_lists_checkpoints_as_text_and_json(checkpoint_file):
    text = _inspect(checkpoint_file)
    assert text.returncode == 0, text.stderr
    assert "pnode_dist.checkpoints" in text.stdout and "rank 0 of 1, method rk4" in text.stdout
    assert "forward solve: 10 steps from t=0 to t=1" in text.stdout
    out = _inspect("--json", checkpoint_file)
    (info,) = json.loads(out.stdout)
    # uniform, 3 slots over 10 steps: y_0, y_4, y_8 (every ceil(10/3) = 4 steps)
    assert [c["step"] for c in info["checkpoints"]] == [0, 4, 8]
    with h5py.File(checkpoint_file) as f:
        for c in info["checkpoints"]:
            data = f["checkpoints"][c["name"]][()]
            assert c["norm"] == pytest.approx(float(np.linalg.norm(data)), rel=1e-15)
            assert c["time"] == pytest.approx(0.1 * c["step"], abs=1e-14)
            assert c["bytes"] == data.nbytes and c["shape"] == [4, 3]
    for line in text.stdout.splitlines()[5:]:
        assert line.split()[0] in {"0", "4", "8"}


def test_other_pnode_files_are_listed_generically(tmp_path):
    path = tmp_path / "state.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "pnode_dist.training_state"
        f.attrs["iteration"] = 7
        f["model/weight"] = np.ones((2, 3))
    out = _inspect("--json", path)
    assert out.returncode == 0, out.stderr
    (info,) = json.loads(out.stdout)
    assert info["attributes"]["iteration"] == 7
    assert info["datasets"][0]["name"] == "model/weight"
    assert info["datasets"][0]["norm"] == pytest.approx(6 ** 0.5)


def test_missing_truncated_and_foreign_files_fail_clearly(tmp_path, checkpoint_file, capsys):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(checkpoint_file.read_bytes()[:3000])
    cases = {tmp_path / "missing.h5": "no such file", foreign: "not written by pnode_dist",
             text: "not an HDF5 file", truncated: "truncated"}
    for path, words in cases.items():          # in this process (the command: below)
        status, _, err = _inspect_here(capsys, path)
        assert status == 1 and words in err, (path, err)
    both = _inspect(checkpoint_file, tmp_path / "missing.h5")
    assert both.returncode == 1 and "pnode_dist.checkpoints" in both.stdout


def test_console_script_is_installed():
    script = ROOT / ".venv" / "bin" / "pnode-inspect"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "pnode_dist HDF5 files" in out.stdout


# -- files that are not what they claim (issue 13): nothing may hang, allocate what a file
#    declares, raise anything but FileFormatError, or print raw control characters.

def _inspect_here(capsys, *args):
    """pnode-inspect in this process: (exit status, stdout, stderr)."""
    from pnode_dist.inspect import main
    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_fifo_and_links_to_other_files_are_refused_without_hanging(tmp_path):
    import os
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    linked = tmp_path / "linked.h5"              # /checkpoints: an external link to the FIFO
    with h5py.File(linked, "w") as f:
        f.attrs["format"] = "pnode_dist.checkpoints"
        f["checkpoints"] = h5py.ExternalLink(str(fifo), "/")
    generic = tmp_path / "generic.h5"             # an external link among the datasets
    with h5py.File(generic, "w") as f:
        f.attrs["format"] = "pnode_dist.other"
        f["data"] = np.ones(3)
        f["elsewhere"] = h5py.ExternalLink(str(fifo), "/x")
    out = subprocess.run([sys.executable, "-m", "pnode_dist.inspect", str(fifo), str(linked),
                          str(generic)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"{fifo}: not a regular file" in out.stderr
    assert f"{linked}: damaged" in out.stderr and "ExternalLink" in out.stderr
    assert "/data  float64 [3]" in out.stdout and "Traceback" not in out.stderr


def test_directory_is_refused(tmp_path, capsys):
    status, out, err = _inspect_here(capsys, tmp_path)
    assert status == 1 and f"{tmp_path}: is a directory" in err and out.strip() == ""


def test_control_characters_from_a_file_are_escaped(tmp_path, capsys):
    fake = "\n  checksum status: ok"
    path = tmp_path / "evil\x1b[2J\nname.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "pnode_dist.other\x1b[31m"
        f.attrs["note\r"] = "line one" + fake
        f.attrs["raw"] = np.bytes_(b"\xff\x1b]0;title\x07")
        f.attrs["list"] = np.array([b"a\nb", b"c"])
        f["x\x1b[1A" + fake + "\u202e"] = np.ones(2)
    for args in ((path,), ("--json", path)):
        status, out, err = _inspect_here(capsys, *args)
        assert status == 0, err
        for bad in ("\x1b", "\r", "\x07", "\u202e"):
            assert bad not in out, (bad, out)
        assert not any(line.strip().startswith("checksum status") for line in out.splitlines())
        if args[0] == "--json":
            (info,) = json.loads(out)
            assert info["attributes"]["note\r"] == "line one" + fake      # JSON keeps the text
            assert info["attributes"]["list"] == ["a\nb", "c"]
        else:
            assert len(out.strip().splitlines()) == 5, out              # name, 3 attrs, 1 dataset
            assert "\\x1b[2J\\nname.h5" in out and "checksum status: ok" in out   # escaped, inline
    foreign = tmp_path / "foreign\x1b[31m.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(1)
    status, out, err = _inspect_here(capsys, foreign)
    assert status == 1 and "\x1b" not in err and "foreign\\x1b[31m.h5" in err


@pytest.mark.parametrize("fmt", ["pnode_dist.other", "pnode_dist.training_state",
                                 "pnode_dist.checkpoints"])
def test_huge_declared_dataset_is_not_read(tmp_path, capsys, fmt):
    """A dataset that declares 8 GB (no data written: a file of a few KiB) is listed without
    its norm, quickly, and a training state holding one is not checksummed (that would read it)."""
    import time
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = fmt
        ds = f.create_dataset("checkpoints/step_00000000", shape=(10 ** 9,), dtype="f8")
        ds.attrs.update(step=0, time=0.0, step_size=0.0)
        f.create_dataset("big2d", shape=(10 ** 5, 10 ** 5), dtype="f4")
    assert path.stat().st_size < 100_000
    t0 = time.perf_counter()
    status, out, err = _inspect_here(capsys, "--json", path)
    assert time.perf_counter() - t0 < 5
    assert status == 0, err
    (info,) = json.loads(out)
    rows = info["checkpoints"] if fmt == "pnode_dist.checkpoints" else info["datasets"]
    skipped = [r for r in rows if "skipped" in r]
    assert skipped and all("declares" in r["skipped"] and r.get("norm") is None for r in skipped)
    if fmt == "pnode_dist.training_state":
        assert info["checksum_status"].startswith("not verified")
    status, text, err = _inspect_here(capsys, path)
    assert status == 0 and "not read" in text, err


@pytest.mark.parametrize("case", ["checkpoints_is_dataset", "missing_step", "array_step",
                                  "empty_step_times", "text_step_times", "soft_link",
                                  "format_is_array"])
def test_malformed_files_are_file_format_errors(tmp_path, case):
    from pnode_dist import FileFormatError
    from pnode_dist.inspect import describe
    path = tmp_path / f"{case}.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "pnode_dist.checkpoints"
        if case == "checkpoints_is_dataset":
            f["checkpoints"] = np.ones(3)
        elif case == "soft_link":
            f["target"] = np.ones(3)
            f["checkpoints"] = h5py.SoftLink("/target")
        elif case == "format_is_array":
            f.attrs["format"] = np.array(["pnode_dist.checkpoints"] * 2, dtype=h5py.string_dtype())
        elif case.endswith("step_times"):
            f["step_times"] = np.zeros(0) if case.startswith("empty") else np.array([b"a"])
        else:
            ds = f.create_dataset("checkpoints/step_00000000", data=np.ones(3))
            ds.attrs.update(time=0.0, step_size=0.0)
            if case == "array_step":
                ds.attrs["step"] = np.arange(3)
    with pytest.raises(FileFormatError, match=str(path)):
        describe(str(path))


def test_truncated_anywhere_is_a_file_format_error(tmp_path, checkpoint_file):
    from pnode_dist import FileFormatError
    from pnode_dist.inspect import describe
    whole = checkpoint_file.read_bytes()
    cut = tmp_path / "cut.h5"
    for n in (0, 8, 100, 1000, len(whole) // 2, len(whole) - 200, len(whole) - 1):
        cut.write_bytes(whole[:n])
        try:
            describe(str(cut))
        except FileFormatError as exc:
            assert str(cut) in str(exc)


# -- kept checkpoint files are sealed (issue 28): a whole-file checksum checked before HDF5
#    reads them; files without one are read in a child process with a time limit.

def test_kept_checkpoint_files_are_sealed_and_verified(checkpoint_file, capsys):
    data = checkpoint_file.read_bytes()
    assert data.startswith(b"pnode_dist checkpoints\nversion 2\nlength %d\n" % len(data))
    status, out, err = _inspect_here(capsys, checkpoint_file)
    assert status == 0 and "checksum ok" in out.splitlines()[0], err


def _flipped_copies(source, directory, count, seed, unseal=False):
    """`count` copies of `source`, each with one seeded bit flipped (a third of them in the
    first 4 KiB, where the header and HDF5's superblock lie); unseal: the header zeroed
    first, as in a file whose run stopped before sealing it."""
    import random
    data = bytearray(source.read_bytes())
    if unseal:
        data[:512] = bytes(512)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        copy = bytearray(data)
        pos = rng.randrange(4096 if i % 3 == 0 else len(copy))
        copy[pos] ^= 1 << rng.randrange(8)
        path = directory / f"flip{i:04d}.h5"
        path.write_bytes(bytes(copy))
        paths.append(path)
    return paths


def test_bit_flips_of_a_sealed_checkpoint_file_are_refused_unopened(tmp_path, checkpoint_file):
    """150 single-bit flips: every one is refused before HDF5 opens it (one line each), by the
    checksum unless the flip broke the header's first line."""
    flips = tmp_path / "flips"
    flips.mkdir()
    paths = _flipped_copies(checkpoint_file, flips, 150, seed=5)
    out = _inspect(*paths)
    lines = out.stderr.splitlines()
    assert out.returncode == 1 and out.stdout.strip() == "" and len(lines) == 150, out.stderr
    assert all(line.endswith("not opened") for line in lines), lines
    assert sum("fails its check" in line for line in lines) > 140, lines


def test_bit_flips_of_an_unsealed_checkpoint_file_never_hang_or_crash(tmp_path,
                                                                      checkpoint_file):
    """150 flips of a checkpoint file without its header (HDF5 reads these, in a child
    process): each is listed or refused with one line, never an unexpected error, and the
    whole batch ends within its time limit."""
    flips = tmp_path / "flips"
    flips.mkdir()
    paths = _flipped_copies(checkpoint_file, flips, 150, seed=6, unseal=True)
    out = subprocess.run([sys.executable, "-m", "pnode_dist.inspect", "--json", *map(str, paths)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    listed = json.loads(out.stdout)
    errors = out.stderr.splitlines()
    assert len(listed) + len(errors) == 150, out.stderr
    assert not any("unexpected" in line for line in errors), errors
    assert all(info["checksum_status"].startswith("not verified") for info in listed)


def test_a_reader_that_hangs_or_crashes_is_one_error(tmp_path):
    """The child-process reader: a hang is stopped at its time limit, a crash (a signal) is
    reported; both as FileFormatError naming the file."""
    import os
    import signal
    import time
    from pnode_dist import FileFormatError
    from pnode_dist.inspect import _isolated
    t0 = time.monotonic()
    with pytest.raises(FileFormatError, match="x.h5: HDF5 did not finish reading it within 1 s"):
        _isolated(lambda path: time.sleep(60), "x.h5", 1)
    assert time.monotonic() - t0 < 5
    with pytest.raises(FileFormatError, match="x.h5: HDF5 crashed reading it \\(SIGSEGV\\)"):
        _isolated(lambda path: os.kill(os.getpid(), signal.SIGSEGV), "x.h5", 10)
    assert _isolated(lambda path: {"file": path}, "x.h5", 10) == {"file": "x.h5"}


def test_runs_as_a_child_process_of_an_mpi_rank(checkpoint_file, tmp_path):
    """A training script under mpiexec runs pnode-inspect on its files (issue 37): the child
    inherits the rank's PMI_* variables and must not start MPI."""
    state = tmp_path / "state.h5"
    with h5py.File(state, "w") as f:                 # an unsealed file: read in a forked child
        f.attrs["format"] = "pnode_dist.training_state"
        f["model/weight"] = np.ones((2, 3))
    proc = run_mpi(2, ROOT / "tests" / "mpi" / "inspect_child.py", checkpoint_file, state,
                   timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok (") == 2 and "pnode-inspect;" in proc.stdout, proc.stdout
