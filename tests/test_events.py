"""Terminal events (_solve/events.py, _events/): event times and their
gradients against closed forms (free fall, a bouncing-ball chain, exponential decay with a
learned threshold), against central differences of the same discrete steps, several event
functions, backward in time, torchdiffeq's odeint_event on top of ours, and the errors."""
import math

import pytest
import torch
import torchdiffeq

import pnode_dist
from conftest import TimeMLP
from pnode_dist import InputError, SolverError, odeint_event

# The checks read event times and states that carry their graphs as numbers.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
F64 = torch.float64
G = 9.81
T0 = torch.tensor(0.0, dtype=F64)


def _fall(t, y):
    """y = [height, velocity] under gravity."""
    return torch.stack([y[..., 1], torch.full_like(y[..., 0], -G)], -1)


def _height(t, y):
    return y[..., 0]


@pytest.mark.parametrize("method, options", [
    ("dopri5", {}), ("tsit5", {}), ("bosh3", {}),           # located on the dense output
    ("rk4", {"step_size": 0.1}), ("midpoint", {"step_size": 0.1}),   # the step retaken
    ("cn", {"step_size": 0.1}), ("sdirk2", {"step_size": 0.1}), ("trbdf2", {"step_size": 0.1}),
    ("verner8", {}), ("dopri5", {"outputs": "land"}), ("cn", {})])  # adaptive, step retaken
def test_free_fall_time_speed_and_gradients(method, options):
    """Free fall from 10: event at sqrt(2h/g), impact speed -sqrt(2gh), and their derivatives
    in h (every method here is exact for this quadratic motion; the implicit ones to
    Newton's tolerance, their slope by central differences)."""
    h = torch.tensor([10.0], dtype=F64, requires_grad=True)
    y0 = torch.cat([h, torch.zeros(1, dtype=F64)])[None]
    stats = {}
    event_t, sol = odeint_event(_fall, y0, torch.tensor(0.0, dtype=F64), event_fn=_height,
                                method=method, options=options, stats=stats)
    grad_tol = 1e-13 if method in ("dopri5", "tsit5", "bosh3", "rk4", "midpoint", "verner8") \
        else 1e-10 if options else 1e-7      # implicit: the slope by central differences
    assert sol.shape == (2, 1, 2)
    assert abs(float(event_t.detach()) - math.sqrt(2 * 10 / G)) <= 1e-13
    assert abs(float(sol.detach()[-1, 0, 1]) + math.sqrt(2 * G * 10)) <= 1e-12
    assert abs(float(sol.detach()[-1, 0, 0])) <= 1e-12
    assert torch.equal(sol[0].detach(), y0.detach())
    # one evaluation per step, and a few dozen at most to locate the crossing
    assert stats["event_evaluations"] <= stats["steps"] + 60
    dt_dh, = torch.autograd.grad(event_t, h, retain_graph=True)
    dv_dh, = torch.autograd.grad(sol[-1, 0, 1], h)
    assert abs(float(dt_dh) - 1 / math.sqrt(2 * G * 10)) <= grad_tol
    assert abs(float(dv_dh) + G / math.sqrt(2 * G * 10)) <= grad_tol


def test_decay_to_a_learned_threshold():
    """y' = -k y from y0 down to c: t = ln(y0 / c) / k, so dt/dy0 = 1/(k y0), dt/dc = -1/(k c),
    dt/dk = -t/k (through func's parameter and event_fn's captured tensor)."""
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    c = torch.tensor(0.3, dtype=F64, requires_grad=True)
    y0 = torch.tensor([[2.0]], dtype=F64, requires_grad=True)
    event_t, sol = odeint_event(lambda t, y: -k * y, y0, T0, event_fn=lambda t, y: y[0, 0] - c,
                                rtol=1e-10, atol=1e-12)
    t_exact = math.log(2.0 / 0.3) / 0.7
    assert abs(float(event_t.detach()) - t_exact) <= 1e-9
    assert abs(float(sol.detach()[-1, 0, 0]) - 0.3) <= 1e-12      # on the event, whatever the time error
    grads = torch.autograd.grad(event_t, [y0, c, k])
    exact = [1 / (0.7 * 2.0), -1 / (0.7 * 0.3), -t_exact / 0.7]
    for got, want in zip(grads, exact):
        assert abs(float(got) - want) <= 1e-7 * abs(want), (float(got), want)


