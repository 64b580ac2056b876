"""Data for the continuous normalizing flow, all available offline.

2-D toy densities (sampled on the fly from torch's generator, so each rank draws its own batch
and the training state's RNG states make a resumed run draw the same points):
  8gaussians    eight Gaussians of std 0.2 centred on a circle of radius 2
  checkerboard  uniform on the black squares of a 4x4 board over [-2, 2]^2
  moons         two interleaved half circles with Gaussian noise
  pinwheel      five curved arms (a radial Gaussian bent by an angle growing with the radius)

For 8gaussians and checkerboard, true_log_density gives log p(x) in closed form and
true_entropy the entropy (the best NLL any model can reach) by Monte Carlo.

Tabular stand-in for FFJORD's tables (POWER, GAS, HEPMASS, MINIBOONE, BSDS300 need downloads):
  breast-cancer scikit-learn's bundled Wisconsin diagnostic breast-cancer table: 569 rows of 30
                continuous measurements, the largest real-valued table that ships with
                scikit-learn. Log-transformed (the measurements are positive and skewed), then
                standardised with the training split's mean and std, as FFJORD preprocesses its
                tables; 80/20 train/test split.

Images, as FFJORD and RealNVP model them (class DequantizedImages):
  digits        scikit-learn's bundled 8x8 handwritten digits: 1797 images of 64 pixels with 17
                grey levels 0..16, the classifier's 80/20 split (apps/datasets.py). Dequantised
                with fresh uniform noise, y = (x + u) / 17 in (0, 1)^64, then z = logit(alpha +
                (1 - 2 alpha) y), then an affine map fitted on the training split (whitening by
                the maximum-likelihood full-covariance Gaussian of z, or per-pixel
                standardisation). Every Jacobian is accounted for, so -log p(y) + 64 log 17 is a
                variational upper bound on -log P(x) of the discrete image, reported in bits/dim
                (divided by 64 log 2). The full-covariance Gaussian in z-space is the baseline.
"""
import math

import numpy as np
import torch

TOY = ("8gaussians", "checkerboard", "moons", "pinwheel")
TABULAR = ("breast-cancer",)
IMAGES = ("digits",)
NAMES = TOY + TABULAR + IMAGES


