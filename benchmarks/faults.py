"""Faults on one rank of a 2-rank job, as a table: how each run ended, the seconds from launch to
the end of the job (imports of torch and PETSc included, about 2 s), and whether anything saved
was lost. The scenarios are the fault-injection tests' (tests/mpi/faults.py,
tests/mpi/run_faults.py), run once each with a 120 s limit (a hang would show as 'HUNG').

    .venv/bin/python benchmarks/faults.py          # needs root for the tmpfs (full disk) rows
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def launch(*args, env=None):
    """(exit status or 'HUNG', seconds, stdout + stderr) of `mpiexec -n 2 python args`."""
    cmd = ["mpiexec", "-n", "2", PY, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        status = "HUNG"
    return status, time.perf_counter() - start, out


def tmpfs(size):
    """A fresh tmpfs mount of `size` (None if mounting is not allowed)."""
    where = tempfile.mkdtemp(prefix="pnode-bench-fs-")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where],
                      capture_output=True).returncode != 0:
        os.rmdir(where)
        return None
    return where


def unmount(where):
    subprocess.run(["umount", "-l", where], check=False)
    os.rmdir(where)


def main():
    rows = []
    faults = ROOT / "tests" / "mpi" / "faults.py"
    full = tmpfs("2m")
    env = {}
    if full:
        with open(os.path.join(full, "filler"), "wb") as f:
            f.write(bytes((2 << 20) - (512 << 10)))
        env["PNODE_TEST_FULL_DIR"] = full
    status, seconds, out = launch(faults, "collective", env=env)
    cases = re.findall(r"^case (.*?) \[([\d.]+) s\]: (ok|FAILED)", out, re.M)
    worst = max(cases, key=lambda c: float(c[1])) if cases else ("-", "0", "-")
    failed = [c[0] for c in cases if c[2] != "ok"]
    rows.append((f"{len(cases)} collective cases: exception/NaN in func on rank 1 (6 methods x "
                 "3 policies x forward/adjoint, each then re-solved), damaged or full "
                 "checkpoint disk, no_grad on one rank, a skipped backward",
                 f"SolverError/InputError on both ranks{'' if not failed else '; FAILED: ' + str(failed)}",
                 f"{seconds:.1f} (whole run; slowest case {float(worst[1]):.2f})", "none"))
    if full:
        left = sorted(os.listdir(full))
        unmount(full)
        rows[-1] = rows[-1][:3] + ("none" if left == ["filler"] else f"files left: {left}",)
    for case, what in (("keyboard", "KeyboardInterrupt in func on rank 1"),
                       ("uncaught", "exception in user code on rank 1"),
                       ("lone-backward", "backward on rank 0 only (rank 1 exits)")):
        status, seconds, out = launch(faults, case)
        ended = "HUNG" if status == "HUNG" else ("MPI_Abort, reason printed" if
                                                 "aborting" in out or "exiting" in out
                                                 else f"exit {status}")
        rows.append((what, ended, f"{seconds:.1f}", "none"))
    scratch = Path(tempfile.mkdtemp(prefix="pnode-bench-"))
    blocker = scratch / "file"
    blocker.write_text("x")
    status, seconds, out = launch(ROOT / "apps" / "cnf.py", "--quick", "--no-progress",
                                  "--out", blocker / "out")
    rows.append(("unwritable --out (cnf app)", f"exit {status}, one line: "
                 f"{len([ln for ln in out.splitlines() if ln.startswith('error:')])}",
                 f"{seconds:.1f}", "none"))
    small = tmpfs("2m")
    if small:
        status, seconds, out = launch(ROOT / "tests" / "mpi" / "run_faults.py", scratch / "o",
                                      small)
        kept = sorted(os.listdir(small))
        unmount(small)
        rows.append(("disk full during a training-state save", f"exit {status} on both ranks",
                     f"{seconds:.1f}", f"none (kept: {', '.join(k for k in kept if k != '.lock')})"))
    shutil.rmtree(scratch)
    print("| fault | how it ended | seconds to exit | data lost |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
