"""A state that is a field on a structured 1-D/2-D/3-D grid, split over ranks by a PETSc DMDA
(:class:`Grid`): each rank holds a patch, ``func`` is written for whole fields and evaluated on
each patch plus a halo of its neighbours' cells, and gradients equal the one-rank ones.
"""
import math
import time
import weakref

import torch
from torch import nn

from ._distributed.collective import MPI, PETSc, raise_collectively, resolve_comm
from ._distributed.layout import Layout
from ._solve.lifetime import at_finalize
from .errors import InputError


class Grid:
    """A field on a structured 1-D/2-D/3-D grid split over ranks by a PETSc DMDA (collective).

    Pass it as ``grid=`` to :func:`pnode_dist.odeint` (or :class:`pnode_dist.ODEBlock`) when one
    sample is too large for one rank: ``y0`` is then this rank's patch (:meth:`scatter`) and
    ``func`` is written for whole fields. The DMDA has ``channels`` values per cell (times
    ``batch`` if given), ``halo`` ghost cells per side (box stencil), periodic or not per
    dimension, on the ranks of ``comm``.

    Parameters
    ----------
    shape : sequence of int
        The grid's cells per dimension, torch order (z, y, x), 1 to 3 dimensions.
    channels : int
        Values per cell.
    batch : int, optional
        A batch kept whole on every rank: fields are then ``[B, C, *spatial]`` instead of
        ``[C, *spatial]``.
    periodic : bool or sequence of bool, optional
        Periodic boundaries, for all dimensions or one flag per dimension (default False).
    halo : int, optional
        Ghost cells per side (default 1): must cover func's receptive field (two 3x3
        convolutions: 2), checked on first use.
    comm : optional
        The ranks of the grid (default PETSc's world).
    proc_sizes : sequence of int, optional
        Ranks per dimension (torch order); by default the most even split, with the most parts
        along the longest dimensions.
    gradient_comm : optional
        To split the batch too, make one Grid per group of ranks (``comm`` = the group,
        ``batch`` = the group's share) and pass ``gradient_comm`` = all the groups' ranks:
        parameter gradients are then summed over every rank, still in one allreduce.

    Attributes
    ----------
    local_shape : tuple of int
        The torch shape of this rank's patch (``[B?, C, *local]``).
    global_shape : tuple of int
        The torch shape of the whole field (``[B?, C, *shape]``).
    local_start : tuple of int
        Where this rank's patch starts in the field (spatial dims).
    stats : dict
        This rank's halo traffic: ``exchanges``, ``adds`` (their adjoints) and
        ``halo_seconds`` spent in both.

    Raises
    ------
    InputError
        On every rank, if the arguments are bad on any rank or differ between ranks: a shape
        of other than 1 to 3 positive sizes, a negative or non-integer halo, a periodic flag
        count that differs from the dimensions, proc_sizes that do not multiply to the ranks,
        or patches narrower than the halo (use fewer ranks, other proc_sizes or a larger grid).
        From odeint: a func whose receptive field exceeds the halo (the message names the
        right value), a patch of the wrong shape, a GPU state (grids keep their fields in host
        memory in this version), an implicit method with ``linear_solver='exact'`` or a mass
        matrix (grids use the matrix-free GMRES Newton), or ``method='arkimex'``.

    Notes
    -----
    Each rank evaluates ``func`` on its patch plus ``halo`` cells of its neighbours' data (a
    DMDA global-to-local scatter; zeros beyond a non-periodic boundary, the wrapped-around data
    across a periodic one) and keeps the interior of the result. When every output cell depends
    on inputs at most ``halo`` cells away (func's receptive field, checked on first use), this
    is on any number of ranks what it is on one: func on the field extended by ``halo`` cells
    (zeros, or wrapped-around values), interior kept. For a periodic grid and a func with
    circular padding that is func on the field itself; for a non-periodic grid it equals func
    with zero padding only when func pads once (one stencil layer): deeper funcs see their own
    hidden values beyond the edge, not zeros. The adjoint of the exchange is the reverse scatter
    with addition, so gradients with respect to the field and to func's (shared) parameters
    equal the one-rank gradients.

    Torch shapes: fields are ``[C, *spatial]`` or ``[B, C, *spatial]`` (the batch kept whole
    on every rank); spatial dimensions in torch order (z, y, x). The PETSc Vec stores a patch
    as ``(*spatial, B*C)`` with the B*C values of one cell contiguous (DMDA's interleaved degrees of
    freedom); the solver sees that "vec order", and odeint converts at entry and exit.

    Examples
    --------
    ::

        grid = Grid((256, 256), channels=2, periodic=True, halo=2)    # collective
        patch = grid.scatter(field)        # this rank's [2, h, w] part of [2, 256, 256]
        ys = odeint(func, patch, t, method="rk4", options={"step_size": 0.05}, grid=grid)
        whole = grid.gather(ys[-1])        # the full field on rank 0
        padded = grid.with_halo(ys[-1])    # patch plus neighbours' halo (differentiable)
    """

    def __init__(self, shape, channels, *, batch=None, periodic=False, halo=1, comm=None,
                 proc_sizes=None, gradient_comm=None):
        self.comm = resolve_comm(comm)
        self.gradient_comm = resolve_comm(gradient_comm) if gradient_comm is not None else None
        error = None
        try:                         # checked on every rank, then agreed on (no hang in DMDA)
            shape = tuple(int(n) for n in shape)
            if not 1 <= len(shape) <= 3 or min(shape) < 1:
                raise InputError(f"grid shape must have 1 to 3 positive sizes; got {shape}")
            if not isinstance(halo, int) or halo < 0:
                raise InputError(f"halo must be a non-negative integer (cells per side); got "
                                 f"{halo!r}")
            periodic = (periodic,) * len(shape) if isinstance(periodic, bool) else tuple(periodic)
            if len(periodic) != len(shape):
                raise InputError(f"periodic needs one flag per grid dimension ({len(shape)}); "
                                 f"got {periodic}")
            self.shape, self.channels, self.batch = shape, int(channels), batch
            self.halo, self.periodic, self.ndim = halo, periodic, len(shape)
            self.proc_sizes = self._split(proc_sizes)
        except (InputError, TypeError, ValueError) as exc:
            error = str(exc)
        raise_collectively(self.comm, error, InputError,
                           same={"the grid (shape, channels, batch, periodic, halo, proc_sizes)":
                                 repr((shape, channels, batch, periodic, halo, proc_sizes))})
        self.dof = self.channels * (batch or 1)
        bt = [PETSc.DM.BoundaryType.PERIODIC if p else PETSc.DM.BoundaryType.GHOSTED
              for p in periodic]
        self.da = PETSc.DMDA().create(dim=self.ndim, dof=self.dof, sizes=shape[::-1],
                                      boundary_type=tuple(bt[::-1]),
                                      stencil_type=PETSc.DMDA.StencilType.BOX,
                                      stencil_width=halo, proc_sizes=self.proc_sizes[::-1],
                                      comm=self.comm, setup=True)
        starts, sizes = self.da.getCorners()
        self.local_start = tuple(starts[::-1])[:self.ndim]
        self.local_spatial = tuple(sizes[::-1])[:self.ndim]
        self.ghost_spatial = tuple(n + 2 * halo for n in self.local_spatial)
        lead = (self.channels,) if batch is None else (batch, self.channels)
        self.local_shape = lead + self.local_spatial           # torch shape of this rank's patch
        self.global_shape = lead + self.shape
        self.vec_shape = self.local_spatial + (self.dof,)      # the solver's view of the patch
        self.layout = GridLayout(self)
        self._gvec = self.da.createGlobalVec()
        self._lvec = self.da.createLocalVec()
        self._wrapped = {}
        self._checked = set()
        # halo traffic of this rank: exchanges (forward scatters), adds (their adjoints), and
        # the seconds spent in both
        self.stats = dict.fromkeys(("exchanges", "adds", "halo_seconds"), 0)
        _live.add(self)

    def _split(self, proc_sizes):
        """Ranks per grid dimension (torch order): given, or the most even factorisation with
        the most parts along the longest dimensions. Every patch must be at least `halo` cells
        wide (a halo must not reach past the nearest neighbour)."""
        nranks = self.comm.getSize()
        if proc_sizes is None:
            factors = sorted(MPI.Compute_dims(nranks, self.ndim), reverse=True)
            order = sorted(range(self.ndim), key=lambda d: -self.shape[d])
            proc_sizes = [1] * self.ndim
            for d, f in zip(order, factors):
                proc_sizes[d] = f
        proc_sizes = tuple(int(p) for p in proc_sizes)
        if len(proc_sizes) != self.ndim or math.prod(proc_sizes) != nranks:
            raise InputError(f"proc_sizes {proc_sizes} must have one entry per grid dimension "
                             f"and multiply to the {nranks} ranks")
        for n, p in zip(self.shape, proc_sizes):
            if n // p < max(self.halo, 1):
                raise InputError(f"splitting {n} cells over {p} ranks gives patches of "
                                 f"{n // p} cells, narrower than halo={self.halo}: use fewer "
                                 "ranks, other proc_sizes or a larger grid")
        return proc_sizes

    def destroy(self):
        """Free the DMDA and its work Vecs.

        Also done for every live Grid at exit, before PETSc finalizes; the grid is unusable
        afterwards.
        """
        for obj in (self._gvec, self._lvec, self.da):
            obj.destroy()
        _live.discard(self)

    # -------------------------------------------------------------- fields <-> patches
    def patch_slices(self):
        """This rank's index ranges into a global field (torch order, spatial dims only).

        Returns
        -------
        tuple of slice
            One slice per spatial dimension: ``field[(Ellipsis,) + grid.patch_slices()]``
            is this rank's patch.
        """
        return tuple(slice(s, s + n) for s, n in zip(self.local_start, self.local_spatial))

    def scatter(self, field):
        """This rank's patch of a whole field every rank holds (a view).

        Parameters
        ----------
        field : Tensor
            The whole field, shape :attr:`global_shape` (``[B?, C, *shape]``).

        Returns
        -------
        Tensor
            This rank's part, shape :attr:`local_shape`: the ``y0`` of a grid solve.

        Raises
        ------
        InputError
            If ``field`` does not have the grid's global shape.
        """
        if tuple(field.shape) != self.global_shape:
            raise InputError(f"field must have the grid's global shape {self.global_shape}; got "
                             f"{tuple(field.shape)}")
        lead = (slice(None),) * (field.dim() - self.ndim)
        return field[lead + self.patch_slices()]

    def gather(self, patch, root=0):
        """The whole field on ``root`` (None elsewhere), for plots and checks; collective.

        Parameters
        ----------
        patch : Tensor
            This rank's patch (``[B?, C, *local]``, or with more leading dimensions such as
            output times: ``ys`` or ``ys[-1]``); detached and copied to the host.
        root : int, optional
            The rank that receives the field.

        Returns
        -------
        Tensor or None
            On ``root``, the field ``[..., *shape]`` in the patch's dtype (not differentiable);
            None on the other ranks.
        """
        mpi = self.comm.tompi4py()
        parts = mpi.gather((self.patch_slices(), patch.detach().cpu()), root=root)
        if mpi.Get_rank() != root:
            return None
        field = torch.empty(patch.shape[:patch.dim() - self.ndim] + self.shape, dtype=patch.dtype)
        lead = (slice(None),) * (patch.dim() - self.ndim)
        for slices, part in parts:
            field[lead + slices] = part
        return field

    def to_vec_order(self, field):
        """``[B?, C, *local]`` -> ``(*local, B*C)``, differentiable (a permuted copy)."""
        lead = field.dim() - self.ndim
        perm = tuple(range(lead, field.dim())) + tuple(range(lead))
        return field.permute(perm).reshape(self.vec_shape_of(field.shape[lead:]))

    def vec_shape_of(self, spatial):
        return tuple(spatial) + (self.dof,)

    def from_vec_order(self, v, spatial=None):
        """``(..., *spatial, B*C)`` -> ``(..., [B,] C, *spatial)``: the inverse of to_vec_order,
        with any leading dimensions (such as output times) kept in front."""
        spatial = tuple(spatial or self.local_spatial)
        front = v.dim() - self.ndim - 1
        lead = (self.channels,) if self.batch is None else (self.batch, self.channels)
        v = v.reshape(v.shape[:front] + spatial + lead)
        k = len(lead)
        perm = (tuple(range(front)) + tuple(range(front + self.ndim, front + self.ndim + k))
                + tuple(range(front, front + self.ndim)))
        return v.permute(perm)

    def with_halo(self, patch):
        """This rank's patch extended by ``halo`` cells of its neighbours' values per side.

        Differentiable and collective (call it on every rank). For losses that read
        neighbouring cells, such as finite differences of a field across patch edges.

        Parameters
        ----------
        patch : Tensor
            This rank's patch, shape :attr:`local_shape` (``[B?, C, *local]``).

        Returns
        -------
        Tensor
            ``[B?, C, *(local + 2 halo)]``: zeros beyond a non-periodic boundary, the
            wrapped-around values across a periodic one.

        Raises
        ------
        InputError
            If ``patch`` does not have this rank's shape (on that rank).
        """
        if tuple(patch.shape) != self.local_shape:
            raise InputError(f"patch must have this rank's shape {self.local_shape}; got "
                             f"{tuple(patch.shape)}")
        padded = HaloExchange.apply(self, self.to_vec_order(patch))
        return self.from_vec_order(padded, self.ghost_spatial)

    # -------------------------------------------------------------- func on patches
    def wrap(self, func):
        """The module the solver evaluates: func on patch + halo, interior kept (cached)."""
        entry = self._wrapped.get(id(func))
        if entry is None:
            entry = PatchFunc(func, self)
            self._wrapped[id(func)] = entry
        return entry

    def check_receptive_field(self, func, dtype):
        """InputError (the same on every rank: purely local) if func's output at a cell depends
        on inputs more than `halo` cells away, probed by the gradient of one output cell."""
        if id(func) in self._checked:
            return
        reach = self.halo + 2
        n = 2 * reach + 1
        lead = (self.channels,) if self.batch is None else (1, self.channels)
        gen = torch.Generator().manual_seed(0)
        x = (0.5 * torch.randn(lead + (n,) * self.ndim, generator=gen, dtype=torch.float64))
        x = x.to(dtype).requires_grad_(True)
        with torch.enable_grad():
            out = func(torch.zeros((), dtype=dtype), x)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                return            # the solver reports a wrongly shaped output itself
            centre = (Ellipsis,) + (reach,) * self.ndim
            (grad,) = torch.autograd.grad(out[centre].sum(), x, allow_unused=True)
        if grad is not None:
            support = grad.abs().sum(dim=tuple(range(len(lead)))).nonzero()
            radius = int((support - reach).abs().max()) if len(support) else 0
            if radius > self.halo:
                more = "or more " if radius >= reach else ""
                raise InputError(f"func reads cells {radius} {more}cells away but the grid's "
                                 f"halo is {self.halo}: create the Grid with halo={radius} "
                                 "(the receptive-field radius of func)")
        self._checked.add(id(func))


