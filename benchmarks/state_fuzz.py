"""Fuzz training-state files against `training_state.verify`: damaged copies of a real state
file must each be refused, or verify with content identical to the original, within a time
bound; no case may hang or crash the reader. Prints the counts.

    .venv/bin/python benchmarks/state_fuzz.py [--flips 5000] [--truncations 200] [--seed 0]
                                              [--state FILE] [--forged] [--json]

Cases: single-bit flips (half of them in the 512-byte header, half anywhere) and truncations
at random lengths. With --forged, each damaged copy gets a correct header again (a forged
checksum), so the damage reaches HDF5: this measures what the checksum protects against (the
HDF5 library can loop or crash on such files; expect hangs and crashes to be counted there).

Every verify runs in a worker process fed one case at a time; a case that takes longer than
--case-timeout seconds kills the worker (counted as a hang), a worker that dies is counted as a
crash; a fresh worker continues.
"""
import argparse
import json
import random
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def state_arrays(path):
    """Every dataset and attribute of an HDF5 file, as bytes (what 'identical content' means)."""
    import h5py
    import numpy as np
    out = {}

    def visit(name, obj):
        for k, v in obj.attrs.items():
            out[f"{name}@{k}"] = repr(v)
        if hasattr(obj, "dtype"):
            out[name] = np.asarray(obj[()]).tobytes()
    with h5py.File(path, "r") as f:
        for k, v in f.attrs.items():
            out[f"@{k}"] = repr(v) if k != "created" else ""
        f.visititems(visit)
    return out


def worker(reference):
    """Read case paths from stdin; answer one JSON line each: result, reason, seconds."""
    from pnode_dist.training import state as training_state
    expected = state_arrays(reference)
    for line in sys.stdin:
        path = line.rstrip("\n")
        t0 = time.perf_counter()
        reason = training_state.verify(path)
        result = "refused"
        if reason is None:
            try:
                result = "identical" if state_arrays(path) == expected else "different"
            except Exception as exc:                       # verified, then unreadable
                result, reason = "different", f"verified but unreadable: {exc}"
        print(json.dumps({"result": result, "reason": reason,
                          "seconds": time.perf_counter() - t0}), flush=True)


class Worker:
    def __init__(self, reference):
        self.cmd = [sys.executable, __file__, "--worker", str(reference)]
        self.proc = None

    def ask(self, path, timeout):
        """(answer dict) or {'result': 'hang'|'crash'}."""
        if self.proc is None:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, bufsize=1)
            first = True
        else:
            first = False
        t0 = time.perf_counter()
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        # The first answer waits for the worker's imports as well.
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + (60 if first else 0))
        if not ready:
            self.stop()
            return {"result": "hang", "seconds": time.perf_counter() - t0}
        line = self.proc.stdout.readline()
        if not line:
            self.stop()
            return {"result": "crash", "seconds": time.perf_counter() - t0}
        return json.loads(line)

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def make_state(directory):
    """A small real training state (MLP + Adam + scheduler), saved on one rank."""
    import torch
    from mpi4py import MPI

    from pnode_dist.training import state as training_state
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return training_state.save(directory, model=model, optimizer=opt, scheduler=sched,
                               iteration=2, epoch=1, comm=MPI.COMM_SELF, args={"fuzz": True},
                               progress={"batch": 2}, run_id="fuzz")


def forge(data):
    """The damaged bytes with a correct header again (length and SHA-256 recomputed)."""
    from pnode_dist import _sealed
    from pnode_dist.training import state as ts
    return _sealed.sealed_bytes(data, ts.KIND, ts.VERSION, "fuzz")


def cases(original, flips, truncations, seed):
    rng = random.Random(seed)
    size = len(original)
    for i in range(flips):
        bit = rng.randrange(512 * 8) if i % 2 == 0 else rng.randrange(size * 8)
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        yield f"flip byte {bit // 8} bit {bit % 8}", bytes(data)
    for _ in range(truncations):
        n = rng.randrange(size)
        yield f"truncated to {n}", original[:n]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flips", type=int, default=5000)
    p.add_argument("--truncations", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state", help="state file to damage (default: a small one made here)")
    p.add_argument("--forged", action="store_true",
                   help="re-seal every damaged copy with a correct checksum header")
    p.add_argument("--case-timeout", type=float, default=10.0)
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    scratch = tempfile.TemporaryDirectory(prefix="pnode-state-fuzz-")
    state = Path(args.state or make_state(scratch.name))
    original = state.read_bytes()
    case_path = Path(scratch.name) / "case.h5"
    w = Worker(state)
    counts = {"identical": 0, "refused": 0, "different": 0, "hang": 0, "crash": 0}
    reasons, bad, slowest = {}, [], (0.0, None)
    t0 = time.perf_counter()
    try:
        for name, data in cases(original, args.flips, args.truncations, args.seed):
            case_path.write_bytes(forge(data) if args.forged else data)
            answer = w.ask(str(case_path), args.case_timeout)
            counts[answer["result"]] += 1
            if answer["result"] == "refused":
                key = answer["reason"].split(" (")[0]
                reasons[key] = reasons.get(key, 0) + 1
            elif answer["result"] != "identical":
                bad.append(f"{name}: {answer['result']} {answer.get('reason') or ''}".strip())
            if answer["seconds"] > slowest[0]:
                slowest = (answer["seconds"], name)
    finally:
        w.stop()
    summary = {"cases": sum(counts.values()), **counts, "max_seconds": slowest[0],
               "slowest_case": slowest[1], "total_seconds": time.perf_counter() - t0,
               "file_bytes": len(original), "forged": args.forged, "reasons": reasons,
               "bad_cases": bad[:20]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['cases']} damaged copies of a {len(original)}-byte training state"
              f"{' (forged checksums)' if args.forged else ''}: {counts['identical']} accepted "
              f"with identical content, {counts['refused']} refused, {counts['different']} "
              f"accepted with different content, {counts['hang']} hangs, {counts['crash']} "
              f"crashes; slowest {slowest[0] * 1e3:.1f} ms ({slowest[1]}), total "
              f"{summary['total_seconds']:.1f}s")
        for key, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  refused {n:6d}: {key}")
        for line in bad[:20]:
            print(f"  BAD {line}")
    if args.forged:                          # a measurement: damage reaching HDF5 is expected
        return 0
    return 0 if not (counts["different"] or counts["hang"] or counts["crash"]) else 1


if __name__ == "__main__":
    sys.exit(main())
