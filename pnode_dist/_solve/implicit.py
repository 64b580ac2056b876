"""Torch callbacks for implicit and IMEX integrators in PETSc's IFunction form
F(t, y, ydot) = M ydot - f(t, y)   (M: optional constant mass matrix, identity by default).

Newton's linear systems use the IJacobian A = shift*M - df/dy as a Python-type Mat:
  mult          = shift*M x - J x        (J x by a double vjp)
  multTranspose = shift*M^T x - J^T x    (J^T x by a vjp), for the adjoint's transposed solves.
IJacobianP = dF/dtheta = -df/dtheta (multTranspose only). PETSc calls the IJacobian with any shift,
0 and negative ones included in the adjoint, and at points held in work Vecs that it changes
afterwards: every call records its shift and a copy of its point.

BlockJacobianPC is the exact Newton for batched problems whose Jacobian is block diagonal per
sample: it builds every sample's own block (batched vjps), LU-factors the blocks as a batch and
applies the inverse (or its transpose, for the adjoint) as the preconditioner.
"""
import torch

from .explicit import TorchRHS
from .guard import guarded


class TorchIFunction(TorchRHS):
    """F(t, y, ydot) = M ydot - f(t, y) and its Jacobians, for one TS."""

    def __init__(self, func, params, local_shape, module_dtype, device, mass=None):
        super().__init__(func, params, local_shape, module_dtype, device)
        self.mass = mass             # [d, d] per sample (state [batch, d]) or None
        self.shift = 0.0
        self._point = None           # (t, y copy) of the last IJacobian call
        self._double = None          # (u, J^T u) graph for jvps by double vjp
        self.point_version = 0       # changes with every new point (for factorisation caches)
        self.step_attempt, self.newton_iteration = None, 0
        self._step_epoch = 0         # counts step boundaries (Integrator's pre- and post-step)
        self.counts.update(jvp=0, blocks=0)

    def release(self):
        super().release()
        self._point = self._double = None

    # ---------------------------------------------------------------- helpers
    def _apply_mass(self, x, transpose=False):
        if self.mass is None:
            return x
        m = self.mass.to(x)
        return x @ m if transpose else x @ m.T

    def _set_point(self, t, X):
        self._point = (t, self.view(X).to(self.dtype, copy=True))
        self._lin_t = t
        self.point_version += 1
        self._lin = None             # the graphs for vjps and jvps are built when first needed
        self._double = None

    def _ensure_graph(self):
        """The torch graph of f at the recorded point (for vjps)."""
        if self._lin is None and self._point is not None:
            t, y = self._point
            y = y.detach().requires_grad_(True)
            with torch.enable_grad():
                self._lin = (y, self._evaluate(t, y))
        return self._lin

    def new_step(self):
        """A step begins or ends: no Jacobian blocks are reused across it (BlockJacobianPC)."""
        self._step_epoch += 1

    # ---------------------------------------------------------------- TS callbacks
    def ifunction(self, ts, t, X, Xdot, F):
        """IFunction: F = M Xdot - f(t, X)."""
        out = self.view(F, mode="w")
        self.counts["rhs"] += 1
        with guarded(self, self._in_func(t)) as call:
            with torch.no_grad():
                f = self._evaluate(t, self.view(X).to(self.dtype))
                out.copy_(self._apply_mass(self.view(Xdot)) - f)
            # Only noted: Newton may recover (a smaller step); if the solve fails, the note
            # says where the NaN came from.
            self._finite(f, "func", t)
        if call.failed:
            out.fill_(float("nan"))
        F.stateIncrease()

    def ijacobian(self, ts, t, X, Xdot, shift, A, P):
        """IJacobian: remember the shift and the point; products are computed on demand. Also
        which step attempt (its start and size) and which Newton iteration asked (for
        BlockJacobianPC's reuse of blocks within a step)."""
        self.shift = shift
        self.step_attempt = (self._step_epoch, ts.getTime(), ts.getTimeStep())
        self.newton_iteration = ts.getSNES().getIterationNumber()
        self.counts["linearize"] += 1
        with guarded(self, lambda: f"func during a Jacobian evaluation at t={t:g}") as call:
            self._set_point(t, X)
        if call.failed:
            self._point = None
        self._cached_param_vjp = None

    def ijacobian_params(self, ts, t, X, Xdot, shift, Jp):
        """IJacobianP: the parameter products are taken at (t, X) (the shift does not enter)."""
        point = self._point
        if point is None or point[0] != t or not torch.equal(point[1], self.view(X).to(self.dtype)):
            self._set_point(t, X)
            self._cached_param_vjp = None

    # ---------------------------------------------------------------- products
    def _jvp_graph(self):
        """(u, J^T u) with a graph in u, at the recorded point: then J v = d(J^T u)/du^T v is one
        backward pass. Measured 3x faster than forward-mode AD (torch.func.jvp) for an MLP
        32-128-32 on a batch of 256, because f's graph is built once per linearisation."""
        if self._double is None:
            y, out = self._ensure_graph()
            if not out.requires_grad:        # f does not depend on y: J = 0
                self._double = (None, None)
                return self._double
            u = torch.zeros_like(out, requires_grad=True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(out, y, u, create_graph=True, allow_unused=True)
            self._double = (u, g)
        return self._double

    def jvp(self, v):
        """J v at the recorded point (double vjp; forward-mode AD if f has no double backward)."""
        self.counts["jvp"] += 1
        u, g = self._jvp_graph()
        if g is None:
            return torch.zeros_like(v)
        if g.requires_grad:
            try:
                jv = torch.autograd.grad(g, u, v, retain_graph=True, allow_unused=True)[0]
                return torch.zeros_like(v) if jv is None else jv
            except RuntimeError:      # an op without double backward
                pass
        t, y = self._point
        time = self._time(t)
        return torch.func.jvp(lambda z: self.func(time, z), (y,), (v,))[1]

    def mult(self, x, out_vec):
        """out = (shift*M - J) x."""
        out = self.view(out_vec, mode="w")
        with guarded(self, "func during a Jacobian-vector product") as call:
            v = self.view(x).to(self.dtype)
            jv = self.jvp(v)
            self._finite(jv, "a Jacobian-vector product of func", self._point[0])
            out.copy_(jv).neg_().add_(self._apply_mass(v), alpha=self.shift)
        if call.failed:
            out.fill_(float("nan"))
        out_vec.stateIncrease()

    def mult_transpose(self, x, out_vec):
        """out = (shift*M - J)^T x; the parameter part -(df/dtheta)^T x is kept for Jp."""
        out = self.view(out_vec, mode="w")
        lin = None
        with guarded(self, "func during a Jacobian evaluation"):
            lin = self._ensure_graph()
        grads = self._vjp(x, with_state=True) if lin is not None else None
        if grads is None:
            out.fill_(float("nan"))
        else:
            v = self.view(x).to(self.dtype)
            gy = grads[0] if grads[0] is not None else torch.zeros_like(v)
            out.copy_(gy).neg_().add_(self._apply_mass(v, transpose=True), alpha=self.shift)
            self._cached_param_vjp = ((x.handle, x.stateGet()), grads[1:])
        out_vec.stateIncrease()

    def vjp_params(self, x, y):
        """y = (dF/dtheta)^T x = -(df/dtheta)^T x."""
        with guarded(self, "func during a Jacobian evaluation"):
            self._ensure_graph()
        super().vjp_params(x, y)
        self.view(y, self.nparams, mode="rw").neg_()

    def sample_blocks(self):
        """Each sample's Jacobian block of f at the recorded point: [batch, d, d] with d the
        size of one sample. Because the Jacobian is block diagonal over samples, a vjp with the
        k-th unit vector repeated in every sample gives row k of every block at once: d vjps of
        the point's graph, batched into one backward pass (is_grads_batched). Measured 2-14x
        faster than d forward-mode products (vmap of torch.func.jvp) from d = 3 to 128: torch's
        forward-mode AD runs elementwise ops with unbatched operands as Python decompositions."""
        y, out = self._ensure_graph()
        batch, d = y.shape[0], y[0].numel()
        self.counts["blocks"] += 1
        rows = None
        if out.requires_grad:
            basis = torch.eye(d, dtype=out.dtype, device=out.device)
            basis = basis.reshape((d, 1) + out.shape[1:]).expand((d,) + out.shape)
            try:
                (rows,) = torch.autograd.grad(out, y, basis, retain_graph=True,
                                              allow_unused=True, is_grads_batched=True)
            except (RuntimeError, NotImplementedError):  # vmap cannot batch func's graph
                rows = [torch.autograd.grad(out, y, e, retain_graph=True, allow_unused=True)[0]
                        for e in basis]
                rows = None if rows[0] is None else torch.stack(rows)
        if rows is None:                      # f does not depend on y
            return torch.zeros((batch, d, d), dtype=y.dtype, device=y.device)
        return rows.reshape(d, batch, d).transpose(0, 1)

    def check_block_diagonal(self, blocks):
        """One jvp with a random vector: J v must equal the block-diagonal product, or func
        couples samples (batch norm, attention over the batch...) and the exact Newton is wrong."""
        t, y = self._point
        v = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(0))
        v = v.to(y.device)
        full = self.jvp(v).reshape(y.shape[0], -1).to(torch.float64)
        by_blocks = (blocks @ v.reshape(y.shape[0], -1, 1).to(torch.float64)).squeeze(-1)
        scale = full.abs().max().item() + by_blocks.abs().max().item() + 1e-300
        tolerance = max(1e-8, 1e3 * torch.finfo(y.dtype).eps)   # float32: 1.2e-4
        if (full - by_blocks).abs().max().item() > tolerance * scale:
            raise ValueError("func couples the samples of the batch (its Jacobian is not block "
                             "diagonal per sample), so linear_solver='exact' does not apply: use "
                             "linear_solver='gmres'")