_live = weakref.WeakSet()


@at_finalize
def _destroy_live_grids():
    """Grids still alive at exit (lifetime.py's rule 2)."""
    for grid in list(_live):
        grid.destroy()


class PatchFunc(nn.Module):
    """f on a patch in vec order: halo exchange, func on the padded field, interior kept."""

    def __init__(self, func, grid):
        super().__init__()
        self.func, self.grid = func, grid

    def forward(self, t, y):
        g = self.grid
        padded = HaloExchange.apply(g, y)
        out = self.func(t, g.from_vec_order(padded, g.ghost_spatial))
        expected = g.local_shape[:-g.ndim] + g.ghost_spatial
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"func(t, y) returned {got} for a field of shape {expected}: the "
                             "right-hand side must return a tensor shaped like y")
        h = g.halo
        interior = (Ellipsis,) + tuple(slice(h, h + n) for n in g.local_spatial)
        return g.to_vec_order(out[interior])


def _array(vec, shape):
    return torch.from_numpy(vec.getArray()).view(shape)


def _transfer(grid, data, src, src_shape, dst, dst_shape, move, counter):
    """Copy `data` into Vec src, zero Vec dst, move(src, dst) (a DMDA scatter), return a copy of
    dst's values in data's dtype; counted in grid.stats."""
    t0 = time.perf_counter()
    _array(src, src_shape).copy_(data.detach())
    dst.zeroEntries()
    move(src, dst)
    out = _array(dst, dst_shape).to(data.dtype, copy=True)
    grid.stats[counter] += 1
    grid.stats["halo_seconds"] += time.perf_counter() - t0
    return out


