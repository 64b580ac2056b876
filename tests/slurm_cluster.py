"""A real single-node SLURM on localhost for the job-script tests, started from Debian's
slurmctld, slurmd and munge in a temporary directory and torn down by PID.

Facts this relies on (measured on the project's machines): munged needs its socket in a
directory whose parents are all world-searchable (a short /tmp dir of mode 755; the key's dir
0700); RealMemory must not exceed what `slurmd -C` reports; slurmd starts with `-N localhost`;
MpiDefault=pmi2 for srun MPI launches; batch_sched_delay=0 starts jobs within about a second;
a requeued job may start again after cred_expire seconds, but only at the next pass of the main
scheduler (sched_interval, 60 s by default: 1 s here).
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
        self.dir = Path(tempfile.mkdtemp(prefix="pslurm", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.procs = []
        self.env = dict(os.environ, SLURM_CONF=str(self.dir / "slurm.conf"))

    def log(self, name):
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout=60):
        try:
            self._start_munge()
            self._write_config()
            for cmd in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", "localhost"]):
                self._spawn(cmd + ["-f", str(self.dir / "slurm.conf")], cmd[0])
            self._wait_for_idle_node(timeout)
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
        cpus, memory = _node_hardware()
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        (d / "plugstack.conf").write_text("")
        (d / "slurm.conf").write_text(f"""\
ClusterName=pnodetest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
CredType=cred/munge
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
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
KillWait=10
MinJobAge=300
NodeName=localhost CPUs={cpus} RealMemory={max(1, memory - 512)} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_for_idle_node(self, timeout):
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{proc.args[0]} exited:\n{self.log('slurmctld')}\n"
                                           f"{self.log('slurmd')}")
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                 env=self.env)
            state = out.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"the node did not become idle ({state!r}) in {timeout}s:\n"
                               f"{self.log('slurmctld')}\n{self.log('slurmd')}")

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
        shutil.rmtree(self.dir, ignore_errors=True)

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
