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
                         "euler, fehlberg2, heun2, heun3, midpoint, rk4, rk4_38, sdirk2, "
                         "theta, trbdf2"),
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
