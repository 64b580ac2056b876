"""The torch callbacks of a TS's explicit part (RHS form).

TorchRHS evaluates f(t, y; theta) for the TS and provides the transposed Jacobian products the
discrete adjoint needs, as Python-type PETSc Mats:
  J  = df/dy      (multTranspose = vjp with respect to the state)
  Jp = df/dtheta  (multTranspose = vjp with respect to the parameters)
Exceptions raised by the user's module inside a callback are caught and recorded (the output is
filled with zeros, or NaN in the adjoint products) instead of unwinding through PETSc on one
rank only; the solver turns them into an error on every rank after the solve. On the CPU a
non-finite f is recorded the same way.

Callbacks run once per stage and step: they reuse cached tensor views of the TS's Vecs (a TS
keeps its work Vecs for its whole life, and one TorchRHS serves one TS only; views.py). The
cache is bounded: Vecs PETSc makes for one use (ARKIMEX re-runs) fall out of it.
"""
import collections

import torch
from mpi4py import MPI
from torch.autograd.graph import get_gradient_edge

from ..errors import InputError
from .guard import Recorder, guarded
from .views import touch, vec_view

def graph_output(out):
    """What a kept graph of f needs of its output `out`: the autograd edge it leaves by
    (torch.autograd.grad takes it as an output), or None if out needs no gradient. Keeping
    the edge instead of the tensor frees the output's memory (the graph keeps what it saved).
    """
    return get_gradient_edge(out) if out.requires_grad else None


class StageInput:
    """The input of one stored graph of f, a copy of the stage the TS evaluated f at. The
    graph saves (views of) it through `pack`/`unpack` (torch's saved-tensor hooks) as places
    in it, so once PETSc's trajectory holds the same stage the copy is freed (`release`), and
    the adjoint's linearisation at the stage PETSc restores (`source`) is what the graph reads:
    the stage lives once, in the trajectory."""

    def __init__(self, y):
        self.y = y                   # the graph's leaf (its data freed by release)
        self.ptr = y.untyped_storage().data_ptr()
        self.fingerprint = fingerprint(y.detach())
        self.source = None           # the restored stage the graph reads once released
        self.released = False
        self.pinned = False          # taken for interpolated outputs: never released

    def pack(self, tensor):
        if tensor.dtype == self.y.dtype and tensor.untyped_storage().data_ptr() == self.ptr:
            return (tensor.size(), tensor.stride(), tensor.storage_offset())
        # Detached: a saved output kept with its grad_fn would be a reference cycle through
        # the graph that Python's collector cannot see (every stored graph leaked).
        return tensor.detach()

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        base = self.y.detach() if not self.released else self.source
        if base is None:
            raise RuntimeError("a stored graph of func was used before its stage was restored")
        return base.as_strided(*packed)

    def release(self):
        if not (self.released or self.pinned):
            self.released = True
            self.y.untyped_storage().resize_(0)


def fingerprint(y):
    """[sum, sum of magnitudes] of a state, in float64 on its device (no synchronisation):
    what a stored graph's stage is known by once its copy is freed."""
    return torch.stack([y.sum(dtype=torch.float64), y.abs().sum(dtype=torch.float64)])