class IJacobianMat:
    """Python Mat context for the IJacobian A = shift*M - df/dy."""

    def __init__(self, ifun):
        self.ifun = ifun

    def mult(self, mat, x, y):
        self.ifun.mult(x, y)

    def multTranspose(self, mat, x, y):  # noqa: N802
        self.ifun.mult_transpose(x, y)


class IJacobianPMat:
    """Python Mat context for IJacobianP = -df/dtheta (transposed products only)."""

    def __init__(self, ifun):
        self.ifun = ifun

    def multTranspose(self, mat, x, y):  # noqa: N802
        self.ifun.vjp_params(x, y)


class BlockJacobianPC:
    """Python PC context: exact inverse of the block-diagonal IJacobian, one LU per sample.

    Newton's first direction of every stage after the first in a step attempt (same step,
    start and size) reuses the blocks of df/dy of that attempt's last build (the previous
    stage's last iterate: a simplified Newton step, the residual is exact); every later
    iteration builds them at its own point, so Newton still ends quadratically and converges
    as far as with fresh blocks throughout. Reusing them for more iterations was measured:
    Newton then stops at its tolerance with 1e-9..1e-7 relative stage errors instead of 1e-12,
    too far from the round-off the gradients' exactness needs. The LU is redone only when the
    blocks or the shift change. The rule depends only on the step's own iterates, so a re-run step repeats
    them bitwise. The adjoint's transposed solves always use the blocks at the point PETSc
    gives (exact gradients)."""

    FRESH_FROM_ITERATION = 1

    def __init__(self, ifun):
        self.ifun = ifun
        self._lu = None              # (blocks id, shift, LU factors)
        self._jac = None             # (point_version, step attempt, blocks of df/dy)
        self._checked = False

    def _blocks(self, adjoint):
        """The blocks of df/dy to factor: the ones at the current point, or (forward Newton)
        the step attempt's while they may be reused."""
        ifun = self.ifun
        if self._jac is not None:
            version, attempt, _ = self._jac
            if version == ifun.point_version:
                return self._jac
            if (not adjoint and attempt == ifun.step_attempt
                    and ifun.newton_iteration < self.FRESH_FROM_ITERATION):
                return self._jac
        self._jac = (ifun.point_version, None if adjoint else ifun.step_attempt,
                     ifun.sample_blocks().to(torch.float64))
        if not self._checked:
            ifun.check_block_diagonal(self._jac[2])
            self._checked = True
        return self._jac

    def _factors(self, adjoint):
        ifun = self.ifun
        jac = self._blocks(adjoint)
        if self._lu is None or self._lu[0] is not jac or self._lu[1] != ifun.shift:
            blocks = -jac[2]
            d = blocks.shape[-1]
            mass = (torch.eye(d, dtype=blocks.dtype, device=blocks.device) if ifun.mass is None
                    else ifun.mass.to(blocks))
            blocks += ifun.shift * mass
            self._lu = (jac, ifun.shift, torch.linalg.lu_factor(blocks))
        return self._lu[2]

    def _solve(self, x, y, adjoint):
        ifun = self.ifun
        out = ifun.view(y, mode="w")
        with guarded(ifun, "func during the exact block solve") as call:
            lu, piv = self._factors(adjoint)
            rhs = ifun.view(x).reshape(lu.shape[0], -1, 1).to(lu.dtype)
            sol = torch.linalg.lu_solve(lu, piv, rhs, adjoint=adjoint)
            out.copy_(sol.reshape(out.shape))
        if call.failed:
            out.fill_(float("nan"))
        y.stateIncrease()

    def apply(self, pc, x, y):
        self._solve(x, y, adjoint=False)

    def applyTranspose(self, pc, x, y):  # noqa: N802
        self._solve(x, y, adjoint=True)
