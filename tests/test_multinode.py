"""Runs across nodes, on a three-node SLURM cluster made of network namespaces on this machine
(tests/slurm_cluster.py NetworkCluster: own hostnames, addresses on a private bridge, node-local
scratch, a shared file system): MPI traffic between nodes crosses the network, the multi-node
job scripts give the results of one node bit for bit with both launchers, a node that dies
mid-run is survived (SLURM requeues the job, it resumes on the nodes left, bitwise equal to an
uninterrupted run), and nothing of the cluster is left behind. Skipped when not root."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import RESUME_ARGS, ROOT, assert_same_state, run_mpi
from pnode_dist.training import state as training_state
from slurm_cluster import NetworkCluster, SlurmUnavailable, remove_stale_clusters

pytestmark = pytest.mark.long        # minutes: a three-node cluster (make test-long)

JOBS = ROOT / "jobscripts"
PYTHON = ROOT / ".venv" / "bin" / "python"

# Each rank prints its host, then allreduces 4 MiB four times.
TRAFFIC = textwrap.dedent("""
    import socket, numpy
    from mpi4py import MPI
    data = numpy.ones(2 ** 19)
    for _ in range(4):
        MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, data)
    print(MPI.COMM_WORLD.Get_rank(), socket.gethostname(), data[0], flush=True)