class GraphStore:
    """f's autograd graphs at the stages of a forward solve, for the adjoint to reuse instead of
    re-evaluating f at the same points. Entries are kept in evaluation order; the adjoint asks
    for them in reverse, and each lookup is verified (time within round-off; the stage's
    fingerprint equal, or within round-off), so a miss only costs a re-evaluation. Stage
    copies are freed once a later step starts (`release_inputs`): the trajectory holds them.
    """

    _WINDOW = 16

    def __init__(self):
        self.entries = []            # (t, StageInput, graph_output(f(t, stage)))
        self.pending = []            # evaluations of the step being attempted
        self.cursor = -1
        self.closed = False          # keeps no more graphs (its memory budget is reached)
        self._released = 0           # entries before this one are released (or pinned)

    @property
    def size(self):
        """Graphs held (those of the step being attempted included)."""
        return len(self.entries) + len(self.pending)

    def add(self, t, stage, out):
        self.pending.append((t, stage, out))

    def accept_step(self):
        """The attempted step was accepted: its evaluations join the store."""
        self.entries.extend(self.pending)
        self.pending.clear()
        self.cursor = len(self.entries) - 1

    def step_graphs(self, tableau, t_start, t_end, step_start):
        """The graphs at the stages of the step just accepted, [(y_leaf, f)] in stage order, or
        None. Stages 2.. are the last entries (their times say so); the first is the entry
        before them, or for an FSAL step after a rejected attempt (whose evaluations lie in
        between) the last one at the step's start whose state is step_start to round-off (the
        previous step's last stage). Their stage copies stay (pinned): the dense output's vjp
        reads them."""
        s, entries = tableau.stages, self.entries
        if len(entries) < s:
            return None
        h = t_end - t_start
        tol = 1e-12 * max(1.0, abs(t_start), abs(t_end))

        def at(entry, c):
            return abs(entry[0] - (t_start + c * h)) <= tol
        tail = entries[len(entries) - s + 1:]
        if not all(at(entry, c) for entry, c in zip(tail, tableau.c[1:])):
            return None
        first = entries[-s]
        if not at(first, tableau.c[0]):
            first = next((e for e in reversed(entries[-4 * s:-s])
                          if at(e, tableau.c[0]) and not e[1].released
                          and e[1].y.shape == step_start.shape
                          and round_off_apart(e[1].y.detach(), step_start.to(e[1].y.dtype))),
                         None)
            if first is None:
                return None
        for _, stage, _ in [first] + tail:
            stage.pinned = True
        return [(stage.y, out) for _, stage, out in [first] + tail]

    def release_inputs(self, keep_last=0):
        """Free the stage copies of every entry but the last `keep_last` (and pinned ones)."""
        end = len(self.entries) - keep_last
        for _, stage, _ in self.entries[self._released:end]:
            stage.release()
        self._released = max(self._released, end)

    def find(self, t, y):
        """The stored (y_leaf, output edge) at time t and stage y (which the graph then reads),
        or None. A stage equal to within round-off counts as the same point: the first stage
        of an FSAL step (dopri5, tsit5, bosh3) is the state PETSc updated, the graph's is the
        previous step's last stage, the same sum rounded differently (a miss there cost one f
        evaluation per step; the linearisation points then differ by round-off, as PETSc's own
        adjoint's already did, linearising at the updated state)."""
        tol = 1e-12 * max(1.0, abs(t))
        top = min(self.cursor + 1, len(self.entries) - 1)
        mark = fingerprint(y).tolist()
        slack = 64 * torch.finfo(y.dtype).eps * mark[1]
        near = None
        for j in range(top, max(-1, self.cursor - self._WINDOW), -1):
            tj, stage, out = self.entries[j]
            if abs(tj - t) > tol or stage.y.shape != y.shape:
                continue
            stored = stage.fingerprint.tolist()
            if stored == mark:
                near = j
                break
            if near is None and all(abs(a - b) <= slack for a, b in zip(stored, mark)):
                near = j
        if near is None:
            return None
        self.cursor = near - 1
        _, stage, out = self.entries[near]
        stage.source = y
        return stage.y, out


