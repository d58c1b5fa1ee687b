"""The Frechet distance between two Gaussians fitted to features (Heusel et al. 2017): the formula behind FID and
sFID (evaluate.py, on Inception features) and behind the toy set's Frechet distance (toy_world.toy_fd, on hand-made
shape features). numpy in, float out; float64 throughout.

    gaussian_statistics   mu = mean, sigma = unbiased covariance (as ADM's evaluator)
    frechet_distance      d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))
"""
import warnings

import numpy as np
import torch

from plumbing import UsageError


def gaussian_statistics(activations):
    """mu = mean over samples, sigma = unbiased covariance (np.cov, rowvar=False), both float64, as ADM."""
    acts = np.asarray(activations)
    if acts.ndim != 2 or len(acts) < 2:
        raise UsageError(f"statistics need activations [N >= 2, D]; got shape {acts.shape}")
    return acts.mean(0, dtype=np.float64), np.cov(acts, rowvar=False)


def _check_gaussian(mu, sigma, name):
    mu, sigma = np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UsageError(f"{name}: mu {mu.shape} and sigma {sigma.shape} do not fit (expected [D] and [D, D])")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{name}: the statistics contain NaN or inf (a corrupt file, or fewer than 2 samples)")
    return mu, sigma


def _trace_sqrt_product_eigh(sigma1, sigma2):
    """tr((S_1 S_2)^(1/2)) for covariance matrices. With S_1 = A A^T, S_1 S_2 is similar to the symmetric PSD
    matrix A^T S_2 A, so the trace is the sum of the square roots of its eigenvalues. A is the Cholesky factor of
    S_1, or of S_2 (S_2 S_1 has the same eigenvalues); when both are singular (fewer samples than features),
    A = U diag(w)^(1/2) from S_1 = U diag(w) U^T. Eigenvalues below 0 (rounding) count as 0. float64 throughout."""
    s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
    for s, other in ((s1, s2), (s2, s1)):
        a, info = torch.linalg.cholesky_ex(s)
        if info.item() == 0:
            break
    else:
        w, u = torch.linalg.eigh(s1)
        a, other = u * w.clamp_min(0).sqrt(), s2
    m = a.T @ other @ a
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum().item()


def _trace_sqrt_product_scipy(sigma1, sigma2, eps=1e-6):
    """ADM's route: scipy.linalg.sqrtm(S_1 S_2, disp=False); if that is not finite, add eps to both diagonals and
    retry; a complex result is accepted when its diagonal's imaginary part is within 1e-3 of 0."""
    try:
        from scipy import linalg
    except ImportError:
        raise UsageError("--sqrtm scipy needs scipy: pip install scipy (or use the default --sqrtm eigh)") from None
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UsageError(f"the matrix square root has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return np.trace(covmean)


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrtm="eigh"):
    """Frechet distance between the Gaussians N(mu_1, S_1) and N(mu_2, S_2), in float64:

        d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

    sqrtm='eigh' (default) takes the trace from a Cholesky factor and a symmetric eigendecomposition (see
    _trace_sqrt_product_eigh); it is always finite and real, and several times faster than scipy's sqrtm.
    sqrtm='scipy' is ADM's computation (scipy.linalg.sqrtm of the non-symmetric product, eps = 1e-6 added to the
    diagonals when that is not finite, the real part kept). For full-rank covariances (N well above D, e.g. 50,000
    samples for D = 2048) the two agree to rounding (the tests check ~1e-6 relative); for singular ones (N <= D)
    ADM's eps shifts the trace by up to about sqrt(eps) per zero eigenvalue, so small-sample FIDs differ more."""
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first distribution")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second distribution")
    if mu1.shape != mu2.shape:
        raise UsageError(f"the two distributions have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    if sqrtm not in ("eigh", "scipy"):
        raise UsageError(f"sqrtm must be 'eigh' or 'scipy', got {sqrtm!r}")
    trace_sqrt = (_trace_sqrt_product_eigh if sqrtm == "eigh" else _trace_sqrt_product_scipy)(sigma1, sigma2)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
