"""torchdiffeq's calls, unchanged, through pnode_dist: the same outputs and gradients as
torchdiffeq's backprop through the same fixed-step scheme (euler, midpoint), for tuple states,
decreasing times, 0-d states, a single time, tensors captured by closures, adjoint_params and
odeint_adjoint; and the user's own exception behind every SolverError."""
import os
import subprocess
import sys

import pytest
import torch
import torchdiffeq
from torch import nn

import pnode_dist
from conftest import TimeMLP
from pnode_dist import InputError, SolverError

F64 = torch.float64
OPTS = {"step_size": 0.05}


def _same(a, b, tol=1e-12):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


class CNFLike(nn.Module):
    """FFJORD's shape of dynamics: state (z, logp), returns (dz, dlogp)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=F64)

    def forward(self, t, state):
        z, logp = state
        dz = torch.tanh(self.lin(z)) * (1 + t)
        return dz, -(dz * z).sum(1, keepdim=True)


def _both(call, leaves):
    """call(lib) -> loss for torchdiffeq and pnode_dist; the leaves' gradients of each."""
    out = {}
    for lib in (torchdiffeq, pnode_dist):
        for x in leaves:
            x.grad = None
        value = call(lib)
        value.backward()
        out[lib] = (value.detach(), [x.grad.clone() for x in leaves])
    return out[torchdiffeq], out[pnode_dist]


@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("times", [(0.0, 0.5, 1.0), (1.0, 0.5, 0.0)])
def test_tuple_state_and_either_direction_of_time(method, times):
    f = CNFLike()
    z0 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0),
                     requires_grad=True)
    lp0 = torch.zeros(5, 1, dtype=F64, requires_grad=True)
    t = torch.tensor(times, dtype=F64)

    def loss(lib):
        zs, lps = lib.odeint(f, (z0, lp0), t, method=method, options=OPTS)
        assert zs.shape == (3, 5, 3) and lps.shape == (3, 5, 1)
        return zs.pow(2).sum() + (lps * torch.arange(3, dtype=F64).view(3, 1, 1)).sum()
    (ref, gref), (got, g) = _both(loss, [z0, lp0] + list(f.parameters()))
    _same(got, ref)
    for a, b in zip(g, gref):
        _same(a, b)


def test_nested_tuple_state():
    a0 = torch.randn(4, 2, dtype=F64, requires_grad=True)
    b0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    c0 = torch.randn(4, dtype=F64, requires_grad=True)

    def f(t, y):
        a, (b, c) = y
        return -b[:, :2] * t, (a.sum(1, keepdim=True) * b, torch.cos(c))

    def loss(lib):
        t = torch.tensor([0.0, 1.0], dtype=F64)
        if lib is torchdiffeq:                # which takes flat tuples only
            a, b, c = lib.odeint(lambda t, y: (lambda a, bc: (a,) + bc)(*f(t, (y[0], y[1:]))),
                                 (a0, b0, c0), t, method="midpoint", options=OPTS)
        else:
            a, (b, c) = lib.odeint(f, (a0, (b0, c0)), t, method="midpoint", options=OPTS)
        return a.sum() + b.pow(2).sum() + c.sin().sum()
    (ref, gref), (got, g) = _both(loss, [a0, b0, c0])
    _same(got, ref)
    for x, y in zip(g, gref):
        _same(x, y)


def test_zero_dimensional_state():
    y0 = torch.tensor(2.0, dtype=F64, requires_grad=True)
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)

    def loss(lib):
        ys = lib.odeint(lambda t, y: -k * y, y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64),
                        method="euler", options=OPTS)
        assert ys.shape == (3,)
        return ys.pow(2).sum()
    (ref, gref), (got, g) = _both(loss, [y0, k])
    _same(got, ref)
    for x, y in zip(g, gref):
        _same(x, y)