def sample_toy(name, n, generator=None, dtype=torch.float64):
    """n points [n, 2] from the 2-D density `name`."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=dtype)

    if name == "8gaussians":
        angle = torch.randint(0, 8, (n,), generator=generator).to(dtype) * (math.pi / 4)
        centres = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return centres + 0.2 * randn(n, 2)
    if name == "checkerboard":
        x1 = 4.0 * rand(n) - 2.0
        column = torch.floor(x1 + 2.0)                        # 0..3
        row = 2.0 * torch.randint(0, 2, (n,), generator=generator).to(dtype)
        x2 = rand(n) + row + (column % 2) - 2.0                # black squares only
        return torch.stack([x1, x2], dim=1)
    if name == "moons":
        upper = torch.randint(0, 2, (n,), generator=generator).to(dtype)
        angle = math.pi * rand(n)
        x = torch.where(upper > 0, torch.cos(angle), 1.0 - torch.cos(angle))
        y = torch.where(upper > 0, torch.sin(angle), 0.5 - torch.sin(angle))
        pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.6
        return pts + 0.08 * randn(n, 2)
    if name == "pinwheel":
        arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
        arm = torch.randint(0, arms, (n,), generator=generator).to(dtype)
        r = randn(n) * radial_std + 1.0
        tangential = randn(n) * tangential_std
        angle = arm * (2 * math.pi / arms) + rate * torch.exp(r)
        c, s = torch.cos(angle), torch.sin(angle)
        return 2.0 * torch.stack([c * r - s * tangential, s * r + c * tangential], dim=1)
    raise ValueError(f"unknown 2-D density {name!r}: choose one of {', '.join(TOY)}")


def true_log_density(name, x):
    """log p(x) [n] of the 2-D density `name` where it has a closed form (8gaussians,
    checkerboard), else None."""
    if name == "8gaussians":
        angle = torch.arange(8, dtype=x.dtype) * (math.pi / 4)
        centres = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        sq = ((x[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * 0.2 ** 2)
        return torch.logsumexp(-sq, dim=1) - math.log(8 * 2 * math.pi * 0.2 ** 2)
    if name == "checkerboard":
        column, row = torch.floor(x[:, 0] + 2.0), torch.floor(x[:, 1] + 2.0)
        inside = (x.abs() <= 2.0).all(dim=1) & (column % 2 == row % 2)
        return torch.where(inside, -math.log(8.0), -math.inf)
    return None


def true_entropy(name, n=1_000_000, seed=12345):
    """The density's entropy E[-log p(x)] (the best possible NLL) by Monte Carlo with n samples,
    and its standard error; None where log p has no closed form."""
    x = sample_toy(name, n, torch.Generator().manual_seed(seed))
    logp = true_log_density(name, x)
    if logp is None:
        return None
    return float(-logp.mean()), float(logp.std() / math.sqrt(n))


def load_tabular(name, seed=0, dtype=torch.float64):
    """(train [N, D], test [M, D]) of the table `name`, preprocessed as described above."""
    if name != "breast-cancer":
        raise ValueError(f"unknown table {name!r}: choose one of {', '.join(TABULAR)}")
    from sklearn.datasets import load_breast_cancer
    x = np.log(load_breast_cancer().data + 1e-3)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(0.2 * len(x)))
    train, test = x[perm[n_test:]], x[perm[:n_test]]
    mean, std = train.mean(0), train.std(0)
    return (torch.as_tensor((train - mean) / std, dtype=dtype),
            torch.as_tensor((test - mean) / std, dtype=dtype))


def logit_transform(y, alpha):
    """z = logit(alpha + (1 - 2 alpha) y) elementwise and log|det dz/dy| summed over the last
    dimension (the Jacobian is diagonal: (1 - 2 alpha) / (s (1 - s)) with s = alpha + ...)."""
    s = alpha + (1 - 2 * alpha) * y
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    return log_s - log_1ms, (math.log1p(-2 * alpha) - log_s - log_1ms).sum(-1)


def gaussian_log_density(z, mean, chol):
    """log N(z; mean, chol chol^T) per row of z [..., D]."""
    w = torch.linalg.solve_triangular(chol, (z - mean).reshape(-1, z.shape[-1]).T, upper=False).T
    return (-0.5 * (w ** 2).sum(-1) - torch.log(torch.diagonal(chol)).sum()
            - 0.5 * z.shape[-1] * math.log(2 * math.pi)).reshape(z.shape[:-1])


class DequantizedImages:
    """Integer images as continuous data (see the module docstring): the training and held-out
    pixels [N, D] (float, integer levels), the dequantisation, the logit transform, the affine
    map into the flow's space, and the full-covariance Gaussian baseline, all with their exact
    log-Jacobians.

    whiten: the flow sees v = L^-1 (z - m) with m, L L^T the Gaussian's mean and covariance (an
    untrained identity flow is then exactly the Gaussian baseline); otherwise v = (z - m) / s
    with the per-pixel standard deviations s. The Gaussian is fitted by maximum likelihood to
    fit_draws dequantisations of every training image (a fixed generator)."""

    def __init__(self, name="digits", seed=0, alpha=0.05, whiten=True, fit_draws=8,
                 dtype=torch.float64):
        if name != "digits":
            raise ValueError(f"unknown image data {name!r}: choose one of {', '.join(IMAGES)}")
        import datasets
        (train, _), (test, _) = datasets.load(name, seed)
        self.levels, self.alpha, self.whiten = 17, alpha, whiten
        self.train = torch.round(train.reshape(len(train), -1).to(dtype) * 16)
        self.test = torch.round(test.reshape(len(test), -1).to(dtype) * 16)
        self.dim = self.train.shape[1]
        gen = torch.Generator().manual_seed(seed + 20_000)
        z, _ = logit_transform(self.dequantize(self.train.repeat(fit_draws, 1), gen), alpha)
        self.mean = z.mean(0)
        centred = z - self.mean
        self.chol = torch.linalg.cholesky(centred.T @ centred / len(z))
        self.scale = self.chol if whiten else torch.diag(centred.std(0, unbiased=False))

    def dequantize(self, x, generator=None):
        """y = (x + u) / levels with u ~ U[0, 1)^D, fresh on every call."""
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        return (x + u) / self.levels

    def flow_input(self, y):
        """(v, log|det dv/dy|) per row: what the flow models, and the Jacobian that turns its
        log-density into one of y."""
        z, logdet = logit_transform(y, self.alpha)
        v = torch.linalg.solve_triangular(self.scale, (z - self.mean).reshape(-1, self.dim).T,
                                          upper=False).T.reshape(z.shape)
        return v, logdet - torch.log(torch.diagonal(self.scale)).sum()

    def gaussian_log_prob(self, y):
        """log p(y) per row under the full-covariance Gaussian of z = logit(...)."""
        z, logdet = logit_transform(y, self.alpha)
        return gaussian_log_density(z, self.mean, self.chol) + logdet

    def sample(self, n):
        """n training images drawn with replacement, freshly dequantised (torch's global RNG):
        (v [n, D], log|det dv/dy| [n])."""
        return self.flow_input(self.dequantize(self.train[torch.randint(0, len(self.train),
                                                                        (n,))]))

    def held_out(self, draws, seed):
        """The held-out images dequantised `draws` times each, [M, draws, D] (a fixed seed, so
        every evaluation and the baseline see the same points)."""
        gen = torch.Generator().manual_seed(seed)
        return self.dequantize(self.test[:, None, :].expand(-1, draws, -1).contiguous(), gen)

    def nll_nats(self, log_p_y):
        """The bound on -log P(x) (nats per image) from log p(y): -log p(y) + D log levels."""
        return -log_p_y + self.dim * math.log(self.levels)

    def bits_per_dim(self, log_p_y):
        return self.nll_nats(log_p_y) / (self.dim * math.log(2))
