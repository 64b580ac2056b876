"""Communication across nodes against one node, and a node failure, on the namespace cluster.

    .venv/bin/python benchmarks/multinode.py          # as root; about three minutes

It starts tests/slurm_cluster.py's NetworkCluster (three nodes, each with its own hostname,
address on a private bridge, IPC and PID namespaces) and reports:
1. the time for the cluster to come up (all nodes idle);
2. two ranks on one node (MPICH through shared memory) against one rank on each of two nodes
   (TCP over the bridge), measured in one job each, 1 thread per rank:
   - ping-pong between the two ranks, fitted to t(n) = alpha + n beta (latency, bandwidth);
   - the once-per-backward gradient allreduce for 1e3 .. 1e6 parameters (float64);
   - the grid's halo exchange (pnode_dist.Grid, 2 channels, halo 2, periodic, 2x1 ranks),
     per exchange, copies into and out of PETSc's vectors included;
   each next to what the alpha-beta model fitted on the same placement predicts;
3. a node dying during classify-multinode.sbatch (SIGKILL to everything on it): the time
   until SLURM has the job running again on the nodes left, per launcher.
The bridge is a software switch in one kernel: its latency and bandwidth are those of the
kernel's TCP stack, not of a cluster network; the ratios say how much the code's traffic
depends on them, the model says how to scale them to a real network.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
SIZES = [8 * 4 ** k for k in range(10)]           # ping-pong bytes: 8 B .. 2 MiB
ALLREDUCE = {f"1e{k} doubles": 10 ** k for k in (3, 4, 5, 6)}     # parameter counts
HALO_FIELDS = (64, 512)
CHANNELS, HALO = 2, 2


# ---------------------------------------------------------------------------------- worker
def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker():
    import numpy as np
    import torch

    from pnode_dist import Grid
    from pnode_dist.parallel import MPI
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, other = comm.Get_rank(), 1 - comm.Get_rank()
    result = {"hosts": comm.allgather(os.uname().nodename)}

    pingpong = {}
    for n in SIZES:
        buf = np.zeros(n, dtype=np.uint8)

        def exchange():
            if rank == 0:
                comm.Send(buf, other)
                comm.Recv(buf, other)
            else:
                comm.Recv(buf, other)
                comm.Send(buf, other)
        exchange()
        comm.Barrier()
        pingpong[n] = _median_time(exchange, 50 if n < 2 ** 20 else 10) / 2   # one way
    result["pingpong"] = pingpong

    allreduce = {}
    for name, count in ALLREDUCE.items():
        data = np.ones(count)
        comm.Barrier()
        allreduce[name] = comm.allreduce(
            _median_time(lambda: comm.Allreduce(MPI.IN_PLACE, data), 30), op=MPI.MAX)
    result["allreduce"] = allreduce

    halo = {}
    for side in HALO_FIELDS:
        grid = Grid((side, side), channels=CHANNELS, periodic=True, halo=HALO,
                    proc_sizes=(2, 1))
        patch = grid.wrap(lambda t, field: field)
        y = torch.randn(grid.vec_shape, dtype=torch.float64)
        for _ in range(5):
            patch(0.0, y)
        before = dict(grid.stats)
        comm.Barrier()
        for _ in range(100):
            patch(0.0, y)
        seconds = grid.stats["halo_seconds"] - before["halo_seconds"]
        exchanges = grid.stats["exchanges"] - before["exchanges"]
        local = Grid(grid.local_spatial, channels=CHANNELS, periodic=True, halo=HALO,
                     comm=MPI.COMM_SELF)         # the same patch, its halo from itself
        alone = local.wrap(lambda t, field: field)
        y_alone = torch.randn(local.vec_shape, dtype=torch.float64)
        for _ in range(5):
            alone(0.0, y_alone)
        copies = _median_time(lambda: alone(0.0, y_alone), 100)
        halo[side] = {"seconds": comm.allreduce(seconds / exchanges, op=MPI.MAX),
                      "copies": comm.allreduce(copies, op=MPI.MAX),
                      "local": list(grid.local_spatial)}
        grid.destroy()
        local.destroy()
    result["halo"] = halo
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------- driver
def fit(pingpong):
    """Least squares t = alpha + n beta over the ping-pong sizes (seconds, seconds/byte)."""
    import numpy as np
    n = np.array([float(k) for k in pingpong])
    t = np.array(list(pingpong.values()))
    weights = 1 / t                                  # relative error: small sizes count too
    a = np.stack([np.ones_like(n), n], axis=1) * weights[:, None]
    alpha, beta = np.linalg.lstsq(a, t * weights, rcond=None)[0]
    return max(alpha, 0.0), beta


def predict_allreduce(count, alpha, beta):
    """2 ranks: reduce-scatter then allgather, each one message of half the vector."""
    return 2 * (alpha + 4 * count * beta)


def predict_halo(local, copies, alpha, beta):
    """2x1 periodic ranks: the copies into and out of PETSc's vectors (measured on one rank
    with the same patch) plus one message each way to the neighbour, which is the same rank
    above and below: both edges, HALO rows of the patch width, CHANNELS values each."""
    return copies + alpha + 2 * HALO * local[1] * CHANNELS * 8 * beta


def run_worker(cluster, *placement):
    out = subprocess.run(["srun", "--mpi=pmi2", *placement, str(PYTHON), __file__, "--worker"],
                         capture_output=True, text=True, env=dict(cluster.env, OMP_NUM_THREADS="1",
                                                                  PYTHONPATH=str(ROOT)),
                         timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def communication(cluster):
    shm = run_worker(cluster, "--nodes=1", "--ntasks=2", "-w", "node1")
    net = run_worker(cluster, "--nodes=2", "--ntasks-per-node=1", "-w", "node1,node2")
    print(f"\none node: ranks on {shm['hosts']}; two nodes: ranks on {net['hosts']}")
    models = {}
    for name, r in (("one node", shm), ("two nodes", net)):
        alpha, beta = models[name] = fit({int(k): v for k, v in r["pingpong"].items()})
        print(f"  {name:>9}: latency alpha {alpha * 1e6:7.1f} us, bandwidth 1/beta "
              f"{1 / beta / 2 ** 30:6.2f} GiB/s (fit of ping-pong 8 B .. 2 MiB)")
    print(f"\n{'per operation':34} {'one node (shm)':>22} {'two nodes (bridge)':>22} {'ratio':>6}")
    print(f"{'':34} {'measured':>10} {'model':>11} {'measured':>10} {'model':>11}")
    rows = [(f"allreduce {name} ({8 * count / 1024:.0f} KiB)", shm["allreduce"][name],
             net["allreduce"][name], lambda m, c=count: predict_allreduce(c, *m))
            for name, count in ALLREDUCE.items()]
    for side in HALO_FIELDS:
        local = net["halo"][str(side)]["local"]
        rows.append((f"halo {side}^2 (patch {local[0]}x{local[1]})",
                     shm["halo"][str(side)]["seconds"], net["halo"][str(side)]["seconds"],
                     lambda m, loc=local, s=str(side): predict_halo(
                         loc, min(shm["halo"][s]["copies"], net["halo"][s]["copies"]), *m)))
    for label, one, two, model in rows:
        print(f"{label:34} {one * 1e6:8.0f}us {model(models['one node']) * 1e6:9.0f}us "
              f"{two * 1e6:8.0f}us {model(models['two nodes']) * 1e6:9.0f}us {two / one:6.1f}")
    print("(halo: per exchange, the copies into and out of PETSc's vectors included; its model "
          "adds those copies, timed on one rank, to alpha + bytes beta)")


def node_failure(cluster, launcher, tmp):
    """Seconds from node2's death to the job running again, and whether it then finished."""
    args = ("--epochs", "3", "--limit", "1024", "--batch-size", "32", "--no-progress",
            "--save-every", "1")
    job = cluster.sbatch(ROOT / "jobscripts" / "classify-multinode.sbatch", *args, cwd=ROOT,
                         env={"PNODE_RUNS": str(tmp), "PNODE_LAUNCHER": launcher,
                              "PNODE_LOCAL_DIR": str(cluster.scratch)},
                         options=("--nodes=2", "--ntasks-per-node=1",
                                  f"--output={tmp}/slurm-%j.out"))
    state_dir = tmp / f"classify-{job}" / "state"
    deadline = time.monotonic() + 300
    while not list(state_dir.glob("state-*.h5")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no training state after 300 s: {cluster.job(job)}")
        time.sleep(0.02)
    cluster.kill_node("node2")
    killed = time.monotonic()
    phases, last = {}, None
    while time.monotonic() - killed < 300:
        info = cluster.job(job)
        key = (info.get("JobState"), int(info.get("Restarts") or 0))
        if key != last:
            phases[f"{key[0].lower()} (restarts {key[1]})"] = time.monotonic() - killed
            last = key
        if key[1] >= 1 and "pending (restarts 1)" in phases and key[0] != "PENDING":
            break
        time.sleep(0.1)
    info = cluster.wait(job, timeout=300)
    cluster.restart_node("node2")
    return phases, info["JobState"], info.get("NodeList")


def main():
    sys.stdout.reconfigure(line_buffering=True)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip-failure", action="store_true", help="communication only")
    args = p.parse_args()
    if args.worker:
        return worker()
    sys.path.insert(0, str(ROOT / "tests"))
    import tempfile

    from slurm_cluster import NetworkCluster
    t0 = time.monotonic()
    cluster = NetworkCluster(nodes=3)
    try:
        cluster.start()
        print(f"cluster of {len(cluster.nodes)} nodes idle {time.monotonic() - t0:.2f} s after "
              "the start (bridge, namespaces, munged, slurmctld, slurmds)")
        communication(cluster)
        if not args.skip_failure:
            print("\nnode2 killed during classify-multinode.sbatch (2 nodes, 1 rank each; "
                  f"SlurmdTimeout {cluster.slurmd_timeout} s):")
            with tempfile.TemporaryDirectory() as tmp:
                for launcher in ("srun", "mpiexec"):
                    phases, state, nodes = node_failure(cluster, launcher, Path(tmp))
                    steps = ", ".join(f"{k} at {v:.1f} s" for k, v in phases.items())
                    print(f"  {launcher:>7}: {steps}; then {state} on {nodes}")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