def test_single_time_returns_y0():
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    ys = pnode_dist.odeint(TimeMLP(), y0, torch.tensor([0.3], dtype=F64))
    assert ys.shape == (1, 4, 3) and torch.equal(ys[0], y0)
    ys.sum().backward()
    assert torch.equal(y0.grad, torch.ones_like(y0))
    z, lp = pnode_dist.odeint(CNFLike(), (y0.detach(), y0[:, :1].detach()), [0.3])
    assert z.shape == (1, 4, 3) and lp.shape == (1, 4, 1)


def test_tensors_captured_by_a_closure_get_their_gradients():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 3, dtype=F64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=F64, generator=g, requires_grad=True)
    module = nn.Linear(3, 3, dtype=F64)
    y0 = torch.randn(4, 3, dtype=F64, generator=g)           # y0 does not require grad

    def loss(lib):
        shift = 2 * b                                        # a non-leaf captured tensor
        ys = lib.odeint(lambda t, y: torch.tanh(y @ w + module(y)) + shift * t, y0,
                        torch.tensor([0.0, 0.5, 1.0], dtype=F64), method="midpoint",
                        options=OPTS)
        return ys.pow(2).sum()
    leaves = [w, b] + list(module.parameters())
    (ref, gref), (got, grads) = _both(loss, leaves)
    _same(got, ref)
    for x, y in zip(grads, gref):
        _same(x, y)


def test_adjoint_params_and_odeint_adjoint():
    """torchdiffeq's odeint_adjoint call, unchanged; the gradient is torchdiffeq's backprop's
    (the discrete adjoint is exact), for the adjoint_params only."""
    from pnode_dist import odeint_adjoint as odeint
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)
    other = torch.randn(3, dtype=F64, requires_grad=True)
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)

    def f(t, y):
        return torch.tanh(y @ w) + other
    torchdiffeq.odeint(f, y0, t, method="euler", options=OPTS).pow(2).sum().backward()
    ref = w.grad.clone()
    w.grad = other.grad = None
    odeint(f, y0, t, method="euler", options=OPTS, adjoint_params=(w,), adjoint_rtol=1e-3,
           adjoint_method="dopri5", adjoint_options={}).pow(2).sum().backward()
    _same(w.grad, ref)
    assert other.grad is None                 # only adjoint_params are differentiated


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.1}), ("dopri5", None),
                                            ("bosh3", None), ("cn", {"step_size": 0.1})])
@pytest.mark.parametrize("phase", ["forward", "adjoint"])
def test_user_exception_is_the_cause(method, options, phase):
    class Oops(Exception):
        pass

    class F(TimeMLP):
        armed = False

        def forward(self, t, y):
            if self.armed:
                raise Oops("the user's own message")
            return super().forward(t, y)
    f = F()
    f.armed = phase == "forward"
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    with pytest.raises(SolverError, match="the user's own message") as info:
        # Without stored graphs, so that the adjoint evaluates f.
        ys = pnode_dist.odeint(f, y0, torch.tensor([0.0, 1.0], dtype=F64), method=method,
                               options=options, store_graphs=False)
        f.armed = True
        ys.sum().backward()
    assert isinstance(info.value.__cause__, Oops)


def test_bad_structures_are_input_errors():
    with pytest.raises(InputError, match="tensor or a \\(nested\\) tuple"):
        pnode_dist.odeint(lambda t, y: y, (torch.zeros(2, dtype=F64), 3.0), [0.0, 1.0])
    with pytest.raises(InputError, match="differ from y0's"):
        pnode_dist.odeint(lambda t, y: y[0], (torch.zeros(2, 1, dtype=F64),) * 2, [0.0, 1.0],
                          method="euler", options=OPTS)


class Recorded(CNFLike):
    """CNFLike recording torchdiffeq's step callbacks (t0, y0, dt), copies."""

    def __init__(self):
        super().__init__()
        self.calls = {"step": [], "accept": []}

    def _record(self, kind, t0, y0, dt):
        self.calls[kind].append((float(t0), tuple(y.detach().clone() for y in y0), float(dt)))

    def callback_step(self, t0, y0, dt):
        self._record("step", t0, y0, dt)

    def callback_accept_step(self, t0, y0, dt):
        self._record("accept", t0, y0, dt)


