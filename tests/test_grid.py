"""DMDA grid layout: n ranks equal one rank (outputs, field and parameter gradients) and the
halo exchange passes the dot-product test (tests/mpi/grid_equivalence.py on 1-4 ranks);
reverse accuracy against backprop through a pure-torch replay; clear errors."""
import pytest
import torch

from conftest import ROOT, ConvField, Extended, run_mpi
from pnode_dist import METHODS, Grid, InputError, odeint
from pnode_dist.testing import rk_replay


@pytest.mark.parametrize("nranks", [1, 2, *(pytest.param(n, marks=pytest.mark.long)
                                            for n in (3, 4))])
def test_n_ranks_equal_one_rank(nranks):
    proc = run_mpi(nranks, ROOT / "tests" / "mpi" / "grid_equivalence.py", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"on {nranks} ranks" in proc.stdout and "leaked" not in proc.stderr


@pytest.mark.parametrize("periodic", [False, True])
def test_gradients_equal_backprop_of_a_torch_replay(periodic):
    grid = Grid((9, 8), channels=2, periodic=periodic, halo=2, comm="self")
    f = ConvField(2, 2, periodic, seed=4)
    field = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([0.0, 0.6], dtype=torch.float64)
    params = list(f.parameters())
    y0 = field.clone().requires_grad_(True)
    ys = odeint(f, y0, t, method="rk4", options={"step_size": 0.2}, grid=grid)
    ours = torch.autograd.grad((ys[-1] ** 2).sum(), [y0] + params)
    y0_ref = field.clone().requires_grad_(True)
    times = [0.0, 0.2, 0.4, 0.6]
    ys_ref = rk_replay(Extended(f, 2, 2, periodic), y0_ref, times, [3], METHODS["rk4"].tableau)
    ref = torch.autograd.grad((ys_ref[-1] ** 2).sum(), [y0_ref] + params)
    assert torch.allclose(ys[-1], ys_ref[-1], rtol=1e-13, atol=1e-14)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (a - b).abs().max()
    grid.destroy()


def test_field_conversion_round_trip():
    grid = Grid((5, 4, 3), channels=2, batch=3, halo=1, comm="self")
    field = torch.randn(3, 2, 5, 4, 3, dtype=torch.float64)
    v = grid.to_vec_order(field)
    assert v.shape == (5, 4, 3, 6) and torch.equal(v[1, 2, 0], field[:, :, 1, 2, 0].reshape(-1))
    assert torch.equal(grid.from_vec_order(v), field)
    assert torch.equal(grid.gather(grid.scatter(field)), field)
    grid.destroy()


def test_clear_errors():
    f = ConvField(2, 2, False, seed=0)                     # receptive-field radius 2
    narrow = Grid((8, 8), channels=2, halo=1, comm="self")
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y0 = torch.zeros(2, 8, 8, dtype=torch.float64)
    with pytest.raises(InputError, match="reads cells 2 cells away.*halo=2"):
        odeint(f, y0, t, method="rk4", grid=narrow)
    with pytest.raises(InputError, match="grid.scatter"):
        odeint(f, y0[:, :4], t, method="rk4", grid=Grid((8, 8), channels=2, halo=2, comm="self"))
    with pytest.raises(InputError, match="matrix-free GMRES"):
        odeint(f, y0, t, method="cn", options={"linear_solver": "exact"},
               grid=Grid((8, 8), channels=2, halo=2, comm="self"))
    with pytest.raises(InputError, match="either comm or grid"):
        odeint(f, y0, t, comm="self", grid=narrow)
    with pytest.raises(InputError, match="multiply to"):
        Grid((8, 8), channels=1, comm="self", proc_sizes=(2, 1))



def test_odeblock_takes_a_grid():
    from pnode_dist import ODEBlock
    grid = Grid((8, 6), channels=2, batch=3, periodic=True, halo=2, comm="self")
    f = ConvField(2, 2, True, seed=1)
    block = ODEBlock(f, method="rk4", options={"step_size": 0.5}, grid=grid)
    field = torch.randn(3, 2, 8, 6, dtype=torch.float64)
    out = block(grid.scatter(field))
    ref = odeint(Extended(f, 2, 2, True), field, torch.tensor([0.0, 1.0], dtype=torch.float64),
                 method="rk4", options={"step_size": 0.5}, comm="self")[-1]
    assert out.shape == field.shape and torch.allclose(out, ref, rtol=1e-13, atol=1e-14)
    assert block.stats["steps"] == 2 and grid.stats["exchanges"] > 0
    grid.destroy()