def round_off_apart(a, b):
    """a and b differ by no more than a few units in the last place of their largest entry."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) <= 8 * torch.finfo(b.dtype).eps * max(scale, 1e-300)


_MAX_VIEWS = 64                      # cached Vec views per TS (its own Vecs are fewer)


class TorchRHS(Recorder):
    """f(t, y) from a torch module on the local shard of the state, for one TS. Its callbacks
    run guarded: their first error is recorded here (Recorder)."""

    def __init__(self, func, params, local_shape, module_dtype, device):
        super().__init__()
        self.func = func
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.params = list(params)
        self.shape = tuple(local_shape)
        self.dtype = module_dtype
        self.phase = "the forward solve"     # what the TS is doing (set by the Integrator)
        self._lin_t = None           # the time of the linearisation point
        self.nparams = sum(p.numel() for p in self.params)
        self._views = collections.OrderedDict()   # Vec handle -> tensor view, least recent first
        self._lin = None             # (y_leaf, f(t, y_leaf)) at the current linearisation point
        self._cached_param_vjp = None
        self.store = None            # a GraphStore while a forward solve keeps f's graphs
        self.agree_comm = None       # where f communicates: ranks agree on using a graph
        self.counts = dict.fromkeys(("rhs", "linearize", "reused", "vjp"), 0)

    # ---------------------------------------------------------------- helpers
    def view(self, vec, numel=None, mode="r"):
        """Cached zero-copy view of one of this TS's Vecs (state-shaped unless numel given),
        about to be read ('r') or written ('w')."""
        v = self._views.get(vec.handle)
        if v is None:
            v = vec_view(vec, self.shape if numel is None else (numel,), mode)
            self._views[vec.handle] = v
            if len(self._views) > _MAX_VIEWS:
                # PETSc also passes Vecs it makes for one use (ARKIMEX re-runs): a view holds
                # its Vec, so the least recently used go.
                self._views.popitem(last=False)
        else:
            self._views.move_to_end(vec.handle)
            if self.on_gpu:
                touch(vec, mode)
        return v

    def forget_views(self):
        self._views.clear()

    def drop_graphs(self):
        """Drop f's graphs: the stored ones and the current linearisation's."""
        self._lin = self._cached_param_vjp = self.store = None

    def release(self):
        """Drop everything a solve left here (views, linearisation, graphs, the recorded
        error): the TS is being destroyed, or kept for ever (lifetime.py)."""
        self.forget_views()
        self.clear()
        self.drop_graphs()

    def _time(self, t):
        return torch.full((), t, dtype=self.dtype, device=self.device)

    def _in_func(self, t):
        """Where a callback at time t failed (for guarded)."""
        return lambda: f"func during {self.phase} at t={t:g}"

    def _finite(self, value, what, t):
        """False if `value` holds NaN/Inf; the first time, where (`what` at t) is noted. One
        reduction on the CPU; not checked on a GPU (it would be a synchronisation)."""
        if self.on_gpu or bool(torch.isfinite(value.sum())):
            return True
        if self.nonfinite is None:
            self.nonfinite = (f"{what} returned a non-finite value (NaN or Inf) during "
                              f"{self.phase} at t={t:g}")
        return False

    def _evaluate(self, t, y):
        out = self.func(self._time(t), y)
        if not isinstance(out, torch.Tensor) or out.shape != y.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"func(t, y) returned {got} for y of shape {tuple(y.shape)}: the "
                             "right-hand side must return a tensor shaped like y")
        return out

    # ---------------------------------------------------------------- TS callbacks
    def rhs(self, ts, t, X, F):
        """RHSFunction: F = f(t, X); with a GraphStore, f's graph is kept for the adjoint."""
        out_view = self.view(F, mode="w")
        self.counts["rhs"] += 1
        with guarded(self, self._in_func(t)) as call:
            if self.store is not None and not self.store.closed:
                y = self.view(X).to(self.dtype, copy=True).requires_grad_(True)
                stage = StageInput(y)
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
                        stage.pack, stage.unpack):
                    out = self._evaluate(t, y)
                self.store.add(t, stage, graph_output(out))
                out_view.copy_(out.detach())
                del out
            else:
                with torch.no_grad():
                    out_view.copy_(self._evaluate(t, self.view(X).to(self.dtype)))
            # NaN/Inf is reported where f first returned it, and kept out of the state.
            if not self._finite(out_view, "func", t):
                if self.error is None:
                    self.error = (f"{self.nonfinite}: check the model and its inputs, or use "
                                  "smaller steps if the dynamics blow up")
                out_view.zero_()
        if call.failed:
            # Zeros, not NaN: a NaN would make an adaptive method's error norm fail inside
            # PETSc (whose error path leaks the TS's work Vecs); the solve runs on to its end
            # and the error is raised on every rank there.
            out_view.zero_()
        F.stateIncrease()

    def linearize(self, ts, t, X, J, P):
        """RHSJacobian: build f's graph at the point (t, X) where J and Jp are applied next."""
        self._cached_param_vjp = None
        self.counts["linearize"] += 1
        self._lin_t = t
        if self.store is not None:
            self._lin = self.store.find(t, self.view(X).to(self.dtype))
            if self.agree_comm is not None:      # f communicates: every rank hits, or none
                if not self.agree_comm.allreduce(self._lin is not None, op=MPI.LAND):
                    self._lin = None
            if self._lin is not None:
                self.counts["reused"] += 1
                return
        self._lin = None
        with guarded(self, self._in_func(t)):
            y = self.view(X).detach().to(self.dtype).requires_grad_(True)
            with torch.enable_grad():
                out = self._evaluate(t, y)
            self._finite(out.detach(), "func", t)
            self._lin = (y, graph_output(out))

    def linearize_params(self, ts, t, X, Jp):
        """RHSJacobianP: PETSc calls it right after the RHSJacobian of the same stage, whose
        linearisation serves both."""

    # ---------------------------------------------------------------- products
    def _vjp(self, x, with_state):
        """Vector-Jacobian products at the linearisation point, or None after an error."""
        if self._lin is None:
            return None
        y, out = self._lin
        inputs = ([y] if with_state else []) + self.params
        self.counts["vjp"] += 1
        if out is None or (isinstance(out, torch.Tensor) and not out.requires_grad):
            return (None,) * len(inputs)     # f depends on neither y nor the parameters
        with guarded(self, "func during a vector-Jacobian product") as call:
            grads = torch.autograd.grad(out, inputs, self.view(x).to(self.dtype),
                                        retain_graph=True, allow_unused=True)
        if call.failed:
            return None
        if with_state and grads[0] is not None and self.nonfinite is None:
            # The state part only (one reduction); the parameter part is checked once, in the
            # gradient the adjoint returns.
            self._finite(grads[0], "a vector-Jacobian product of func", self._lin_t)
        return grads

    def vjp_state(self, x, y):
        """y = (df/dy)^T x; the parameter part of the same product is kept for vjp_params."""
        grads = self._vjp(x, with_state=True)
        out = self.view(y, mode="w")
        if grads is None:
            out.fill_(float("nan"))
        elif grads[0] is None:
            out.zero_()
        else:
            out.copy_(grads[0])
            self._cached_param_vjp = ((x.handle, x.stateGet()), grads[1:])
        y.stateIncrease()

    def vjp_params(self, x, y):
        """y = (df/dtheta)^T x (this rank's own contribution)."""
        cached = self._cached_param_vjp
        if cached is not None and cached[0] == (x.handle, x.stateGet()):
            grads = cached[1]
        else:
            grads = self._vjp(x, with_state=False)
        out = self.view(y, self.nparams, mode="w")
        if grads is None:
            out.fill_(float("nan"))
        else:
            flat = [g.reshape(-1) if g is not None else p.new_zeros(p.numel())
                    for g, p in zip(grads, self.params)]
            if out.dtype == self.dtype:
                torch.cat(flat, out=out)
            else:
                out.copy_(torch.cat(flat))
        y.stateIncrease()


class StateJacobianMat:
    """Python Mat context for J = df/dy (transposed products only, as the RK adjoint needs)."""

    def __init__(self, rhs):
        self.rhs = rhs

    def multTranspose(self, mat, x, y):  # noqa: N802 - petsc4py's name
        self.rhs.vjp_state(x, y)


class ParamJacobianMat:
    """Python Mat context for Jp = df/dtheta (transposed products only)."""

    def __init__(self, rhs):
        self.rhs = rhs

    def multTranspose(self, mat, x, y):  # noqa: N802
        self.rhs.vjp_params(x, y)