@pytest.mark.filterwarnings("ignore:Solver 'euler' does not support callbacks")
@pytest.mark.parametrize("times", [(0.0, 0.5, 1.0), (1.0, 0.5, 0.0)])
def test_step_callbacks_are_called_as_torchdiffeq_calls_them(times):
    f = Recorded()
    state = (torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1)),
             torch.zeros(4, 1, dtype=F64))
    t = torch.tensor(times, dtype=F64)
    calls = {}
    for lib in (torchdiffeq, pnode_dist):
        f.calls = {"step": [], "accept": []}
        lib.odeint(f, state, t, method="euler", options=OPTS)
        calls[lib] = f.calls["step"]
    theirs, ours = calls[torchdiffeq], calls[pnode_dist]
    assert len(ours) == len(theirs) == 20
    for (t_a, y_a, dt_a), (t_b, y_b, dt_b) in zip(theirs, ours):
        assert abs(t_a - t_b) < 1e-12 and abs(dt_a - dt_b) < 1e-12
        for a, b in zip(y_a, y_b):
            _same(a, b)


def test_accept_callbacks_of_an_adaptive_solve():
    f = Recorded()
    state = (torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2),
                         requires_grad=True), torch.zeros(4, 1, dtype=F64))
    stats = {}
    zs, lps = pnode_dist.odeint(f, state, torch.tensor([0.0, 2.0], dtype=F64), stats=stats,
                                rtol=1e-8, atol=1e-10, checkpointing=pnode_dist.Checkpointing(
                                    schedule="binomial", slots=2))
    lps[-1].sum().backward()            # re-runs steps: no further callbacks
    steps, accepts = f.calls["step"], f.calls["accept"]
    assert len(steps) == len(accepts) == stats["steps"] > 3
    starts = [c[0] for c in accepts]
    assert starts == sorted(starts) and starts[0] == 0.0
    assert abs(starts[-1] + accepts[-1][2] - 2.0) < 1e-12          # the last step ends at t1
    for (t0, y0, _), (t1, y1, dt) in zip(accepts, accepts[1:]):
        assert abs(t0 + _ - t1) < 1e-12                             # steps follow each other
    _same(accepts[0][1][0], state[0].detach(), 0)                            # y0 of the first step


def test_an_exception_in_a_step_callback_is_the_cause():
    class Failing(CNFLike):
        def callback_accept_step(self, t0, y0, dt):
            if t0 > 0.3:
                raise ValueError("callback refuses t0")
    with pytest.raises(SolverError, match="ValueError in a step callback of func.*refuses") as e:
        pnode_dist.odeint(Failing(), (torch.ones(2, 3, dtype=F64), torch.zeros(2, 1, dtype=F64)),
                          [0.0, 1.0], method="rk4", options=OPTS)
    assert isinstance(e.value.__cause__, ValueError)


def test_callbacks_that_are_not_called_are_named():
    class WithReject(TimeMLP):
        def callback_reject_step(self, t0, y0, dt):
            pass
    with pytest.warns(UserWarning, match="callback_reject_step.*not called"):
        pnode_dist.odeint(WithReject(), torch.zeros(2, 3, dtype=F64), [0.0, 1.0],
                          method="euler", options=OPTS)


def test_torchdiffeq_method_names():
    y0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.warns(UserWarning, match="dopri8.*verner8"):
        ours = pnode_dist.odeint(lambda t, y: -y * (1 + t), y0, t, method="dopri8", rtol=1e-10,
                                 atol=1e-12)
    _same(ours[-1], y0 * torch.exp(torch.tensor(-1.5, dtype=F64)), 1e-9)
    for name in ("explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver",
                 "gl4", "radauIIA5"):
        with pytest.raises(InputError, match=f"unknown method '{name}' \\(.*: valid methods"):
            pnode_dist.odeint(lambda t, y: -y, y0, t, method=name)


