"""TrainingSession under faults: states belong to their run (fresh runs refuse another run's folder
and delete nothing, --resume auto continues the folder's run, pruning spares other runs), a
state directory in use by another process is refused, and file failures on rank 0 (an
unwritable --out, a full disk during a save) end every rank promptly with one clear line."""
import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TimeMLP, run_mpi
from pnode_dist.training import state as training_state
from pnode_dist.parallel import MPI

sys.path.insert(0, str(ROOT / "apps"))
import workflow  # noqa: E402

COMM = MPI.COMM_SELF


def _run(out, resume=None, state_dir=None):
    model = TimeMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    args = argparse.Namespace(out=str(out), state_dir=state_dir, resume=resume, save_every=0,
                              no_progress=True, quick=False, seed=0)
    return workflow.TrainingSession(args, COMM, model, opt)


def _listing(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != ".lock"}


def test_states_belong_to_their_run(tmp_path):
    first = _run(tmp_path)
    assert first.resume() is None and len(first.run_id) == 32
    for i in (1, 2):
        first.save(i, 1, {"i": i})
    metrics = first.write_metrics({"loss": 1.0})
    assert json.loads(metrics.read_text())["run_id"] == first.run_id
    first.close()
    state = tmp_path / "state"
    before = _listing(state)

    with pytest.raises(workflow.RunError, match=(
            f"state directory {state} already holds 2 training state file\\(s\\) of another "
            f"run \\(run {first.run_id}\\): continue it with --resume auto, or use a new --out")):
        _run(tmp_path).resume()
    assert _listing(state) == before                       # nothing deleted or replaced

    again = _run(tmp_path, resume="auto")                  # the requeue case: same folder
    info = again.resume()
    assert info["iteration"] == 2 and again.run_id == first.run_id
    again.save(3, 1, {})
    again.close()

    elsewhere = _run(tmp_path / "b", resume=str(state / "state-0000000003.h5"))
    assert elsewhere.resume()["iteration"] == 3 and elsewhere.run_id == first.run_id
    elsewhere.close()

    # Another run's states next to this run's: pruning spares them, auto refuses to choose.
    model, opt = TimeMLP(), torch.optim.Adam(TimeMLP().parameters())
    training_state.save(state, model=model, optimizer=opt, iteration=50, epoch=1, comm=COMM,
                        run_id="intruder")
    again = _run(tmp_path, resume="auto")
    with pytest.raises(workflow.RunError, match="holds the states of 2 runs"):
        again.resume()
    again.close()
    assert "state-0000000050.h5" in _listing(state)


def test_auto_refuses_unreadable_or_older_files_and_damaged_runs(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state-0000000004.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    for resume, words in ((None, "1 unreadable or older file"),
                          ("auto", "may belong to another run, its header cannot be read "
                                   "\\(an HDF5 file without pnode_dist's checksum header")):
        run = _run(tmp_path, resume=resume)
        with pytest.raises(workflow.RunError, match=words):
            run.resume()
        run.close()
    os.remove(state / "state-0000000004.h5")
    first = _run(tmp_path, resume="auto")
    assert first.resume() is None
    path = first.save(1, 1, {})
    first.close()
    with open(path, "r+b") as f:
        f.truncate(3000)
    run = _run(tmp_path, resume="auto")
    with pytest.raises(workflow.RunError, match="no valid training state .* truncated"):
        run.resume()
    run.close()


def test_a_state_directory_in_use_is_refused(tmp_path):
    """Another process holds STATE_DIR/.lock: the run says who and what to do."""
    state = tmp_path / "state"
    state.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(state / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, b'pid 4242 on elsewhere')\n"
         "print('locked', flush=True)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        run = _run(tmp_path)
        with pytest.raises(workflow.RunError, match=(
                f"{state} is in use by another run \\(pid 4242 on elsewhere\\): wait until it "
                "ends, or use a new --out or --state-dir")):
            run.resume()
    finally:
        holder.kill()
        holder.wait()
    run = _run(tmp_path)                            # the lock went with its process
    assert run.resume() is None
    run.close()


def test_unwritable_out_ends_both_ranks_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    t0 = time.monotonic()
    proc = run_mpi(2, ROOT / "apps" / "cnf.py", "--quick", "--no-progress", "--out",
                   blocker / "out", timeout=90)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: --out {blocker / 'out'} cannot be written (Not a directory: "
                      f"{blocker / 'out'})"], proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 60


def test_full_disk_during_a_save_ends_both_ranks_cleanly(tmp_path, small_tmpfs):
    """The second 1.6 MB state does not fit on a 2 MiB state directory, under mpiexec -n 2:
    both ranks get the same error, rank 0 prints one line, the exit status is 1, the first
    state is kept and the temporary file removed."""
    proc = run_mpi(2, ROOT / "tests" / "mpi" / "run_faults.py", tmp_path / "out", small_tmpfs,
                   timeout=90)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert (f"rank {rank}: cannot save the training state {small_tmpfs}/state-0000000002.h5:"
                f" no space left on device (the earlier states are kept)") in proc.stdout, \
            proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: cannot save the training state {small_tmpfs}/state-0000000002.h5: no space "
        "left on device (the earlier states are kept)"], proc.stderr
    assert sorted(p.name for p in small_tmpfs.iterdir()) == [".lock", "state-0000000001.h5"]
    assert training_state.verify(small_tmpfs / "state-0000000001.h5") is None