""")
TRAFFIC_BYTES = 4 * 2 ** 22


@pytest.fixture(scope="module")
def cluster():
    try:
        c = NetworkCluster(nodes=3)
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    try:
        c.start()
    except SlurmUnavailable as exc:
        c.stop()
        pytest.skip(str(exc))
    yield c
    c.stop()
    assert c.leftovers() == [], c.leftovers()


def _submit(cluster, tmp_path, script, *args, launcher="srun", nodes=2):
    env = {"PNODE_RUNS": str(tmp_path), "PNODE_LAUNCHER": launcher,
           "PNODE_LOCAL_DIR": str(cluster.scratch)}
    return cluster.sbatch(JOBS / script, *args, cwd=ROOT, env=env,
                          options=(f"--nodes={nodes}", "--ntasks-per-node=1",
                                   f"--output={tmp_path}/slurm-%j.out"))


def _finished(cluster, tmp_path, job, app, timeout=240):
    info = cluster.wait(job, timeout=timeout)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    metrics = json.loads((tmp_path / f"{app}-{job}" / "metrics.json").read_text())
    return info, log, metrics


def _srun(cluster, *options):
    out = subprocess.run(["srun", "--mpi=pmi2", *options, str(PYTHON), "-c", TRAFFIC],
                         capture_output=True, text=True, env=cluster.env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return sorted(line.split()[1] for line in out.stdout.splitlines())


def test_mpi_between_nodes_goes_over_the_network(cluster):
    """Two ranks on two nodes: distinct host names, and the allreduce's bytes pass through
    the second node's link. Two ranks on one node: MPICH uses shared memory, the link stays
    quiet. (The control makes the first check mean something.)"""
    before = {node: cluster.interface_bytes(node) for node in cluster.nodes}
    assert _srun(cluster, "--nodes=2", "--ntasks-per-node=1", "-w", "node1,node2") == \
        ["node1", "node2"]
    crossed = cluster.interface_bytes("node2") - before["node2"]
    assert crossed > TRAFFIC_BYTES, crossed
    before = cluster.interface_bytes("node3")
    assert _srun(cluster, "--nodes=1", "--ntasks=2", "-w", "node3") == ["node3", "node3"]
    assert cluster.interface_bytes("node3") - before < TRAFFIC_BYTES / 20


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_two_nodes_equal_one_node(cluster, tmp_path, classify_reference, launcher):
    """classify-multinode.sbatch with one rank on each of two nodes ends with the parameters
    and optimizer state of the same run on one node, bit for bit (batch layout, 2 ranks)."""
    job = _submit(cluster, tmp_path, "classify-multinode.sbatch", *RESUME_ARGS,
                  launcher=launcher)
    _, log, metrics = _finished(cluster, tmp_path, job, "classify")
    assert len(set(metrics["hosts"])) == 2 and "ranks on 2 hosts" in log, log
    assert_same_state(classify_reference, metrics["training_state"])


# pde with its checkpoints beyond 70 kB per rank in the HDF5 tier
PDE_ARGS = ("--quick", "--checkpoint", "binomial", "--slots", "6", "--host-bytes", "70000",
            "--verbose")


@pytest.fixture(scope="module")
def pde_one_node(tmp_path_factory):
    """(metrics, output) of PDE_ARGS on 2 ranks of this machine, the tier on a local folder."""
    out = tmp_path_factory.mktemp("pde-one-node")
    (out / "disk").mkdir()
    proc = run_mpi(2, ROOT / "apps" / "pde.py", *PDE_ARGS, "--no-progress", "--out", out,
                   "--disk-dir", out / "disk", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "metrics.json").read_text()), proc.stdout


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_grid_across_nodes_with_node_local_checkpoints(cluster, tmp_path, pde_one_node,
                                                       launcher):
    """pde.sbatch on two nodes (the DMDA's halo exchange crosses the network), its HDF5
    checkpoint tier on each node's own scratch: the result equals the same run on one node
    bit for bit, the tier was used, nothing of it reached the shared file system, and every
    node's scratch is empty after the job."""
    one, one_log = pde_one_node
    job = _submit(cluster, tmp_path, "pde.sbatch", *PDE_ARGS, launcher=launcher)
    _, log, metrics = _finished(cluster, tmp_path, job, "pde")
    assert len(set(metrics["hosts"])) == 2, log
    assert f"node-local scratch {cluster.scratch}/pnode-{job}" in log, log
    disk_peaks = re.findall(r"disk_bytes_peak=(\d+)", log)
    assert disk_peaks and int(disk_peaks[0]) > 0, log                 # the tier was used
    assert disk_peaks == re.findall(r"disk_bytes_peak=(\d+)", one_log)
    assert metrics["held_out_relative_error"] == one["held_out_relative_error"]
    assert_same_state(one["training_state"], metrics["training_state"])
    assert list(cluster.scratch.iterdir()) == []            # the shared file system's view
    for node in ("node1", "node2"):
        listing = cluster.run_on(node, "ls", "-A", str(cluster.scratch))
        assert listing.returncode == 0 and listing.stdout == "", (node, listing)


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_node_failure_requeues_and_resumes_exactly(cluster, tmp_path, classify_reference,
                                                   launcher):
    """node2 dies (everything on it SIGKILLed) after the first training state is written:
    the job ends (srun: SLURM cancels it as NODE_FAIL; mpiexec: Hydra sees its proxy go,
    run_app.sh sees the node gone and waits for SLURM), SLURM requeues it, it restarts on
    node1 and node3, resumes from the newest valid state, and ends bitwise equal to an
    uninterrupted run. Every state file left is valid. Node2 comes back for the next test."""
    job = _submit(cluster, tmp_path, "classify-multinode.sbatch", *RESUME_ARGS,
                  launcher=launcher)
    state_dir = tmp_path / f"classify-{job}" / "state"
    deadline = time.monotonic() + 120
    while not list(state_dir.glob("state-*.h5")):
        assert time.monotonic() < deadline, cluster.job(job)
        time.sleep(0.02)
    try:
        cluster.kill_node("node2")
        killed = time.monotonic()
        cluster.wait_restarted(job, timeout=120)
        restarted = time.monotonic() - killed
        info, log, metrics = _finished(cluster, tmp_path, job, "classify")
    finally:
        cluster.restart_node("node2")
    assert info["Restarts"] == "1" and "resumed from" in log, log
    assert restarted < 60, restarted
    assert sorted(set(metrics["hosts"])) == ["node1", "node3"], log
    assert_same_state(classify_reference, metrics["training_state"])
    for path in state_dir.glob("state-*.h5"):
        assert training_state.verify(path) is None, path
    assert not list(state_dir.glob("*.tmp")), list(state_dir.iterdir())


def test_app_error_on_two_nodes_fails_the_job(cluster, tmp_path):
    """An error of the app itself, every node alive: the job fails with the app's status and
    is not requeued (run_app.sh's lost-node check finds both nodes answering)."""
    job = _submit(cluster, tmp_path, "classify-multinode.sbatch", "--quick", "--resume",
                  str(tmp_path / "missing.h5"))
    info = cluster.wait(job, timeout=120)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert info["Restarts"] == "0" and "does not answer" not in log, log


def test_a_killed_test_run_leaves_nothing(tmp_path):
    """A test process SIGKILLed with its cluster up: the next cluster's start removes that
    cluster's daemons, namespaces, links and directory (remove_stale_clusters)."""
    if os.geteuid() != 0:
        pytest.skip("the test cluster needs root")
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from slurm_cluster import NetworkCluster
        c = NetworkCluster(nodes=2).start()
        print(c.dir, *c.netns.values(), c.bridge, *c.spawned, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline().split()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(line) == 1 + 2 + 1 + 4, line    # dir, 2 namespaces, bridge, 4 daemons
    directory, ns1, ns2, bridge, *pids = line
    removed = remove_stale_clusters()
    assert directory in removed and ns1 in removed and ns2 in removed, removed
    assert not os.path.exists(directory)
    assert not os.path.exists(f"/sys/class/net/{bridge}")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns1 not in netns and ns2 not in netns
    deadline = time.monotonic() + 10                # SIGKILL lands asynchronously
    while not all(_dead(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_dead(pid) for pid in pids), pids


def _dead(pid):
    """The process is gone, or a zombie waiting for its new parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