@pytest.mark.parametrize("name,step", [
    ("implicit_euler", lambda t, h: 1 / (1 + h * (t + h))),
    ("trapezoid", lambda t, h: (1 - h * t / 2) / (1 + h * (t + h) / 2)),
    ("implicit_midpoint", lambda t, h: (1 - h * (t + h / 2) / 2) / (1 + h * (t + h / 2) / 2))])
def test_torchdiffeq_implicit_method_names(name, step):
    """torchdiffeq's names of one-stage implicit schemes run those very schemes: y' = -t y,
    whose one-step factors differ between them, to Newton's tolerance."""
    y0 = torch.ones(2, 1, dtype=F64)
    ys = pnode_dist.odeint(lambda t, y: -t * y, y0, [0.0, 1.0], method=name,
                           options={"step_size": 0.1})
    expected = 1.0
    for k in range(10):
        expected *= step(0.1 * k, 0.1)
    _same(ys[-1], torch.full((2, 1), expected, dtype=F64), 1e-9)


@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", OPTS),
                                            ("cn", OPTS), ("beuler", None)])
def test_func_that_ignores_the_state(method, options):
    """f(t, y) = g(t): dy(t)/dy0 = 1, as torchdiffeq gives (f's output has no graph)."""
    y0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    ys = pnode_dist.odeint(lambda t, y: torch.zeros_like(y) + torch.cos(t), y0, [0.0, 1.0],
                           method=method, options=options)
    ys[-1].sum().backward()
    _same(y0.grad, torch.ones_like(y0))


def test_step_limits_and_refused_torchdiffeq_options():
    f, y0 = (lambda t, y: -y), torch.ones(2, 1, dtype=F64)
    free, limited = {}, {}
    pnode_dist.odeint(f, y0, [0.0, 1.0], stats=free)
    pnode_dist.odeint(f, y0, [0.0, 1.0], stats=limited, options={"max_step": 0.02})
    assert free["steps"] < 50 <= limited["steps"]
    with pytest.raises(InputError, match="min_step.*exceeds"):
        pnode_dist.odeint(f, y0, [0.0, 1.0], options={"min_step": 0.5, "max_step": 0.1})
    for key, words in (("jump_t", "add the times"), ("norm", "weighted norm"),
                       ("perturb", "never called with perturb")):
        with pytest.raises(InputError, match=f"options\\['{key}'\\].*not supported: .*{words}"):
            pnode_dist.odeint(f, y0, [0.0, 1.0], options={key: None})
    # torchdiffeq's interp: accepted with a warning (fixed steps land on output times anyway)
    with pytest.warns(UserWarning, match="options\\['interp'\\].*has no effect"):
        landed = pnode_dist.odeint(f, y0, [0.0, 0.5, 1.0], method="rk4",
                                   options={"step_size": 0.3, "interp": "cubic"})
    _same(landed, pnode_dist.odeint(f, y0, [0.0, 0.5, 1.0], method="rk4",
                                    options={"step_size": 0.3}), 0.0)
    with pytest.raises(InputError, match="'linear' or 'cubic'"):
        pnode_dist.odeint(f, y0, [0.0, 1.0], options={"interp": "spline"})


def test_no_stray_warning_under_warnings_as_errors():
    """A fresh process with warnings as errors: the first solve (which shares read-only PETSc
    arrays with torch) neither warns nor fails. (A float32 state on the float64 build is
    warned about on purpose: test_memory.py.)"""
    code = ("import warnings, torch, pnode_dist\n"
            "warnings.simplefilter('error', UserWarning)\n"
            "ys = pnode_dist.odeint(lambda t, y: -y, torch.ones(2, 1, dtype=torch.float64),"
            " [0.0, 1.0], method='rk4',"
            " options={'step_size': 0.25})\n"
            "ys.sum()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("method,options,policy", [
    ("rk4", {"step_size": 0.1}, None), ("dopri5", None, None), ("cn", {"step_size": 0.1}, None),
    ("dopri5", None, pnode_dist.Checkpointing(schedule="binomial", slots=3))])
