"""Training-state files: exact round trip, whole-file checksum checked before HDF5 opens a file
(bit flips, truncation, FIFOs, directories, old files), newest-valid selection, pruning per run,
a full disk during a save."""
import os
import random
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, TimeMLP
from pnode_dist.training import state as training_state
from pnode_dist import FileFormatError, InputError, PnodeError
from pnode_dist.inspect import describe
from pnode_dist.parallel import MPI

COMM = MPI.COMM_SELF


def _trained(seed):
    torch.manual_seed(seed)
    model = TimeMLP(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.tensor(0.3), torch.randn(4, 3, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_is_exact(tmp_path):
    model, opt, sched = _trained(0)
    np.random.seed(5)
    np.random.randn()                                      # a cached Gaussian in numpy's state
    random.gauss(0, 1)
    state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    path = training_state.save(tmp_path, model=model, optimizer=opt, scheduler=sched,
                               iteration=3, epoch=1, comm=COMM, args={"lr": 1e-2},
                               progress={"batch": 7})
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])
    expected = (torch.rand(3), np.random.rand(3), random.random())   # the next draws
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    other, other_opt, other_sched = _trained(1)
    info = training_state.load(path, model=other, optimizer=other_opt, scheduler=other_sched,
                               comm=COMM)
    assert info == {"iteration": 3, "epoch": 1, "args": {"lr": 1e-2},
                    "progress": {"batch": 7}, "run_id": ""}
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    for k, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(value, other_opt.state_dict()["state"][k][key]), key
    assert opt.state_dict()["param_groups"][0]["lr"] == other_opt.param_groups[0]["lr"]
    assert sched.state_dict() == other_sched.state_dict()
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    assert describe(path)["checksum_status"] == "ok"


def test_lbfgs_history_round_trips_and_training_continues_bitwise(tmp_path):
    """L-BFGS keeps lists of tensors (and None) in its state: saved and restored, the next
    steps equal those of the uninterrupted optimizer bit for bit."""
    def make():
        torch.manual_seed(0)
        model = TimeMLP(3, 8).double()
        return model, torch.optim.LBFGS(model.parameters(), max_iter=3, history_size=4,
                                        line_search_fn="strong_wolfe")
    x = torch.randn(6, 3, dtype=torch.float64)

    def steps(model, opt, n):
        def closure():
            opt.zero_grad()
            loss = model(torch.tensor(0.2), x).pow(2).sum()
            loss.backward()
            return loss
        for _ in range(n):
            opt.step(closure)

    model, opt = make()
    steps(model, opt, 2)
    assert any(v is None for v in opt.state_dict()["state"][0]["al"])    # a mixed list
    path = training_state.save(tmp_path, model=model, optimizer=opt, iteration=2, epoch=0,
                               comm=COMM)
    other, other_opt = make()
    training_state.load(path, model=other, optimizer=other_opt, comm=COMM)
    steps(model, opt, 2)
    steps(other, other_opt, 2)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_inspect_refuses_a_damaged_state_without_opening_it(tmp_path):
    model, opt, _ = _trained(0)
    path = training_state.save(tmp_path, model=model, optimizer=opt, iteration=1, epoch=0,
                               comm=COMM)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(path, "wb").write(bytes(data))
    with pytest.raises(FileFormatError, match="fails its check: checksum mismatch.*not opened"):
        describe(path)


