"""Training-state files: exact round trip, checksum, newest-valid selection, pruning."""
import random

import h5py
import numpy as np
import pytest
import torch

from conftest import TimeMLP
from pnode_dist import training_state
from pnode_dist.h5format import FileFormatError, describe
from pnode_dist.parallel import MPI

COMM = MPI.COMM_SELF


def _trained(seed):
    torch.manual_seed(seed)
    model = TimeMLP(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.tensor(0.3), torch.randn(4, 3, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_is_exact(tmp_path):
    model, opt, sched = _trained(0)
    np.random.seed(5)
    np.random.randn()                                      # a cached Gaussian in numpy's state
    random.gauss(0, 1)
    state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    path = training_state.save(tmp_path, model=model, optimizer=opt, scheduler=sched,
                               iteration=3, epoch=1, comm=COMM, args={"lr": 1e-2},
                               progress={"batch": 7})
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])
    expected = (torch.rand(3), np.random.rand(3), random.random())   # the next draws
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    other, other_opt, other_sched = _trained(1)
    info = training_state.load(path, model=other, optimizer=other_opt, scheduler=other_sched,
                               comm=COMM)
    assert info == {"iteration": 3, "epoch": 1, "args": {"lr": 1e-2},
                    "progress": {"batch": 7}}
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    for k, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(value, other_opt.state_dict()["state"][k][key]), key
    assert opt.state_dict()["param_groups"][0]["lr"] == other_opt.param_groups[0]["lr"]
    assert sched.state_dict() == other_sched.state_dict()
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    assert describe(path)["checksum_status"] == "ok"


def test_damaged_files_are_detected_and_skipped(tmp_path):
    model, opt, _ = _trained(0)
    paths = [training_state.save(tmp_path, model=model, optimizer=opt, iteration=i, epoch=1,
                                 comm=COMM, keep=3) for i in range(1, 6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state-0000000003.h5", "state-0000000004.h5", "state-0000000005.h5"]
    with h5py.File(paths[-1], "r+") as f:                 # a changed weight
        f["model/l1.weight"][0, 0] += 1.0
    assert "checksum mismatch" in training_state.verify(paths[-1])
    with open(paths[-2], "r+b") as f:                      # a truncated file
        f.truncate(1500)
    assert "truncated" in training_state.verify(paths[-2])
    best, skipped = training_state.latest_valid(tmp_path)
    assert best == paths[-3] and [s for s, _ in skipped] == [paths[-1], paths[-2]]
    with pytest.raises(FileFormatError, match="checksum mismatch"):
        training_state.load(paths[-1], model=model, optimizer=opt, comm=COMM)