def test_a_second_backward_pass_gives_the_same_gradients(method, options, policy):
    f = TimeMLP()
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3),
                     requires_grad=True)
    ys = pnode_dist.odeint(f, y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), method=method,
                           options=options, checkpointing=policy)
    grads = []
    for loss in (ys.pow(2).sum(), ys.pow(2).sum()):   # retain_graph, then two losses
        for _ in range(2):
            y0.grad = None
            f.zero_grad()
            loss.backward(retain_graph=True)
            grads.append([y0.grad.clone()] + [p.grad.clone() for p in f.parameters()])
    for other in grads[1:]:
        for a, b in zip(other, grads[0]):
            _same(a, b, 1e-13)


def test_gradcheck_and_jacobian():
    f = TimeMLP(dim=2, hidden=3)
    y0 = torch.randn(2, 2, dtype=F64, requires_grad=True)

    def solve(y):
        return pnode_dist.odeint(f, y, torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
                                 options={"step_size": 0.25})[-1]
    assert torch.autograd.gradcheck(solve, (y0,))
    assert torch.autograd.functional.jacobian(solve, y0).shape == (2, 2, 2, 2)


def test_unsupported_backward_passes_are_errors():
    f = TimeMLP()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys = pnode_dist.odeint(f, y0, t, method="rk4", options=OPTS)
    with torch.no_grad():
        f.l1.weight.add_(0.1)                        # an optimizer step before backward
    with pytest.raises(InputError, match="modified in place"):
        ys.sum().backward()


def test_ode_block_with_a_tuple_state():
    f = CNFLike()
    z0 = torch.randn(5, 3, dtype=F64)
    block = pnode_dist.ODEBlock(f, t=(1.0, 0.0), method="euler", options=OPTS)
    z, lp = block((z0, torch.zeros(5, 1, dtype=F64)))
    zs, lps = torchdiffeq.odeint(f, (z0, torch.zeros(5, 1, dtype=F64)),
                                 torch.tensor([1.0, 0.0], dtype=F64), method="euler",
                                 options=OPTS)
    _same(z.detach(), zs[-1].detach())
    _same(lp.detach(), lps[-1].detach())


@pytest.mark.parametrize("times", [(0.0, 0.4, 1.0), (1.0, 0.4, 0.0)])
def test_gradient_with_respect_to_the_output_times(times):
    """dL/dt as torchdiffeq's odeint_adjoint defines it (the ODE's, not the steps'): equal to
    it and to central differences of tightly solved losses."""
    f = TimeMLP()
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(5),
                     requires_grad=True)
    weights = torch.arange(1, 4, dtype=F64).view(3, 1, 1)

    def loss(solve, t, tol):
        return (solve(f, y0, t, method="dopri5", rtol=tol, atol=tol * 1e-2).sin()
                * weights).sum()
    grads = []
    for solve in (pnode_dist.odeint, torchdiffeq.odeint_adjoint):
        t = torch.tensor(times, dtype=F64, requires_grad=True)
        loss(solve, t, 1e-10).backward()
        grads.append(t.grad)
    _same(grads[0], grads[1], 1e-9)
    for i in range(3):
        up, down = list(times), list(times)
        up[i] += 1e-5
        down[i] -= 1e-5
        with torch.no_grad():
            fd = (loss(pnode_dist.odeint, torch.tensor(up, dtype=F64), 1e-12)
                  - loss(pnode_dist.odeint, torch.tensor(down, dtype=F64), 1e-12)) / 2e-5
        assert abs(float(fd) - float(grads[0][i])) <= 1e-7 * max(1.0, abs(float(fd)))