def _frozen_event_time(func, y0, times, level):
    """The event time (y[0, 0] = level) of the discrete solve through the step times `times`
    (the event in the last step), in plain torch: the steps, then bisection on the last
    step's dense output (dopri5's)."""
    from pnode_dist._reversal.torch_replay import rk_step
    from pnode_dist._solve.dense import interpolate_step
    from pnode_dist._solve.rk_register import ensure_registered, petsc_tableau
    from pnode_dist.methods import METHODS
    ensure_registered(METHODS["dopri5"])
    tableau, dense = petsc_tableau("pnode_dopri5", dense=True)

    def f(t, y):
        return func(torch.tensor(t, dtype=F64), y)
    y = y0
    for n in range(1, len(times) - 1):
        y = rk_step(f, times[n - 1], y, times[n] - times[n - 1], tableau)
    a, b = times[-2], times[-1]
    for _ in range(200):
        m = 0.5 * (a + b)
        if m in (a, b):
            break
        value = interpolate_step(f, times[-2], times[-1], y, [m], tableau, dense)[0, 0, 0]
        if float(value.detach()) > level:
            a = m
        else:
            b = m
    return b


def _assert_central_differences(grad, weight, value, eps=1e-6):
    """grad (of a scalar w.r.t. the tensor `weight`) equals central differences of value()
    with each entry of weight moved by +-eps, to 1e-7 relative (their own error)."""
    fd = []
    for i in range(weight.numel()):
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                weight[i] += sign * eps
            values.append(value())
            with torch.no_grad():
                weight[i] -= sign * eps
        fd.append((values[0] - values[1]) / (2 * eps))
    fd = torch.tensor(fd, dtype=F64)
    assert float(fd.abs().max()) > 0
    assert float((grad - fd).abs().max()) <= 1e-7 * float(fd.abs().max()), (grad, fd)


class StepRecorder(TimeMLP):
    """TimeMLP that records the accepted steps (torchdiffeq's callback)."""

    def callback_accept_step(self, t, y, dt):
        self.times.append(float(t + dt))


def test_event_gradient_equals_central_differences_of_the_same_steps():
    """A nonlinear func: d(event time)/d(parameter) from odeint_event against central
    differences of the event time of the same steps (frozen, redone in torch)."""
    func = StepRecorder(dim=2, hidden=6)
    func.times = [0.0]
    y0 = torch.tensor([[1.0, 0.2]], dtype=F64)
    level = 0.2
    event_t, _ = odeint_event(func, y0, T0, event_fn=lambda t, y: y[0, 0] - level,
                              rtol=1e-8, atol=1e-10)
    times = func.times
    assert times[-2] < float(event_t.detach()) <= times[-1]
    assert abs(_frozen_event_time(func, y0, times, level) - float(event_t.detach())) <= 1e-12
    weight = func.l2.bias
    grad, = torch.autograd.grad(event_t, weight)
    _assert_central_differences(grad, weight, lambda: _frozen_event_time(func, y0, times, level))