@pytest.mark.parametrize("nranks, free", [(2, 0.05), (2, 0.5), (2, 0.95), (1, 0.3)])
def test_save_onto_a_nearly_full_disk_ends_cleanly(tmp_path, small_tmpfs, nranks, free):
    """The disk is filled until only a fraction of a state's size is free, then a save: it
    runs out of space part-way. One line on rank 0, exit status 1 (no signal, no traceback, no
    HDF5 messages), the earlier state intact and no temporary file left."""
    proc = run_mpi(nranks, ROOT / "tests" / "mpi" / "run_faults.py", tmp_path / "out",
                   small_tmpfs, free, timeout=90)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"error: cannot save the training state {small_tmpfs}/state-0000000002.h5: no space "
        "left on device (the earlier states are kept)"], proc.stderr
    assert sorted(p.name for p in small_tmpfs.iterdir()) == [".lock", "filler",
                                                             "state-0000000001.h5"]
    assert training_state.verify(small_tmpfs / "state-0000000001.h5") is None


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
    """Two runs with their own state directories and one --out: the second is refused with
    one line, the first's results stay; the first run resumed there goes on."""
    first = _run(tmp_path, state_dir=str(tmp_path / "s1"))
    first.resume()
    first.save(1, 1, {})
    metrics = first.write_metrics({"loss": 1.0})
    first.close()
    before = metrics.read_bytes()
    second = _run(tmp_path, state_dir=str(tmp_path / "s2"))
    with pytest.raises(workflow.RunError, match=(
            f"--out {tmp_path} holds the results of another run \\({first.run_id}: "
            "metrics.json\\); they are not replaced: use a new --out")):
        second.resume()
    second.close()
    assert metrics.read_bytes() == before
    again = _run(tmp_path, resume="auto", state_dir=str(tmp_path / "s1"))
    assert again.resume()["iteration"] == 1 and again.run_id == first.run_id
    again.close()
    (tmp_path / workflow.OWNER_FILE).unlink()          # results of a run before .pnode-run
    third = _run(tmp_path, state_dir=str(tmp_path / "s3"))
    with pytest.raises(workflow.RunError, match=f"another run \\({first.run_id}"):
        third.resume()
    third.close()


@pytest.mark.parametrize("resume", [None, "auto"])
def test_a_run_that_left_no_results_is_taken_over(tmp_path, resume):
    """A run that ended before writing any result (killed early, a failed first solve) leaves
    only OUT/.pnode-run and the lock files: the same command runs again, with or without
    --resume auto, takes OUT over and says so; a live run is refused, even with no results."""
    first = _run(tmp_path)
    first.resume()
    first.close()                                      # the process ended: its locks are gone
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        ".lock", ".pnode-run", "state", "state/.lock"]
    again = _run(tmp_path, resume=resume)
    notes = []
    again.say = notes.append
    assert again.resume() is None and again.run_id != first.run_id
    assert (tmp_path / workflow.OWNER_FILE).read_text() == again.run_id + "\n"
    assert f"--out {tmp_path}: run {first.run_id} left no results there; this run takes it " \
        "over" in notes, notes
    again.save(1, 1, {})
    again.close()

    live = _run(tmp_path / "b", state_dir=str(tmp_path / "s1"))
    live.resume()                                      # alive: holds b/.lock, no results yet
    other = _run(tmp_path / "b", state_dir=str(tmp_path / "s2"))
    with pytest.raises(workflow.RunError, match=f"{tmp_path / 'b'} is in use by another run "
                       f"\\(pid {os.getpid()} on "):
        other.resume()
    other.close()
    live.close()


def test_a_resumed_run_refuses_changed_options(tmp_path):
    """--resume auto with another --lr: refused with one line naming the option and both
    values (the saved optimizer's rate would be kept otherwise); --save-every may change."""
    first = _run(tmp_path)
    first.args.lr = 0.003
    first.resume()
    first.save(1, 1, {})
    first.close()
    changed = _run(tmp_path, resume="auto")
    changed.args.lr = 0.01
    with pytest.raises(workflow.RunError, match="saved with other options \\(--lr 0.01 "
                       "\\(saved 0.003\\)\\): a resumed run goes on with the options it was "
                       "saved with"):
        changed.resume()
    changed.close()
    same = _run(tmp_path, resume="auto")
    same.args.lr, same.args.save_every = 0.003, 5
    assert same.resume()["iteration"] == 1
    same.close()
