"""Run under mpiexec with FILE...: each rank runs pnode-inspect on the files as a child process,
as a training script that logs its checkpoints does (rank 0 python -m pnode_dist.inspect, rank
1 the console script). The children inherit the rank's MPI launch variables (PMI_*): they must
not start MPI. Prints 'rank <r>: ok' or what failed, per rank (rank 0); exits 1 on a failure."""
import json
import os
import subprocess
import sys

from pnode_dist.parallel import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
files = sys.argv[1:]
script = os.path.join(os.path.dirname(sys.executable), "pnode-inspect")
command = [sys.executable, "-m", "pnode_dist.inspect"]
if rank % 2 and os.path.exists(script):     # the console script of the editable install
    command = [script]
problem = None
try:
    proc = subprocess.run(command + ["--json"] + files, capture_output=True, text=True,
                          timeout=120)
except subprocess.TimeoutExpired:
    problem = "hung"
else:
    if proc.returncode != 0:
        problem = f"exit status {proc.returncode}: {proc.stderr[-400:]}"
    elif [info["file"] for info in json.loads(proc.stdout)] != files:
        problem = f"printed {proc.stdout[:400]}"
launch = sorted(k for k in os.environ if k.startswith(("PMI_", "PMIX_", "OMPI_")))
everyone = comm.gather((problem, command[-1], launch), root=0)
if rank == 0:
    for r, (bad, ran, names) in enumerate(everyone):
        print(f"rank {r}: {bad or 'ok'} ({ran}; launch variables {' '.join(names[:3])}...)",
              flush=True)
sys.exit(1 if problem else 0)
