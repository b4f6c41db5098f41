"""Rank selection: energy kept, and empirical variational Bayesian matrix factorisation (EVBMF).

EVBMF is the analytic global solution of fully observed VB matrix factorisation with the prior
variances *and* the noise variance estimated from the data (Nakajima, Sugiyama, Babacan and
Tomioka, JMLR 2013, "Global analytic solution of fully-observed variational Bayesian matrix
factorization"; noise-variance estimation as in Nakajima, Tomioka, Sugiyama and Babacan, JMLR
2015, "Condition for perfect dimensionality recovery by variational Bayesian PCA"). Kim et al.
(ICLR 2016) use it to choose the Tucker-2 ranks of a convolution kernel from its mode-0 and
mode-1 unfoldings.

No maintained Python package provides EVBMF (TensorLy, scikit-learn and SciPy do not), so it is
written here from the papers' closed forms; the only numerical work is a 1-D root and a bounded
1-D minimisation, done with SciPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

__all__ = ["EVBMFResult", "evbmf", "rank_for_energy"]


def rank_for_energy(singular_values: torch.Tensor | np.ndarray, energy: float) -> int:
    """Smallest rank ``r`` whose leading singular values keep ``energy`` of the total energy.

    ``sum_{i<r} s_i^2 / sum_i s_i^2 >= energy`` with ``s`` sorted in decreasing order.

    Parameters
    ----------
    singular_values : 1-D array of singular values (any order; they are sorted).
    energy : fraction in (0, 1].

    Returns
    -------
    int
        The rank, between 1 and ``len(singular_values)``.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy={energy}: must be in (0, 1]")
    s = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64)))[::-1]  # (n,)
    if s.size == 0:
        raise ValueError("rank_for_energy: no singular values")
    e = np.cumsum(s**2)  # (n,)
    if e[-1] == 0.0:
        return 1
    # tolerance so that energy=1.0 does not ask for components lost to rounding
    r = int(np.searchsorted(e / e[-1], energy - 1e-12)) + 1
    return min(max(r, 1), s.size)


def _tau_bar(alpha: float) -> float:
    """Zero ``tau`` of ``log(tau + 1) + alpha log(tau / alpha + 1) - tau`` (about 2.5129 sqrt(a))."""

    def psi(tau: float) -> float:
        return math.log(tau + 1.0) + alpha * math.log(tau / alpha + 1.0) - tau

    return float(brentq(psi, 1e-9 + 0.1 * math.sqrt(alpha), 100.0 + 10.0 * alpha))


@dataclass(frozen=True)
class EVBMFResult:
    """Outcome of :func:`evbmf`.

    Attributes
    ----------
    rank : number of components whose singular value exceeds the EVB threshold.
    sigma2 : noise variance (estimated unless given).
    threshold : the EVB truncation threshold ``sigma * sqrt(M * x_bar)`` on singular values.
    singular_values : the input's singular values, decreasing.
    shrunk : the EVB estimate of each retained singular value (zeros for discarded ones).
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: np.ndarray
    shrunk: np.ndarray


def evbmf(y: torch.Tensor | np.ndarray, sigma2: float | None = None) -> EVBMFResult:
    """Empirical VB matrix factorisation of ``y`` (Nakajima et al. 2013): the rank to keep.

    Model ``Y = B A^T + E`` with ``E_ij ~ N(0, sigma^2)`` and Gaussian priors on the columns of
    ``A`` and ``B`` whose variances are estimated (empirical Bayes). With ``L <= M`` the sizes
    of ``Y`` (it is transposed if needed), ``alpha = L / M`` and ``tau_bar`` the zero of
    ``log(tau + 1) + alpha log(tau/alpha + 1) - tau``, the global solution keeps exactly the
    components whose singular value exceeds

        gamma_EVB = sigma * sqrt(M * (1 + tau_bar) * (1 + alpha / tau_bar)),

    and shrinks each kept ``gamma`` to
    ``gamma/2 * (1 - (L+M) s2/gamma^2 + sqrt((1 - (L+M) s2/gamma^2)^2 - 4 L M s2^2/gamma^4))``.

    When ``sigma2`` is not given it minimises the free energy over the noise variance
    (Nakajima et al. 2015):

        Omega(s2) = sum_h psi(gamma_h^2 / (M s2)),  psi(x) = x - log x + [x > x_bar] psi1(x),
        psi1(x) = log(tau(x) + 1) + alpha log(tau(x)/alpha + 1) - tau(x),
        tau(x) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2,

    over the interval the paper proves contains the minimiser.

    Parameters
    ----------
    y : 2-D matrix.
    sigma2 : known noise variance, or ``None`` to estimate it.
    """
    a = torch.as_tensor(y).detach().to("cpu", torch.float64).numpy()
    if a.ndim != 2 or min(a.shape) < 1:
        raise ValueError(f"evbmf: y must be a non-empty 2-D matrix, got shape {a.shape}")
    if sigma2 is not None and sigma2 <= 0:
        raise ValueError(f"sigma2={sigma2}: must be > 0 or None")
    if a.shape[0] > a.shape[1]:
        a = a.T
    big_l, big_m = a.shape  # L <= M
    s = np.linalg.svd(a, compute_uv=False)  # (L,) decreasing
    alpha = big_l / big_m
    tau_bar = _tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    s2 = s**2  # (L,)
    if sigma2 is None:
        total = float(s2.sum())
        if total == 0.0:
            return EVBMFResult(0, 0.0, 0.0, s, np.zeros_like(s))
        upper = total / (big_l * big_m)
        # at most xi components can be signal; the noise variance is bounded below by the
        # energy of the rest (Nakajima et al. 2015, section 4)
        xi = min(math.ceil(big_l / (1.0 + alpha)) - 1, big_l - 1)
        lower = max(s2[xi] / (big_m * x_bar), float(s2[xi:].mean()) / big_m)
        lower = min(max(lower, upper * 1e-12), upper)

        def omega(var: float) -> float:
            x = s2 / (big_m * var)  # (L,)
            val = x - np.log(np.maximum(x, 1e-300))
            keep = x > x_bar
            if keep.any():
                xk = x[keep]
                disc = np.maximum((xk - 1.0 - alpha) ** 2 - 4.0 * alpha, 0.0)
                tau = 0.5 * (xk - 1.0 - alpha + np.sqrt(disc))
                val[keep] += np.log(tau + 1.0) + alpha * np.log(tau / alpha + 1.0) - tau
            return float(val.sum())

        if upper > lower * (1 + 1e-9):
            res = minimize_scalar(omega, bounds=(lower, upper), method="bounded")
            sigma2 = float(res.x)
        else:
            sigma2 = upper
    threshold = math.sqrt(sigma2 * big_m * x_bar)
    keep = s > threshold
    rank = int(keep.sum())
    shrunk = np.zeros_like(s)
    if rank:
        g = s[keep]
        c = 1.0 - (big_l + big_m) * sigma2 / g**2
        disc = np.maximum(c**2 - 4.0 * big_l * big_m * sigma2**2 / g**4, 0.0)
        shrunk[keep] = 0.5 * g * (c + np.sqrt(disc))
    return EVBMFResult(rank, float(sigma2), threshold, s, shrunk)
