"""Bad input gets an InputError that says what to do (single rank; tests/mpi covers all-ranks)."""
import pytest
import torch

from pnode_dist import InputError, SolverError, odeint


def _call(mlp, y0, t=(0.0, 1.0), **kw):
    kw.setdefault("method", "rk4")
    kw.setdefault("options", {"step_size": 0.1})
    return odeint(mlp, y0, torch.tensor(t, dtype=torch.float64), **kw)


@pytest.mark.parametrize("kw,words", [
    ({"method": "rk45"}, "valid methods are adaptive_heun, arkimex, beuler, bosh3, cn, dopri5, "
                         "euler, fehlberg2, heun2, heun3, kencarp3, kencarp4, kencarp5, kvaerno3, "
                         "kvaerno4, kvaerno5, midpoint, rk4, rk4_38, sdirk2, theta, trbdf2"),
    ({"method": "arkimex"}, "needs func=pnode_dist.IMEX"),
    ({"options": {"step_size": 0.1, "linear_solver": "lu"}}, "linear_solver"),
    ({"options": {"step_size": 0.1, "mass": torch.eye(3)}}, "implicit methods"),
    ({"options": {"stepsize": 0.1}}, "valid keys are"),
    ({"options": {"step_size": -1.0}}, "positive number"),
    ({"rtol": 0.0, "method": "dopri5", "options": None}, "rtol must be a positive number"),
    ({"petsc_options": ["ts_rk_type"]}, "petsc_options must be a dict"),
    ({"prefix": "bad prefix"}, "prefix must be"),
])
def test_bad_arguments(mlp, y0, kw, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(")):
        _call(mlp, y0, **kw)


@pytest.mark.parametrize("t,words", [((0.0, 0.5, 0.5), "strictly increasing"),
                                     ((0.0, 1.0, 0.5), "strictly increasing or strictly "
                                                       "decreasing"),
                                     ((), "at least one time"),
                                     ((0.0, float("inf")), "non-finite")])
def test_bad_times(mlp, y0, t, words):
    with pytest.raises(InputError, match=words):
        _call(mlp, y0, t)


def test_nan_in_y0(mlp, y0):
    y0[1, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        _call(mlp, y0)


def test_dtype_mismatch(mlp, y0):
    with pytest.raises(InputError, match=r"func\.to"):
        _call(mlp, y0.float())
    with pytest.raises(InputError, match="float32 or float64"):
        _call(mlp, y0.to(torch.int64))


def test_func_returning_wrong_shape(y0):
    class Bad(torch.nn.Module):
        def forward(self, t, y):
            return y[:, :2]
    with pytest.raises(SolverError, match="shaped like y"):
        _call(Bad(), y0)


def test_exception_inside_func_is_reported(y0):
    class Raises(torch.nn.Module):
        def forward(self, t, y):
            if t > 0.5:
                raise ValueError("boom")
            return -y
    with pytest.raises(SolverError, match="boom"):
        _call(Raises(), y0)


def test_max_num_steps(mlp, y0):
    with pytest.raises(SolverError, match="max_num_steps"):
        _call(mlp, y0, method="dopri5", options={"max_num_steps": 3}, rtol=1e-10, atol=1e-10)


class Counting(torch.nn.Module):
    """-y, counting its evaluations; raises once `fail` is set."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
        self.calls, self.fail = 0, False

    def forward(self, t, y):
        self.calls += 1
        if self.fail:
            raise ValueError("func fails now")
        return self.w * y


@pytest.mark.parametrize("t,kw,words", [
    ((0.0, 1.0), {"options": {"step_size": 1e-5, "max_num_steps": 1000}},
     "t spans 1e\\+05 steps of options\\['step_size'\\]=1e-05, more than "
     "options\\['max_num_steps'\\]=1000"),
    ((0.0, 1e308), {}, "t spans more than 1e308 steps"),
    ((0.0, 1.0), {"options": {"step_size": 1e-320}}, "t spans more than 1e308 steps"),
    ((0.0, 0.5, 1.0), {"options": {"max_num_steps": 1}},
     "t spans 2 steps \\(one per interval of t\\), more than options"),
    ((0.0, 1.0), {"options": {"step_size": 0.1, "max_num_steps": True}},
     "must be a positive integer; got True"),
    ((0.0, 1.0), {"options": {"step_size": 0.1, "event_tol": 1e-3}}, "it needs event_fn"),
])
def test_steps_and_limits_refused_before_stepping(y0, t, kw, words):
    """A fixed-step solve longer than max_num_steps (also one no float can count), and
    nonsense limits, are refused before func is called once."""
    func = Counting()
    with pytest.raises(InputError, match=words):
        _call(func, y0.clone().requires_grad_(True), t, **kw)
    assert func.calls == 0


@pytest.mark.parametrize("method,options", [("dopri5", {}), ("rk4", {"step_size": 0.1})])
def test_an_event_tol_that_cannot_locate_the_event_is_an_error(y0, method, options):
    with pytest.raises(SolverError, match="options\\['event_tol'\\]=1e\\+09 is not below "
                                          "the length of the step"):
        odeint(Counting(), y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method=method,
               options=dict(options, event_tol=1e9), event_fn=lambda t, y: 0.3 - t)


def test_func_failing_in_a_create_graph_backward_is_a_solver_error(y0):
    func = Counting()
    y = y0.clone().requires_grad_(True)
    ys = _call(func, y)
    func.fail = True
    with pytest.raises(SolverError, match="ValueError in func while the backward pass "
                                          "\\(create_graph=True\\) redid") as info:
        torch.autograd.grad(ys.sum(), y, create_graph=True)
    assert isinstance(info.value.__cause__, ValueError)
    func.fail = False
    (g,) = torch.autograd.grad(_call(func, y).sum(), y, create_graph=True)
    assert g.requires_grad


class NaNBetween(torch.nn.Module):
    """-y, but NaN for 0.4 < t < 0.6 in the evaluations `when` selects: 'always', or
    'derivatives' (only where a graph is built: linearisations, Newton's jvps, the adjoint)."""

    def __init__(self, when):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
        self.when = when

    def forward(self, t, y):
        out = self.w * y
        bad = 0.4 < float(t) < 0.6 and (self.when == "always" or torch.is_grad_enabled())
        return out * float("nan") if bad else out


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.1}), ("dopri5", None),
                                            ("cn", {"step_size": 0.1}), ("beuler", None)])
@pytest.mark.parametrize("when", ["always", "derivatives"])
def test_nan_in_func_is_located(y0, method, options, when):
    """The error names the first NaN's source and time, in the forward or the adjoint solve,
    also when what PETSc reports is only its consequence (a failed Newton solve, a non-finite
    gradient)."""
    y = y0.clone().requires_grad_(True)
    with pytest.raises(SolverError) as info:        # no stored graphs: the adjoint builds them
        _call(NaNBetween(when), y, method=method, options=options,
              store_graphs=False).sum().backward()
    message = str(info.value)
    assert message.startswith(("func returned a non-finite value",
                               "a Jacobian-vector product of func returned a non-finite value")), \
        message
    t = float(message.split(" at t=")[1].split(",")[0].split(":")[0])
    assert 0.4 < t < 0.6, message
    explicit = method in ("rk4", "dopri5")
    phase = "the adjoint solve" if explicit and when == "derivatives" else "the forward solve"
    assert f"during {phase}" in message, message
