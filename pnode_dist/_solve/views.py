"""Zero-copy torch views of PETSc Vecs, host or CUDA. A view of a CUDA Vec is a torch tensor on
the GPU over the Vec's device memory; `touch` tells PETSc, at each use, which copy (device or
host) is read or written, so that its own operations see our writes.
"""
import warnings

import torch

from .device import SOLVER_ITEMSIZE

_TYPESTR = {4: "<f4", 8: "<f8"}


class _DeviceArray:
    """A CUDA Vec's device memory as a __cuda_array_interface__ (torch wraps it, no copy)."""

    def __init__(self, pointer, size, itemsize):
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": _TYPESTR[itemsize],
                                         "data": (pointer, False), "version": 3}


def is_cuda_vec(vec):
    return vec.getType().endswith("cuda")


def _device_pointer(vec, mode):
    """A CUDA Vec's device pointer, PETSc's offload state updated for access `mode`."""
    pointer = vec.getCUDAHandle(mode)
    vec.restoreCUDAHandle(pointer, mode)
    return pointer


def touch(vec, mode):
    """Before torch reads ('r') or writes ('w', 'rw') a CUDA Vec's device memory through a view:
    bring the device copy up to date, or mark it as the valid one. A no-op for host Vecs."""
    if is_cuda_vec(vec):
        _device_pointer(vec, mode)


def vec_view(vec, shape, mode="rw"):
    """A torch tensor sharing the memory of `vec`'s local part (no copy), shaped `shape`: host
    memory, or device memory for a CUDA Vec. With mode 'r' (for Vecs PETSc has locked), the
    tensor must not be written."""
    if is_cuda_vec(vec):
        array = _DeviceArray(_device_pointer(vec, mode), vec.getLocalSize(), SOLVER_ITEMSIZE)
        return torch.as_tensor(array, device="cuda").view(shape)
    with warnings.catch_warnings():      # torch's note that a read-only array is shared: known
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(vec.getArray(readonly=mode == "r")).view(shape)
