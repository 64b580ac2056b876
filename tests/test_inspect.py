"""pnode-inspect: what it lists for checkpoint files and other pnode_dist files, --json, and
the errors for missing, truncated and foreign files."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, TimeMLP
from pnode_dist import Checkpointing, odeint


def _inspect(*args):
    return subprocess.run([sys.executable, "-m", "pnode_dist.inspect", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture
def checkpoint_file(tmp_path, y0):
    y = y0.clone().requires_grad_(True)
    policy = Checkpointing(schedule="uniform", slots=3, host_bytes=0, disk_dir=str(tmp_path),
                           keep_files=True)
    ys = odeint(TimeMLP(), y, torch.tensor([0.0, 1.0]), method="rk4",
                options={"step_size": 0.1}, checkpointing=policy)
    ys.sum().backward()
    (path,) = tmp_path.iterdir()
    return path


def test_lists_checkpoints_as_text_and_json(checkpoint_file):
    text = _inspect(checkpoint_file)
    assert text.returncode == 0, text.stderr
    assert "pnode_dist.checkpoints" in text.stdout and "rank 0 of 1, method rk4" in text.stdout
    assert "forward solve: 10 steps from t=0 to t=1" in text.stdout
    out = _inspect("--json", checkpoint_file)
    (info,) = json.loads(out.stdout)
    # uniform, 3 slots over 10 steps: y_0, y_4, y_8 (every ceil(10/3) = 4 steps)
    assert [c["step"] for c in info["checkpoints"]] == [0, 4, 8]
    with h5py.File(checkpoint_file) as f:
        for c in info["checkpoints"]:
            data = f["checkpoints"][c["name"]][()]
            assert c["norm"] == pytest.approx(float(np.linalg.norm(data)), rel=1e-15)
            assert c["time"] == pytest.approx(0.1 * c["step"], abs=1e-14)
            assert c["bytes"] == data.nbytes and c["shape"] == [4, 3]
    for line in text.stdout.splitlines()[5:]:
        assert line.split()[0] in {"0", "4", "8"}


def test_other_pnode_files_are_listed_generically(tmp_path):
    path = tmp_path / "state.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "pnode_dist.training_state"
        f.attrs["iteration"] = 7
        f["model/weight"] = np.ones((2, 3))
    out = _inspect("--json", path)
    assert out.returncode == 0, out.stderr
    (info,) = json.loads(out.stdout)
    assert info["attributes"]["iteration"] == 7
    assert info["datasets"][0]["name"] == "model/weight"
    assert info["datasets"][0]["norm"] == pytest.approx(6 ** 0.5)


def test_missing_truncated_and_foreign_files_fail_clearly(tmp_path, checkpoint_file):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(checkpoint_file.read_bytes()[:3000])
    cases = {tmp_path / "missing.h5": "no such file", foreign: "not written by pnode_dist",
             text: "not an HDF5 file", truncated: "truncated"}
    for path, words in cases.items():
        out = _inspect(path)
        assert out.returncode == 1 and words in out.stderr, (path, out.stderr)
    both = _inspect(checkpoint_file, tmp_path / "missing.h5")
    assert both.returncode == 1 and "pnode_dist.checkpoints" in both.stdout


def test_console_script_is_installed():
    script = ROOT / ".venv" / "bin" / "pnode-inspect"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "pnode_dist HDF5 files" in out.stdout
