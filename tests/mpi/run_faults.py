"""Run under mpiexec: a TrainingSession whose second state save fills the state directory's disk.
Every rank must get the same RunError (printed as 'rank <r>: <message>'); the app-style
decorator then prints one 'error:' line on rank 0 and exits with the error's status.
argv: OUT STATE_DIR [FREE]: with FREE (a fraction), rank 0 first fills the disk until only that
fraction of the first state's size is free (a save that runs out of space part-way)."""
import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "apps"))
import workflow  # noqa: E402

from pnode_dist.parallel import MPI  # noqa: E402


@workflow.reports_run_errors
def main(argv=None):
    comm = MPI.COMM_WORLD
    out, state_dir = sys.argv[1:3]
    args = argparse.Namespace(out=out, state_dir=state_dir, resume=None, save_every=0,
                              no_progress=True, quick=False, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256, dtype=torch.float64)       # a 1.6 MB state with Adam
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 256, dtype=torch.float64)).sum().backward()
    opt.step()
    run = workflow.TrainingSession(args, comm, model, opt)
    run.resume()
    first = run.save(1, 1, {})
    print(f"rank {comm.Get_rank()}: saved {first}", flush=True)
    if len(sys.argv) > 3 and comm.Get_rank() == 0:
        st = os.statvfs(state_dir)
        fill = st.f_bavail * st.f_frsize - int(float(sys.argv[3]) * os.path.getsize(first))
        with open(Path(state_dir) / "filler", "wb") as f:
            f.write(b"\1" * max(fill, 0))
    comm.Barrier()
    try:
        run.save(2, 1, {})
    except workflow.RunError as exc:
        print(f"rank {comm.Get_rank()}: {exc}", flush=True)
        raise
    print(f"rank {comm.Get_rank()}: the second save did not fail", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
