"""Precision and device of the solver state (pnode_dist/device.py, parallel.py's selection):
the single-precision build end to end, zero-copy callbacks, device errors, and on a GPU (tests
marked gpu, skipped without one) reverse accuracy, no host<->device copies and the device
checkpoint tier spilling to pinned host memory and disk."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TimeMLP, recorded_steps, run_mpi
from pnode_dist import Checkpointing, InputError, odeint, rank_device
from pnode_dist.testing import SOLVER_DTYPE, petsc_has_cuda
from pnode_dist.parallel import PETSc
from pnode_dist.testing import rk_record_replay, theta_replay
from precision.single_checks import check_callbacks_use_the_vec_memory

SINGLE_CHECKS = ROOT / "tests" / "precision" / "single_checks.py"
T_OUT = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
HAVE_GPU = torch.cuda.is_available() and petsc_has_cuda()


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize("nranks", [1, 2])
def test_single_precision_build(nranks):
    """PNODE_PRECISION=single: float32 state, gradients equal the float32 replay, implicit
    methods converge, float32 checkpoint files, n ranks == 1 rank."""
    res = run_mpi(nranks, SINGLE_CHECKS, env={"PNODE_PRECISION": "single"}, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("single-precision checks passed") == nranks


def test_default_precision_is_double():
    assert SOLVER_DTYPE == torch.float64 and PETSc.ScalarType().itemsize == 8


def test_callbacks_use_the_vec_memory():
    check_callbacks_use_the_vec_memory(torch.float64)


def test_precision_choice_errors():
    start = "from pnode_dist import odeint"          # PETSc starts at a solver name's first use
    res = _python(start, PNODE_PRECISION="half")
    assert res.returncode != 0 and "choose 'double' or 'single'" in res.stderr
    res = _python("import petsc4py; " + start, PNODE_PRECISION="single")
    assert res.returncode != 0 and "import pnode_dist first" in res.stderr
    res = _python(start, PNODE_PRECISION="single", PNODE_PETSC_SINGLE="/nowhere")
    assert res.returncode != 0 and "is double-precision" in res.stderr
    assert "make setup-single" in res.stderr


def test_float32_func_on_double_state_is_cast(mlp, y0):
    """A float32 func on the float64 state: float32 outputs and gradients, close to float64."""
    f32 = copy.deepcopy(mlp).float()
    y = y0.float().requires_grad_(True)
    ys = odeint(f32, y, T_OUT, method="rk4", options={"step_size": 0.1})
    (g,) = torch.autograd.grad(ys.sum(), [y])
    assert ys.dtype == g.dtype == torch.float32
    y64 = y0.clone().requires_grad_(True)
    ys64 = odeint(mlp, y64, T_OUT, method="rk4", options={"step_size": 0.1})
    assert (ys.double() - ys64).abs().max() < 1e-5


# ------------------------------------------------------------------ devices
@pytest.mark.skipif(HAVE_GPU, reason="a GPU is available")
def test_rank_device_without_gpu():
    assert rank_device() == torch.device("cpu")


def test_unsupported_device_errors(mlp, y0):
    with pytest.raises(InputError, match="CPU or on CUDA GPUs"):
        odeint(mlp.to("meta"), y0.to("meta"), T_OUT, method="rk4")
    with pytest.raises(InputError, match="parameters on meta"):
        odeint(TimeMLP().to("meta"), y0, T_OUT, method="rk4")


# ------------------------------------------------------------------ on a GPU
def _loss(ys):
    w = torch.arange(1, ys.shape[0] + 1, dtype=ys.dtype, device=ys.device)
    return (w.view(-1, 1, 1) * ys.sin()).sum() + (ys[-1] ** 2).sum()


def _grads(func, y0, **kwargs):
    y = y0.clone().requires_grad_(True)
    ys = odeint(func, y, T_OUT, **kwargs)
    return ys, torch.autograd.grad(_loss(ys), [y] + list(func.parameters()))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.05}), ("dopri5", None),
                                            ("cn", {"step_size": 0.1})])
def test_gpu_reverse_accuracy(method, options, y0):
    dev = rank_device()
    mlp, y0 = TimeMLP().to(dev), y0.to(dev)
    ys, grads = _grads(mlp, y0, method=method, options=options)
    assert ys.device == dev and all(g.device == dev for g in grads)
    record, _ = recorded_steps(mlp, y0, T_OUT, method, options)
    y = y0.clone().requires_grad_(True)
    if method == "cn":
        ref = theta_replay(mlp, y, record.times, record.output_steps, 0.5, True)
    else:
        ref = rk_record_replay(mlp, y, record, method)
    grads_ref = torch.autograd.grad(_loss(ref), [y] + list(mlp.parameters()))
    tol = 1e-9 if method == "cn" else 1e-12
    assert _rel(ys.detach(), ref.detach()) < tol
    for k, (g, gr) in enumerate(zip(grads, grads_ref)):
        assert _rel(g, gr) < tol, f"gradient {k}: {_rel(g, gr):.2e}"


@pytest.mark.gpu
def test_gpu_solve_copies_nothing_between_host_and_device(y0):
    dev = rank_device()
    mlp, y0 = TimeMLP().to(dev), y0.to(dev)
    _grads(mlp, y0, method="rk4", options={"step_size": 0.05})      # set-up copies happen here
    PETSc.Log.begin()
    names = ("VecCUDACopyTo", "VecCUDACopyFrom", "TSStep")
    events = [PETSc.Log.Event(name) for name in names]
    before = [e.getPerfInfo()["count"] for e in events]
    _grads(mlp, y0, method="rk4", options={"step_size": 0.05})
    after = [e.getPerfInfo()["count"] for e in events]
    assert after[2] >= before[2] + 20, "PETSc's log did not count the solve's steps"
    assert after[:2] == before[:2], f"host<->device copies during a solve: {before} -> {after}"


@pytest.mark.gpu
def test_gpu_device_tier_spills_to_pinned_host_and_disk(y0, tmp_path):
    dev = rank_device()
    mlp, y0 = TimeMLP().to(dev), y0.to(dev)
    options = {"step_size": 0.02}
    _, grads_all = _grads(mlp, y0, method="rk4", options=options)
    state = y0.numel() * y0.element_size()
    policy = Checkpointing(schedule="binomial", slots=6, device_bytes=2 * state,
                           host_bytes=2 * state, disk_dir=str(tmp_path), disk_bytes=2 * state)
    stats = {}
    y = y0.clone().requires_grad_(True)
    ys = odeint(mlp, y, T_OUT, method="rk4", options=options, checkpointing=policy,
                stats=stats)
    grads = torch.autograd.grad(_loss(ys), [y] + list(mlp.parameters()))
    for tier in ("device", "host", "disk"):
        assert stats[f"{tier}_checkpoints"] > 0, stats
    assert stats["device_bytes_peak"] <= 2 * state and stats["host_bytes_peak"] <= 2 * state
    for g, ga in zip(grads, grads_all):
        assert _rel(g, ga) < 1e-12


def test_gpu_benchmark_runs_small_on_any_device():
    """benchmarks/gpu_odenet.py --quick: every contender runs, pnode_dist's gradient equals the
    replay of the same scheme (the script exits non-zero otherwise), ratios are printed."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_odenet.py"), "--quick"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("time pnode_dist / replay limit") == 4      # euler, rk4 x 2 steps
