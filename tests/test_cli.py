"""The apps' command lines: nonsense is refused by argparse with one line on stderr and exit
status 2 (never a traceback, never silently accepted), the same on every rank under mpiexec,
printed once; sensible command lines parse."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_mpi

APPS = ("classify", "cnf", "stiff", "pde", "pendulum")
_modules = {}


def _app(name):
    """The app's module, loaded once in this process (its parse_args only is used)."""
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(f"app_{name}", ROOT / "apps" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


# Refused by every app.
COMMON = [
    ["--lr", "nan"], ["--lr", "-1"], ["--lr", "inf"], ["--lr", "x"], ["--seed", "-1"],
    ["--seed", str(2 ** 40)], ["--save-every", "-1"], ["--slots", "0"], ["--host-bytes", "-5"],
    ["--checkpoint", "foo"], ["--checkpoint", "binomial"], ["--checkpoint", "all", "--slots", "3"],
    ["--checkpoint", "uniform", "--disk-dir", "/tmp"], ["--keep-checkpoints"], ["--out", ""],
    ["--out", str(ROOT / "README.md")], ["--state-dir", str(ROOT / "README.md")],
    ["--disk-dir", str(ROOT / "README.md")], ["--resume", ""], ["--bogus"], ["stray"],
    ["--save-every", "1.5"], ["--lr", "1\n2"],
]
PER_APP = {
    "classify": [["--epochs", "0"], ["--epochs", "-3"], ["--method", "foo"],
                 ["--method", "arkimex"],
                 ["--steps", "0"], ["--steps", "-1"], ["--method", "dopri5", "rk4", "--steps", "0"],
                 ["--limit", "-1"], ["--limit", "0"], ["--batch-size", "0"], ["--blocks", "0"],
                 ["--channels", "0"], ["--rtol", "0"], ["--atol", "nan"],
                 ["--blocks", "2", "--method", "rk4", "rk4", "rk4"], ["--dataset", "cifar"]],
    "cnf": [["--iterations", "0"], ["--eval-every", "0"], ["--hidden", "0"], ["--layers", "-1"],
            ["--test-size", "0"], ["--steps", "-1"], ["--steps", "0"], ["--method", "foo"],
            ["--batch-size", "0"], ["--rtol", "-1e-5"], ["--trace", "approx"],
            ["--alpha", "0.5"], ["--alpha", "0"], ["--kinetic-weight", "-1"],
            ["--jacobian-weight", "nan"], ["--test-draws", "0"], ["--elementwise", "-1"],
            ["--preprocess", "pca"], ["--data", "mnist"]],
    "stiff": [["--iterations", "0"], ["--points", "1"], ["--substeps", "0"],
              ["--trajectories", "0"], ["--method", "rk4"], ["--hidden", "0"],
              ["--linear-solver", "lu"], ["--model", "kinetic"], ["--held-out", "0"]],
    "pde": [["--iterations", "0"], ["--grid", "1"], ["--window", "0"],
            ["--snapshots", "5", "--window", "4"], ["--quick", "--window", "8"],
            ["--steps-per-snapshot", "0"], ["--proc-sizes", "0", "1"], ["--proc-sizes", "2", "2"],
            ["--eval-every", "0"], ["--method", "foo"], ["--hidden", "-2"],
            ["--stencil", "hex"], ["--reaction", "linear"], ["--warmup", "600"],
            ["--iterations", "10", "--warmup", "10"], ["--h1-weight", "-1"],
            ["--stencil-lr", "0"]],
    "pendulum": [["--iterations", "0"], ["--points", "1"], ["--substeps", "0"],
                 ["--trajectories", "0"], ["--method", "rk4"], ["--duration", "0"],
                 ["--initial-g", "-1"], ["--initial-c", "-0.5"], ["--lr-g", "nan"]],
}
CASES = [(app, args) for app in APPS for args in COMMON + PER_APP[app]]


@pytest.mark.parametrize("app,args", CASES, ids=[f"{a}:{' '.join(x)!r}" for a, x in CASES])
def test_nonsense_is_one_line_and_status_2(app, args, capsys):
    with pytest.raises(SystemExit) as exit_:
        _app(app).parse_args(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and "error:" in err, err       # one line, no usage block


@pytest.mark.parametrize("app,args", [
    ("classify", []), ("classify", ["--method", "dopri5", "--steps", "0", "--rtol", "1e-3"]),
    ("classify", ["--blocks", "2", "--method", "rk4", "dopri5", "--steps", "4", "0",
                  "-ode2_ts_adapt_dt_max", "0.05"]),
    ("classify", ["--checkpoint", "binomial", "--slots", "3", "--host-bytes", "0", "--disk-dir",
                  "/tmp/x", "--keep-checkpoints", "--limit", "1"]),
    ("cnf", ["--method", "bosh3", "--steps", "0", "--layers", "0"]), ("cnf", ["--quick"]),
    ("cnf", ["--data", "digits", "--kinetic-weight", "0.01", "--alpha", "1e-6"]),
    ("stiff", ["--points", "2", "--method", "beuler"]), ("stiff", ["--model", "mlp", "--quick"]),
    ("pendulum", ["--quick", "--method", "beuler"]),
    ("pde", ["--quick"]), ("pde", ["--window", "1", "--snapshots", "3", "--proc-sizes", "1", "1"]),
    ("pde", ["--stencil", "free", "--reaction", "mlp", "--h1-weight", "0", "--warmup", "0"]),
])
def test_sensible_command_lines_parse(app, args, capsys):
    _app(app).parse_args(args)
    assert capsys.readouterr().err == ""


def test_control_characters_in_a_value_stay_escaped(capsys):
    with pytest.raises(SystemExit):
        _app("cnf").parse_args(["--hidden", "x\x1b[2J\ny"])
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1 and "\\x1b[2J\\ny" in err


@pytest.mark.parametrize("app,args", [("classify", ["--method", "foo"]),
                                      ("cnf", ["--eval-every", "0"]),
                                      ("stiff", ["--points", "1"]),
                                      ("pde", ["--steps-per-snapshot", "-1"])])
def test_launched_app_exits_2_with_one_line(app, args):
    proc = subprocess.run([sys.executable, f"apps/{app}.py", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_two_ranks_exit_2_and_print_once():
    """Every rank parses the same argv and exits with 2; rank 0 alone prints. The rank-count
    check (a batch smaller than the ranks) is the same on every rank too; --help prints once."""
    proc = run_mpi(2, ROOT / "apps" / "classify.py", "--batch-size", "1", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "smaller than the 2 ranks" in proc.stderr, \
        proc.stderr
    helped = run_mpi(2, ROOT / "apps" / "cnf.py", "--help", timeout=120)
    assert helped.returncode == 0 and helped.stdout.count("usage:") == 1, helped.stdout


# Absurd sizes (issue 37): refused in one line, exit status 2, before anything big is allocated,
# from a lower bound of the model's and the states' bytes against the memory available. Each
# launch is limited to 4 GB of address space: a run that allocates anyway fails fast (with a
# traceback) instead of taking the machine's memory.
ADDRESS_SPACE = 4 * 10 ** 9
ABSURD = [("cnf", ["--batch-size", "1000000000"], "--batch-size 1000000000"),
          ("cnf", ["--test-size", "1000000000"], "--test-size 1000000000"),
          ("classify", ["--channels", "100000"], "--channels 100000"),
          ("stiff", ["--points", "1000000000"], "--points 1000000000"),
          ("pendulum", ["--trajectories", "100000000"], "--trajectories 100000000"),
          ("pde", ["--grid", "30000"], "--grid 30000")]


def _limited():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _launch(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd + ["--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120, preexec_fn=_limited)


@pytest.mark.parametrize("app,args,option", ABSURD,
                         ids=[f"{a}:{' '.join(x)}" for a, x, _ in ABSURD])
def test_absurd_size_is_refused_before_allocating(app, args, option, tmp_path):
    proc = _launch([sys.executable, f"apps/{app}.py", *args], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    lead, _, rest = proc.stderr.partition(" needs at least ")
    assert lead.startswith("error: --") and option in lead and rest, proc.stderr
    assert "available on host" in rest and option.split()[0] in rest.split(": lower ")[1]
    assert not (tmp_path / "out").exists()                  # refused before any file is made


def test_absurd_size_on_two_ranks_is_refused_once(tmp_path):
    """The same refusal on every rank (exit status 2), printed once; the two ranks of this
    node share its memory."""
    proc = _launch(["mpiexec", "-n", "2", sys.executable, "apps/cnf.py", "--batch-size",
                    "1000000000"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: --batch-size 1000000000 needs at least "), proc.stderr
    assert "shared by its 2 ranks" in proc.stderr and "or use more nodes" in proc.stderr


class _Node:
    """A stand-in communicator: `ranks` ranks on one node, each with this rank's needs."""

    def __init__(self, ranks):
        self.ranks = ranks

    def Split_type(self, kind):
        return self

    def bcast(self, value, root=0):
        return value

    def Free(self):
        pass

    def Get_rank(self):
        return 0

    def allgather(self, value):
        return [value] * self.ranks


def test_memory_estimate_matches_a_real_model_and_the_available_memory(monkeypatch):
    """The parameters' part is the real model's parameters, gradients and Adam's moments after
    a step; the states' part is the flow's input in the solver precision times rk4's stages and
    solution. A run is refused exactly when the ranks of a node need more than it has."""
    import torch
    from pnode_dist._reversal import budget
    cnf = _app("cnf")
    workflow, sizing = sys.modules["workflow"], sys.modules["sizing"]
    args = cnf.parse_args(["--hidden", "16", "--layers", "2", "--elementwise", "3",
                           "--batch-size", "1000"])
    needs = {n.what.split(" (")[0]: n for n in cnf.memory_needs(args, 0, 1, 2, False, None)[0]}
    model = cnf.CNFDynamics(2, 16, 2, elementwise=3).double()
    opt = torch.optim.Adam(model.parameters())
    sum((p ** 2).sum() for p in model.parameters()).backward()
    opt.step()
    moments = [v for state in opt.state.values() for k, v in state.items() if k != "step"]
    measured = sum(p.nbytes + p.grad.nbytes for p in model.parameters()) + \
        sum(v.nbytes for v in moments)
    assert needs["the parameters"].bytes == measured
    flow_input = torch.cat([torch.zeros(1000, 2), torch.zeros(1000, 1)], dim=1)
    assert needs["the batch's ODE state"].bytes == \
        5 * flow_input.numel() * sizing.SOLVER_BYTES
    classify = _app("classify")
    real = classify.ODENet(8, 4, 10, [{}, {}])
    assert sizing.parameter_bytes(lambda: classify.ODENet(8, 4, 10, [{}, {}])) == \
        sum(p.nbytes for p in real.parameters())

    total = sum(n.bytes for n in needs.values())
    monkeypatch.setattr(budget, "available_host_bytes", lambda: total)
    sizing.check_memory(_Node(1), list(needs.values()))            # fits exactly
    monkeypatch.setattr(budget, "available_host_bytes", lambda: total - 1)
    with pytest.raises(workflow.RunError) as refused:
        sizing.check_memory(_Node(1), list(needs.values()))
    message = str(refused.value)
    assert refused.value.exit_code == 2 and "\n" not in message
    assert message.startswith(f"--batch-size 1000 needs at least {sizing.format_bytes(total)} "
                              "per rank (")
    assert "lower --batch-size or use more ranks/nodes" in message
    # Two ranks on the node: each one's share is half of what the node has.
    monkeypatch.setattr(budget, "available_host_bytes", lambda: 2 * total)
    sizing.check_memory(_Node(2), list(needs.values()))
    monkeypatch.setattr(budget, "available_host_bytes", lambda: 2 * total - 1)
    with pytest.raises(workflow.RunError, match="shared by its 2 ranks.*or use more nodes"):
        sizing.check_memory(_Node(2), list(needs.values()))
    # The largest phase counts; a parameter-bound refusal names the model's sizes.
    big = sizing.parameters_need(total, "--hidden 16 --layers 2")
    monkeypatch.setattr(budget, "available_host_bytes", lambda: 4 * total - 1)
    with pytest.raises(workflow.RunError, match="^--hidden 16 --layers 2 needs at least .*: "
                                                "lower --hidden or --layers$"):
        sizing.check_memory(_Node(1), list(needs.values()), [big])