def test_fixed_step_event_gradient_equals_central_differences_of_the_same_steps():
    """rk4 with fixed steps: the crossing step is retaken to end on the event. d(event
    time)/d(parameter) against central differences of the same steps (n steps of h, then the
    retaken one, its size found by bisection), in plain torch."""
    from pnode_dist._reversal.torch_replay import rk_step
    from pnode_dist.methods import METHODS
    tableau, h, level = METHODS["rk4"].tableau, 0.1, 0.2
    func = TimeMLP(dim=2, hidden=6)
    y0 = torch.tensor([[1.0, 0.2]], dtype=F64)
    event_t, _ = odeint_event(func, y0, T0, event_fn=lambda t, y: y[0, 0] - level,
                              method="rk4", options={"step_size": h})
    n = int(float(event_t.detach()) // h)

    def f(t, y):
        return func(torch.tensor(t, dtype=F64), y)

    def frozen():
        y = y0
        for k in range(n):
            y = rk_step(f, k * h, y, h, tableau)
        a, b = 0.0, h
        for _ in range(200):
            m = 0.5 * (a + b)
            if m in (a, b):
                break
            if float(rk_step(f, n * h, y, m, tableau)[0, 0].detach()) > level:
                a = m
            else:
                b = m
        return n * h + b

    assert abs(frozen() - float(event_t.detach())) <= 1e-12
    weight = func.l2.bias
    grad, = torch.autograd.grad(event_t, weight)
    _assert_central_differences(grad, weight, frozen)


def test_imex_event():
    """arkimex (fixed steps): free fall as the explicit part of an IMEX pair."""
    from pnode_dist import IMEX
    h = torch.tensor([10.0], dtype=F64, requires_grad=True)
    y0 = torch.cat([h, torch.zeros(1, dtype=F64)])[None]
    func = IMEX(implicit=lambda t, y: torch.zeros_like(y), explicit=_fall)
    event_t, sol = odeint_event(func, y0, T0, event_fn=_height, method="arkimex",
                                options={"step_size": 0.1})
    assert abs(float(event_t.detach()) - math.sqrt(2 * 10 / G)) <= 1e-12
    dt_dh, = torch.autograd.grad(event_t, h)
    assert abs(float(dt_dh) - 1 / math.sqrt(2 * G * 10)) <= 1e-9


def test_bouncing_ball_chain_against_closed_forms():
    """Three bounces (restitution r): t_1 = sqrt(2h/g), each next one 2 v_k / g later with
    v_k = r^k sqrt(2 g h); the last time's gradients w.r.t. h and r in closed form."""
    h = torch.tensor(5.0, dtype=F64, requires_grad=True)
    r = torch.tensor(0.8, dtype=F64, requires_grad=True)
    state = torch.stack([h, torch.zeros((), dtype=F64)])[None]
    t0 = torch.tensor(0.0, dtype=F64)
    times = []
    for _ in range(3):
        t0, sol = odeint_event(_fall, state, t0, event_fn=_height, rtol=1e-10, atol=1e-12)
        times.append(t0)
        end = sol[-1]
        state = torch.stack([end[:, 0] * 0 + 1e-12, -r * end[:, 1]], -1)   # bounce
    v = math.sqrt(2 * G * 5.0)
    exact = math.sqrt(2 * 5.0 / G) + 2 * v * (0.8 + 0.8 ** 2) / G
    assert abs(float(times[-1]) - exact) <= 1e-9
    d_h, d_r = torch.autograd.grad(times[-1], [h, r])
    dv_dh = G / v
    assert abs(float(d_h) - (1 / v + 2 * dv_dh * (0.8 + 0.64) / G)) <= 1e-8
    assert abs(float(d_r) - 2 * v * (1 + 2 * 0.8) / G) <= 1e-8


def test_the_first_of_several_event_functions_stops_the_solve():
    """Two decays with thresholds: the solve stops where the first reaches its threshold;
    an event function negative at the start counts from its own sign (torchdiffeq's rule)."""
    y0 = torch.tensor([[1.0, 1.0]], dtype=F64)
    rates = torch.tensor([0.5, 2.0], dtype=F64)
    event_t, sol = pnode_dist.odeint(lambda t, y: -rates * y, y0,
                                     torch.tensor([0.0, 1.0], dtype=F64),
                                     event_fn=lambda t, y: torch.stack([y[0, 0] - 0.5,
                                                                        0.25 - y[0, 1]]),
                                     rtol=1e-10, atol=1e-12)
    assert abs(float(event_t.detach()) - math.log(4.0) / 2.0) <= 1e-9       # the second, at ln4/2
    assert abs(float(sol.detach()[-1, 0, 1]) - 0.25) <= 1e-10


def test_backward_in_time_and_tuple_states():
    """reverse_time: from t0 = 2 back to the time the speed was 5 (a tuple state). (A step
    over which an event function crosses zero twice is not seen, as in torchdiffeq: the
    height, which peaks in between, would be.)"""
    def fall(t, state):
        pos, vel = state
        return vel, torch.full_like(vel, -G)
    # At t = 2 after falling from 10 at t = 0 (from rest).
    pos = torch.tensor([10.0 - 0.5 * G * 4.0], dtype=F64)
    vel = torch.tensor([-G * 2.0], dtype=F64)
    event_t, (ps, vs) = odeint_event(fall, (pos, vel), torch.tensor(2.0, dtype=F64),
                                     event_fn=lambda t, s: s[1] + 5.0, reverse_time=True,
                                     rtol=1e-10, atol=1e-12)
    assert abs(float(event_t.detach()) - 5.0 / G) <= 1e-10
    assert ps.shape == (2, 1) and abs(float(vs[-1]) + 5.0) <= 1e-10


def test_torchdiffeq_odeint_event_runs_on_ours():
    """torchdiffeq.odeint_event(..., odeint_interface=pnode_dist.odeint): the same event, and
    gradients close to ours (torchdiffeq takes f at the event for the slope)."""
    h = torch.tensor([10.0], dtype=F64, requires_grad=True)
    y0 = torch.cat([h, torch.zeros(1, dtype=F64)])[None]
    t0 = torch.tensor(0.0, dtype=F64)
    theirs, _ = torchdiffeq.odeint_event(_fall, y0, t0, event_fn=_height,
                                         odeint_interface=pnode_dist.odeint)
    ours, _ = odeint_event(_fall, y0, t0, event_fn=_height)
    assert abs(float(theirs) - float(ours)) <= 1e-13
    g_theirs, = torch.autograd.grad(theirs, h)
    g_ours, = torch.autograd.grad(ours, h)
    assert abs(float(g_theirs) - float(g_ours)) <= 1e-10


def test_odeint_adjoint_event_time_has_its_gradient():
    """torchdiffeq's odeint_adjoint(event_fn=...) gives the event time a gradient: ours too."""
    h = torch.tensor([10.0], dtype=F64, requires_grad=True)
    y0 = torch.cat([h, torch.zeros(1, dtype=F64)])[None]
    event_t, _ = pnode_dist.odeint_adjoint(_fall, y0, torch.tensor([0.0, 1.0], dtype=F64),
                                           event_fn=_height)
    dt_dh, = torch.autograd.grad(event_t, h)
    assert abs(float(dt_dh) - 1 / math.sqrt(2 * G * 10)) <= 1e-13


def test_plain_odeint_treats_the_event_time_as_fixed():
    """odeint(event_fn=...) as torchdiffeq's: event_t has no gradient, the solution's is at a
    fixed time (here dy/dh = 1 for the height at a fixed time of free fall)."""
    h = torch.tensor([10.0], dtype=F64, requires_grad=True)
    y0 = torch.cat([h, torch.zeros(1, dtype=F64)])[None]
    event_t, sol = pnode_dist.odeint(_fall, y0, torch.tensor([0.0, 1.0], dtype=F64),
                                     event_fn=_height)
    assert not event_t.requires_grad
    grad, = torch.autograd.grad(sol[-1, 0, 0], h)
    assert abs(float(grad) - 1.0) <= 1e-12


@pytest.mark.parametrize("kwargs, words", [
    (dict(method="rk4"), "method 'rk4' need options\\['step_size'\\]"),
    (dict(method="euler"), "method 'euler' need options\\['step_size'\\]"),

    (dict(t=[0.0, 1.0, 2.0]), "t holds two times"),
    (dict(event_fn=3), "event_fn must be callable"),
    (dict(options={"event_tol": -1.0}), "event_tol"),
])
def test_bad_event_arguments_are_input_errors(kwargs, words):
    args = dict(t=torch.tensor([0.0, 1.0], dtype=F64), event_fn=_height)
    args.update(kwargs)
    y0 = torch.tensor([[10.0, 0.0]], dtype=F64)
    with pytest.raises(InputError, match=words):
        pnode_dist.odeint(_fall, y0, **args)


def test_event_fn_errors_and_missing_events_are_solver_errors():
    y0 = torch.tensor([[10.0, 0.0]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    calls = []

    def failing(s, y):
        calls.append(s)
        if len(calls) == 4:
            raise ValueError("injected failure in event_fn")
        return y[..., 0]
    with pytest.raises(SolverError, match="injected failure") as info:
        pnode_dist.odeint(_fall, y0, t, event_fn=failing)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(SolverError, match="event_fn returned NaN"):
        pnode_dist.odeint(_fall, y0, t,
                          event_fn=lambda s, y: y[..., 0] * (float("nan") if s > 0.5 else 1.0))
    with pytest.raises(SolverError, match="no event"):
        pnode_dist.odeint(lambda s, y: torch.zeros_like(y), y0, t, event_fn=_height,
                          options={"max_num_steps": 50})


@pytest.mark.parametrize("method", ["rk4", "cn"])
def test_event_fn_failing_in_the_retaken_crossing_step_is_a_solver_error(method):
    """Between the fixed steps only the retaken crossing step evaluates event_fn: raising or
    NaN there is a SolverError chained to the exception, and the next solve works."""
    y0 = torch.tensor([[10.0, 0.0]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)

    def between_steps(s):
        return abs(float(s) / 0.1 - round(float(s) / 0.1)) > 1e-6

    def raising(s, y):
        if between_steps(s):
            raise ValueError("injected failure in event_fn")
        return y[..., 0]

    def nan(s, y):
        return y[..., 0] * (float("nan") if between_steps(s) else 1.0)
    options = {"step_size": 0.1}
    with pytest.raises(SolverError, match="crossing step.*injected failure") as info:
        pnode_dist.odeint(_fall, y0, t, event_fn=raising, method=method, options=options)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(SolverError, match="event_fn returned NaN"):
        pnode_dist.odeint(_fall, y0, t, event_fn=nan, method=method, options=options)
    event_t, _ = pnode_dist.odeint(_fall, y0, t, event_fn=_height, method=method,
                                   options=options)
    assert abs(float(event_t) - math.sqrt(2 * 10 / G)) <= 1e-10


def test_an_event_function_without_rate_at_the_event_is_a_solver_error():
    """odeint_event: an event function whose rate of change along the solution is zero at the
    event (no graph at all: a threshold) has no event time derivative: a SolverError, and the
    next solve works."""
    h = torch.tensor([10.0], dtype=F64, requires_grad=True)
    y0 = torch.cat([h, torch.zeros(1, dtype=F64)])[None]

    def flat(t, y):                  # the height's value, no derivative
        return y[..., 0] + (y[..., 0].detach() - y[..., 0])

    def threshold(t, y):
        return (y[..., 0] > 0).to(F64) - 0.5
    for event_fn in (flat, threshold):
        with pytest.raises(SolverError, match="tangential crossing"):
            odeint_event(_fall, y0, T0, event_fn=event_fn)
    event_t, _ = odeint_event(_fall, y0, T0, event_fn=_height)
    dt_dh, = torch.autograd.grad(event_t, h)
    assert abs(float(dt_dh) - 1 / math.sqrt(2 * G * 10)) <= 1e-13


def test_second_derivatives_through_an_event_time_are_refused():
    h = torch.tensor([10.0], dtype=F64, requires_grad=True)
    y0 = torch.cat([h, torch.zeros(1, dtype=F64)])[None]
    event_t, _ = odeint_event(_fall, y0, T0, event_fn=_height)
    with pytest.raises(InputError, match="event time"):
        torch.autograd.grad(event_t, h, create_graph=True)


@pytest.mark.long
def test_bouncing_ball_example_learns_the_restitution_on_two_ranks():
    """examples/bouncing_ball.py under mpiexec -n 2: the restitution moves from 0.5 towards
    the true 0.75, and the run prints what one rank prints."""
    from conftest import ROOT, run_mpi
    script = ROOT / "examples" / "bouncing_ball.py"
    runs = [run_mpi(n, script, "--balls", "4", "--iterations", "20", timeout=180)
            for n in (1, 2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    learned = [float(p.stdout.split("learned restitution")[1].split()[0]) for p in runs]
    assert learned[0] == learned[1], [p.stdout for p in runs]
    assert 0.65 < learned[0] < 0.85, runs[0].stdout


@pytest.mark.parametrize("policy", ["all", "uniform", "binomial", "disk"])
def test_event_gradients_are_the_same_under_every_checkpointing_plan(policy, tmp_path):
    from pnode_dist import Checkpointing
    plans = {"all": dict(schedule="all"), "uniform": dict(schedule="uniform", slots=3),
             "binomial": dict(schedule="binomial", slots=3),
             "disk": dict(schedule="binomial", slots=3, host_bytes=0,
                          disk_dir=str(tmp_path))}
    func = TimeMLP(dim=2, hidden=6)
    y0 = torch.tensor([[1.0, 0.2], [0.8, -0.1]], dtype=F64)

    def gradients(checkpointing):
        y = y0.clone().requires_grad_(True)
        event_t, sol = odeint_event(func, y, T0, event_fn=lambda t, s: s[:, 0] - 0.2,
                                    rtol=1e-8, atol=1e-10, checkpointing=checkpointing)
        (sol[-1].square().sum() + event_t).backward()
        params = [p.grad.clone() for p in func.parameters()]
        for p in func.parameters():
            p.grad = None
        return torch.cat([y.grad.reshape(-1)] + [p.reshape(-1) for p in params])

    ref = gradients(None)
    got = gradients(Checkpointing(**plans[policy]))
    assert float((got - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
