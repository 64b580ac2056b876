"""Real SLURM clusters for the tests, started from Debian's slurmctld, slurmd and munge in a
temporary directory and torn down by PID (and, for namespaces and links, by name):
SlurmCluster, one node on localhost (the job-script tests); NetworkCluster, several nodes made
of network, UTS, mount, IPC and PID namespaces on a bridge (the multi-node tests).

Facts this relies on (measured on the project's machines): munged needs its socket in a
directory whose parents are all world-searchable (a short /tmp dir of mode 755; the key's dir
0700); RealMemory must not exceed what `slurmd -C` reports; slurmd starts with `-N localhost`;
MpiDefault=pmi2 for srun MPI launches; batch_sched_delay=0 starts jobs within about a second;
a requeued job may start again after cred_expire seconds, but only at the next pass of the main
scheduler (sched_interval, 60 s by default: 1 s here); a node whose slurmd stops answering
is marked down after SlurmdTimeout plus a ping period, its jobs cancelled (NODE_FAIL) and, with
--requeue, requeued; a restarted slurmd returns it to service (ReturnToService=2).
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
DIR_PREFIX = "pslurm"          # /tmp/pslurm<pid of the test process>-XXXX
NAME_PREFIX = "pnode"          # namespaces pnode<pid>n<i>, bridge pnode<pid>b, veths pnode<pid>v<i>


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the test cluster; the message says why."""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware():
    """(cpus, real memory MiB) as slurmd -C reports them."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    cpus = int(re.search(r"CPUs=(\d+)", out).group(1))
    memory = int(re.search(r"RealMemory=(\d+)", out).group(1))
    return cpus, memory


class SlurmCluster:
    """slurmctld + slurmd (+ munged) on localhost; `env` is what sbatch/squeue need."""

    def __init__(self):
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test SLURM runs its daemons as root; run the tests as root")
        missing = [d for d in DAEMONS + ("sbatch",) if shutil.which(d) is None]
        if missing:
            raise SlurmUnavailable(f"{', '.join(missing)} not found: run 'make setup' "
                                   "(Debian packages slurmctld slurmd slurm-client munge)")
        remove_stale_clusters()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.procs = []
        self.spawned = []                       # every daemon's PID, for leftovers()
        self.env = dict(os.environ, SLURM_CONF=str(self.dir / "slurm.conf"))
        self.nodes = ["localhost"]
        self.controller = "localhost"
        self.slurmd_timeout = 300
        self.kill_wait = 10                     # SIGTERM -> SIGKILL when a job is cancelled

    def log(self, name):
        """The tail of a daemon's log (slurmctld, slurmd.<node>, munged)."""
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout=60):
        try:
            self._start_munge()
            self._write_config()
            self._spawn(["slurmctld", "-D", "-i", "-f", str(self.dir / "slurm.conf")],
                        "slurmctld")
            self._start_nodes()
            self._wait_for_idle_nodes(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, cmd, name):
        log = open(self.dir / f"{name}.out", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        self.spawned.append(proc.pid)
        with open(self.dir / "daemons", "a") as pids:     # for remove_stale_clusters
            pids.write(f"{proc.pid}\n")
        return proc

    def _start_munge(self):
        keydir = self.dir / "munge-etc"
        keydir.mkdir(mode=0o700)
        key = keydir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        rundir = self.dir / "munge-run"
        rundir.mkdir(mode=0o755)
        self.munge_socket = rundir / "munge.socket"
        self._spawn(["munged", "--foreground", "--force", f"--key-file={key}",
                     f"--socket={self.munge_socket}", f"--pid-file={rundir / 'munged.pid'}",
                     f"--log-file={self.dir / 'munged.log'}",
                     f"--seed-file={keydir / 'munged.seed'}"], "munged")
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if time.monotonic() > deadline or self.procs[-1].poll() is not None:
                raise SlurmUnavailable(f"munged did not start:\n{self.log('munged')}")
            time.sleep(0.05)

    def _write_config(self):
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        (d / "plugstack.conf").write_text("")
        (d / "slurm.conf").write_text(f"""\
ClusterName=pnodetest
SlurmctldHost={self.controller}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
CredType=cred/munge
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool' / '%n'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.%n.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.%n.log'}
PlugStackConfig={d / 'plugstack.conf'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_interval=1
ReturnToService=2
JobRequeue=1
KillWait={self.kill_wait}
MinJobAge=300
SlurmdTimeout={self.slurmd_timeout}
MessageTimeout=5
{self._node_lines()}
PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        for node in self.nodes:
            (d / "spool" / node).mkdir()

    # ------------------------------------------------------------------ the nodes
    def _node_lines(self):
        cpus, memory = _node_hardware()
        return f"NodeName=localhost CPUs={cpus} RealMemory={max(1, memory - 512)} State=UNKNOWN"

    def _start_nodes(self):
        self._spawn(["slurmd", "-D", "-N", "localhost", "-f", str(self.dir / "slurm.conf")],
                    "slurmd.localhost")

    def _logs(self):
        return "\n".join(self.log(name) for name in
                         ["slurmctld"] + [f"slurmd.{node}" for node in self.nodes])

    def node_states(self):
        """{node: state} as sinfo reports them (idle, alloc, down*, ...)."""
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True,
                             text=True, env=self.env, timeout=30).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def _wait_for_idle_nodes(self, timeout):
        deadline = time.monotonic() + timeout
        states = {}
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{proc.args[0]} exited:\n{self._logs()}")
            states = self.node_states()
            if sorted(states) == sorted(self.nodes) and set(states.values()) == {"idle"}:
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"the nodes did not become idle ({states}) in {timeout}s:\n"
                               f"{self._logs()}")

    def stop(self):
        """Cancel what still runs, then stop the daemons by PID (SIGTERM, then SIGKILL)."""
        if self.procs:
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                except ProcessLookupError:
                    pass
        self.procs.clear()
        self._remove_network()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_network(self):
        """Nothing to remove on localhost."""

    def leftovers(self):
        """What of this cluster still exists (daemons, its directory; for NetworkCluster also
        namespaces, links, mounts): [] after stop()."""
        found = [f"pid {pid}" for pid in self.spawned if _alive(pid)]
        return found + ([str(self.dir)] if self.dir.exists() else [])

    # ------------------------------------------------------------------ jobs
    def sbatch(self, script, *args, cwd, env=None, options=()):
        """Submit `script` with sbatch `options`; returns the job id."""
        out = subprocess.run(["sbatch", "--parsable", *options, str(script), *map(str, args)],
                             capture_output=True, text=True, cwd=cwd,
                             env=dict(self.env, **(env or {})), check=False)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id):
        """scontrol's fields of the job (JobState, ExitCode, Restarts...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                             text=True, env=self.env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id, timeout):
        """Wait until the job has ended; returns its final fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                        "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                return info
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], env=self.env)
        raise TimeoutError(f"job {job_id} did not end in {timeout}s: {self.job(job_id)}")

    def signal_batch_script(self, job_id, name="USR1"):
        """What `#SBATCH --signal=B:USR1@T` does T seconds before the time limit."""
        subprocess.run(["scancel", f"--signal={name}", "--batch", job_id], env=self.env,
                       check=True, capture_output=True)


# ====================================================================== several nodes
def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _alive(pid):
    return Path(f"/proc/{pid}").exists()


def remove_stale_clusters():
    """Remove what test clusters left when the process that made them was killed before its
    clean-up: their daemons (by the PIDs each cluster wrote down, checked against their command
    line), directories, namespaces and links. Returns what was removed."""
    removed = []
    for d in Path("/tmp").glob(f"{DIR_PREFIX}*-*"):
        m = re.fullmatch(DIR_PREFIX + r"(\d+)-.*", d.name)
        if m is None or _alive(m.group(1)):
            continue
        pids = (d / "daemons").read_text().split() if (d / "daemons").exists() else []
        for pid in pids:
            try:
                if str(d) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    _kill(int(pid), signal.SIGKILL)
                    removed.append(f"pid {pid}")
            except OSError:
                pass
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line]
    links = [line.split(":")[1].strip().split("@")[0]
             for line in _ip("-o", "link", "show").stdout.splitlines()]
    for name in names + links:
        m = re.fullmatch(NAME_PREFIX + r"(\d+)[nbv]\d*", name)
        if m is None or _alive(m.group(1)):
            continue
        if name in names:
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                _kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
        else:
            _ip("link", "del", name, check=False)
        removed.append(name)
    return removed


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class NetworkCluster(SlurmCluster):
    """slurmctld and munged in this namespace; one slurmd per node, each in its own network,
    UTS, mount, IPC and PID namespaces: its own hostname (node1, node2, ...), its own address
    on a bridge made for the cluster, its own /etc/hosts naming the nodes (DNS on a real
    cluster) and its own node-local scratch, a tmpfs mounted at `self.scratch` (the same path
    on every node, as /tmp or $TMPDIR on a cluster). The rest of the file system is shared,
    like NFS. Separate IPC and PID namespaces matter: UCX (MPICH's network layer here) knows
    the machine by its kernel's boot id, the same for every node, and would pass messages
    between "nodes" through shared memory or cross-memory attach unless their IPC and PID
    namespaces differ; then it uses TCP over the bridge, as between real machines.
    Everything is removed by PID and by name in stop(), and remove_stale_clusters() clears
    what a killed test run left."""

    def __init__(self, nodes=3, cpus=2, slurmd_timeout=10, scratch_mib=256):
        super().__init__()
        if shutil.which("ip") is None or shutil.which("nsenter") is None:
            raise SlurmUnavailable("the multi-node test cluster needs iproute2 and nsenter")
        tag = f"{NAME_PREFIX}{os.getpid()}"
        subnet = f"10.{90 + os.getpid() % 100}.{os.getpid() // 100 % 250}"
        self.bridge, self.netns = f"{tag}b", {}
        self.veth, self.address = {}, {}
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        for i, node in enumerate(self.nodes, start=1):
            self.netns[node], self.veth[node] = f"{tag}n{i}", f"{tag}v{i}"
            self.address[node] = f"{subnet}.{10 + i}"
        if len(tag) + 3 > 15:
            raise SlurmUnavailable(f"link name {tag}v{nodes} is longer than Linux allows")
        self.controller_address = f"{subnet}.1"
        self.controller = f"{socket.gethostname()}({self.controller_address})"
        self.cpus, self.slurmd_timeout, self.scratch_mib = cpus, slurmd_timeout, scratch_mib
        self.kill_wait = 3
        self.scratch = self.dir / "scratch"      # empty here; a tmpfs inside each node
        self.scratch.mkdir()
        self.slurmd = {}

    def _node_lines(self):
        return "\n".join(f"NodeName={node} NodeAddr={self.address[node]} CPUs={self.cpus} "
                         "State=UNKNOWN" for node in self.nodes)

    def _start_nodes(self):
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.controller_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            hosts = self.dir / "hosts"
            hosts.write_text("127.0.0.1 localhost\n"
                             f"{self.controller_address} {socket.gethostname()}\n"
                             + "".join(f"{self.address[n]} {n}\n" for n in self.nodes))
            for node in self.nodes:
                self._start_node(node)
        except subprocess.CalledProcessError as exc:
            raise SlurmUnavailable(f"cannot build the test network ({' '.join(exc.cmd)}): "
                                   f"{exc.stderr.strip()}") from exc

    def _start_node(self, node):
        ns, veth = self.netns[node], self.veth[node]
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        for args in (("addr", "add", f"{self.address[node]}/24", "dev", "eth0"),
                     ("link", "set", "eth0", "up"), ("link", "set", "lo", "up")):
            _ip("netns", "exec", ns, "ip", *args)
        self._start_slurmd(node)

    def _start_slurmd(self, node):
        """slurmd of `node` in the node's network namespace and new UTS and mount ones."""
        ns, hosts = self.netns[node], self.dir / "hosts"
        setup = (f"hostname {node} && mount --bind {hosts} /etc/hosts && "
                 f"mount -t tmpfs -o size={self.scratch_mib}m,mode=1777 tmpfs {self.scratch} && "
                 f"exec slurmd -D -N {node} -f {self.dir / 'slurm.conf'}")
        self.slurmd[node] = self._spawn(
            ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "--ipc",
             "--pid", "--fork", "--mount-proc", "--propagation", "private", "sh", "-c", setup],
            f"slurmd.{node}")

    def run_on(self, node, *cmd, **kwargs):
        """Run a command on `node`: in its network, UTS and mount namespaces."""
        pid = self.slurmd[node].pid
        return subprocess.run(["nsenter", "-t", str(pid), "--net", "--uts", "--mount", *cmd],
                              capture_output=True, text=True, **kwargs)

    def interface_bytes(self, node):
        """Bytes the node's link to the bridge has carried (received + sent)."""
        stats = Path(f"/sys/class/net/{self.veth[node]}/statistics")
        return sum(int((stats / f).read_text()) for f in ("rx_bytes", "tx_bytes"))

    def kill_node(self, node):
        """The node dies: SIGKILL to everything in its network namespace (slurmd, step
        daemons, ranks), as a power loss would; its namespaces stay, empty."""
        for pid in _ip("netns", "pids", self.netns[node], check=False).stdout.split():
            _kill(int(pid), signal.SIGKILL)
        self.slurmd[node].wait(timeout=10)

    def wait_restarted(self, job_id, timeout):
        """Wait until the job, requeued, has left the queue again (its next start); returns
        its fields then. (A requeued job counts the restart while its first start is still
        completing, then waits in PENDING for at least cred_expire seconds.)"""
        deadline = time.monotonic() + timeout
        requeued = False
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState")
            requeued = requeued or (state == "PENDING" and int(info.get("Restarts") or 0) >= 1)
            if requeued and state != "PENDING":
                return info
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} did not run again in {timeout}s: {self.job(job_id)}\n"
                           f"{self.log('slurmctld')}")

    def restart_node(self, node, timeout=60):
        """The node boots again (its scratch empty): a new slurmd on the same address; returns
        when SLURM has it back in service (ReturnToService=2)."""
        if self.slurmd[node].poll() is None:
            return
        self._start_slurmd(node)
        deadline = time.monotonic() + timeout
        while self.node_states().get(node) != "idle":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node} did not return: {self.node_states()}\n"
                                   f"{self.log('slurmd.' + node)}")
            time.sleep(0.2)

    def _remove_network(self):
        for node, ns in self.netns.items():
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                _kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
        for link in [*self.veth.values(), self.bridge]:   # (a namespace goes asynchronously)
            _ip("link", "del", link, check=False)

    def leftovers(self):
        found = super().leftovers()
        found += [ns for ns in self.netns.values()
                 if ns in _ip("netns", "list").stdout.split()]
        found += [link for link in [self.bridge, *self.veth.values()]
                  if Path(f"/sys/class/net/{link}").exists()]
        found += [line for line in Path("/proc/mounts").read_text().splitlines()
                  if str(self.dir) in line]
        return found