class HaloExchange(torch.autograd.Function):
    """(*local, dof) -> (*local + 2 halo, dof): owned values plus neighbours' halo cells."""

    @staticmethod
    def forward(ctx, grid, y):
        ctx.grid = grid
        return _transfer(grid, y, grid._gvec, grid.vec_shape, grid._lvec,
                         grid.ghost_spatial + (grid.dof,), grid.da.globalToLocal, "exchanges")

    @staticmethod
    def backward(ctx, grad):
        return None, HaloAdd.apply(ctx.grid, grad)


class HaloAdd(torch.autograd.Function):
    """The adjoint of HaloExchange: each halo value is added back to the rank that owns it."""

    @staticmethod
    def forward(ctx, grid, padded):
        ctx.grid = grid

        def add(local, glob):
            grid.da.localToGlobal(local, glob, addv=PETSc.InsertMode.ADD_VALUES)
        return _transfer(grid, padded, grid._lvec, grid.ghost_spatial + (grid.dof,), grid._gvec,
                         grid.vec_shape, add, "adds")

    @staticmethod
    def backward(ctx, grad):
        return None, HaloExchange.apply(ctx.grid, grad)


class GridLayout(Layout):
    """The Layout of a DMDA-distributed field: the DMDA's global Vec, patches in vec order."""
    evaluates_collectively = True

    def __init__(self, grid):
        super().__init__(grid.comm, grid.vec_shape, grid.gradient_comm)
        self.grid = grid
        self.global_size = math.prod(grid.shape) * grid.dof
        self.global_shape = grid.global_shape
        self.all_local_shapes = tuple(tuple(s) for s in
                                      self.comm.tompi4py().allgather(self.local_shape))

    @property
    def key(self):
        return ("grid", id(self.grid))

    def create_state_vec(self):
        return self.grid.da.createGlobalVec()