def test_damaged_files_are_detected_and_skipped(tmp_path):
    model, opt, _ = _trained(0)
    paths = [training_state.save(tmp_path, model=model, optimizer=opt, iteration=i, epoch=1,
                                 comm=COMM, keep=3) for i in range(1, 6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state-0000000003.h5", "state-0000000004.h5", "state-0000000005.h5"]
    with h5py.File(paths[-1], "r+") as f:                 # a changed weight
        f["model/l1.weight"][0, 0] += 1.0
    assert "checksum mismatch" in training_state.verify(paths[-1])
    with open(paths[-2], "r+b") as f:                      # a truncated file
        f.truncate(1500)
    assert "truncated" in training_state.verify(paths[-2])
    best, skipped = training_state.latest_valid(tmp_path)
    assert best == paths[-3] and [s for s, _ in skipped] == [paths[-1], paths[-2]]
    with pytest.raises(FileFormatError, match="checksum mismatch"):
        training_state.load(paths[-1], model=model, optimizer=opt, comm=COMM)


def _verify_within(path, seconds=10):
    """verify(path) in a daemon thread: a hang fails the test instead of stalling it."""
    result = []
    thread = threading.Thread(target=lambda: result.append(training_state.verify(path)),
                              daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"verify({path}) did not return within {seconds}s"
    return result[0]


def test_damaged_files_are_refused_before_hdf5_reads_them(tmp_path):
    """Truncations at every interesting length, a FIFO without a writer, a directory, a
    device, a file of the older format (no header) and bytes appended: all refused, promptly,
    with a reason; load raises FileFormatError naming the file."""
    model, opt, _ = _trained(0)
    path = training_state.save(tmp_path / "s", model=model, optimizer=opt, iteration=1, epoch=1,
                               comm=COMM, run_id="abc")
    data = open(path, "rb").read()
    assert data.startswith(b"pnode_dist training state\nversion 2\n")
    assert _verify_within(path) is None and training_state.read_header(path) == ("abc", None)
    cases = {}
    for n in (0, 10, 511, 512, 600, len(data) // 2, len(data) - 1):
        cases[f"trunc{n}"] = (data[:n], "truncated")
    cases["longer"] = (data + b"\0", "longer than its header says")
    cases["text"] = (b"hello\n" * 100, "not a pnode_dist training state")
    old = tmp_path / "old.h5"                              # a format-1 file: plain HDF5
    with h5py.File(old, "w") as f:
        f.attrs["format"] = "pnode_dist.training_state"
        f["model/w"] = np.zeros(3)
    cases["old"] = (old.read_bytes(), "older pnode_dist")
    for name, (content, words) in cases.items():
        p = tmp_path / f"{name}.h5"
        p.write_bytes(content)
        why = _verify_within(p)
        assert why is not None and words in why, (name, why)
        with pytest.raises(FileFormatError, match=f"{p}: .*{words}"):
            training_state.load(p, model=model, optimizer=opt, comm=COMM)
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    assert "not a regular file (a FIFO)" in _verify_within(fifo)
    assert training_state.read_header(fifo) == (None, "not a regular file (a FIFO)")
    assert "not a regular file (a directory)" in _verify_within(tmp_path)
    assert "not a regular file" in _verify_within("/dev/zero")
    assert _verify_within(tmp_path / "missing.h5") == "no such file"


def test_single_bit_flips_are_refused_promptly(tmp_path):
    """A few hundred seeded single-bit flips of a real state file (half in the header), each
    checked by verify in a worker process (a hang or crash fails the test): every copy is
    refused, or verifies with content identical to the original, each within two seconds."""
    model, opt, sched = _trained(0)
    path = training_state.save(tmp_path, model=model, optimizer=opt, scheduler=sched,
                               iteration=3, epoch=1, comm=COMM, run_id="flips")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "state_fuzz.py"),
                           "--flips", "300", "--truncations", "20", "--seed", "13",
                           "--state", path, "--case-timeout", "5", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = __import__("json").loads(proc.stdout.splitlines()[-1])
    assert summary["cases"] == 320 and summary["identical"] + summary["refused"] == 320, summary
    assert summary["max_seconds"] < 2.0, summary


def test_pruning_keeps_other_runs_and_never_replaces_them(tmp_path):
    model, opt, _ = _trained(0)
    other = [training_state.save(tmp_path, model=model, optimizer=opt, iteration=i, epoch=1,
                                 comm=COMM, run_id="other") for i in (1, 2)]
    (tmp_path / "state-0000000099.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    mine = [training_state.save(tmp_path, model=model, optimizer=opt, iteration=i, epoch=1,
                                comm=COMM, run_id="mine", keep=2) for i in range(3, 8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state-0000000001.h5", "state-0000000002.h5", "state-0000000006.h5",
        "state-0000000007.h5", "state-0000000099.h5"]
    assert training_state.latest_valid(tmp_path, run_id="other") == (
        other[-1], [(str(tmp_path / "state-0000000099.h5"),
                     training_state.read_header(tmp_path / "state-0000000099.h5")[1])])
    assert training_state.latest_valid(tmp_path, run_id="mine")[0] == mine[-1]
    with pytest.raises(training_state.SaveError, match="not a state of this run"):
        training_state.save(tmp_path, model=model, optimizer=opt, iteration=2, epoch=1,
                            comm=COMM, run_id="mine")
    assert training_state.read_header(other[-1]) == ("other", None)
    assert not list(tmp_path.glob("*.tmp"))
    older = training_state.save(tmp_path, model=model, optimizer=opt, iteration=4, epoch=1,
                                comm=COMM, run_id="mine", keep=2)     # resumed from further back
    assert [e.path for e in training_state.scan(tmp_path) if e.run_id == "mine"] == [
        older, mine[-1]]                                   # the state just written is kept


def test_full_disk_keeps_the_previous_state(small_tmpfs):
    """A 1.6 MB state fits once on a 2 MiB filesystem, the second save runs out of space: a
    SaveError saying so, the temporary file gone (its space back), the first state intact."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256, dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 256, dtype=torch.float64)).sum().backward()
    opt.step()
    first = training_state.save(small_tmpfs, model=model, optimizer=opt, iteration=1, epoch=1,
                                comm=COMM, run_id="full")
    free = os.statvfs(small_tmpfs).f_bavail
    with pytest.raises(training_state.SaveError, match="no space left on device") as error:
        training_state.save(small_tmpfs, model=model, optimizer=opt, iteration=2, epoch=1,
                            comm=COMM, run_id="full")
    assert isinstance(error.value, PnodeError)      # one except clause catches every error
    with pytest.raises(InputError, match="letters, digits"):       # before anything is written
        training_state.save(small_tmpfs, model=model, optimizer=opt, iteration=2, epoch=1,
                            comm=COMM, run_id="../elsewhere")
    assert [p.name for p in small_tmpfs.iterdir()] == ["state-0000000001.h5"]
    assert os.statvfs(small_tmpfs).f_bavail == free
    assert training_state.verify(first) is None


def test_a_crafted_huge_header_is_refused_in_well_under_a_second(tmp_path):
    """A header claiming 1 TiB on a sparse file of that apparent size (a few KiB on disk):
    verify, load and pnode-inspect refuse it without reading the claimed length."""
    import time
    path = tmp_path / "state-0000000001.h5"
    with open(path, "wb") as f:
        f.write(training_state._header_bytes(1 << 40, "crafted", "ab" * 32))
        f.truncate(1 << 40)
    model, opt, _ = _trained(0)
    t0 = time.perf_counter()
    assert "claims 1099511627776 bytes but the file holds far fewer" in _verify_within(path)
    with pytest.raises(FileFormatError, match="a sparse file"):
        training_state.load(path, model=model, optimizer=opt, comm=COMM)
    with pytest.raises(FileFormatError, match="fails its check: its header claims"):
        describe(path)
    assert time.perf_counter() - t0 < 0.5
