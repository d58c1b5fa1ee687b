"""The training objective of SiT + REPA + REG, one function per equation.

Conventions (SiT; as in the released REPA/REG code): t in [0, 1], t = 0 is data, t = 1 is noise; the model is fed t itself.

    interpolant      z_t = alpha_t z_* + sigma_t eps,  v = d_alpha_t z_* + d_sigma_t eps      (SiT §2; REPA §3)
    sample_time      t ~ U(0, 1)  or  lognormal                                                (SiT)
    pred_loss        ||v_theta(z_t, t) - v||^2                                                 (SiT; REG L_pred)
    repa_loss        -1/N sum_n sim(y_*^[n], h_phi(h_t^[n]))                                   (REPA eq. 2)
    repa_targets     y_* = [cls_*, f_*] for REG                                                (REG §3)
    spatial_normalize  f_* <- (f_* - gamma mean_n f_*) / std_n f_*   (optional, iREPA §5)
    compute_loss     L = L_pred + beta L_pred^cls + lambda L_REPA                               (REPA eq. 3, REG)
"""
import math

import torch
import torch.nn.functional as F

PATH_TYPES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")


def _check_path(path_type):
    if path_type not in PATH_TYPES:
        raise ValueError(f"path_type must be one of {PATH_TYPES}, got {path_type!r}")


def interpolant(t, path_type="linear"):
    """Coefficients of the stochastic interpolant and their time derivatives.

        linear:  alpha_t = 1 - t,          sigma_t = t,           d_alpha_t = -1,                 d_sigma_t = 1
        cosine:  alpha_t = cos(pi t / 2),  sigma_t = sin(pi t / 2),
                 d_alpha_t = -pi/2 sin(pi t / 2),                 d_sigma_t = pi/2 cos(pi t / 2)

    Returns four tensors shaped like t, so that z_t = alpha_t z_* + sigma_t eps and
    v = d_alpha_t z_* + d_sigma_t eps = d z_t / dt.
    """
    _check_path(path_type)
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    half_pi = math.pi / 2
    return (torch.cos(half_pi * t), torch.sin(half_pi * t),
            -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))


def sample_time(n, weighting="uniform", path_type="linear", device=None, generator=None):
    """Training times t, one per sample.

        uniform:    t ~ U(0, 1)
        lognormal:  s = exp(n), n ~ N(0, 1);  t = s / (1 + s) (linear)  or  t = 2/pi atan(s) (cosine)

    Drawn on the CPU generator and then moved, like the released code, so a seed gives the same t on any device.
    """
    _check_path(path_type)
    if weighting == "uniform":
        t = torch.rand(n, generator=generator)
    elif weighting == "lognormal":
        s = torch.randn(n, generator=generator).exp()
        t = s / (1 + s) if path_type == "linear" else 2 / math.pi * torch.atan(s)
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return t.to(device) if device is not None else t


def expand_like(t, x):
    """Reshape a per-sample [N] tensor to [N, 1, ..., 1] so it broadcasts against x."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def pred_loss(v_pred, v_target):
    """Velocity-prediction loss, per sample:  L_pred = mean over elements of ||v_theta(z_t, t) - v||^2.

    Returns a [N] tensor (mean over every non-batch dimension); the caller averages over the batch.
    The same function is used for the REG class token, whose term is weighted by beta.
    """
    return (v_pred.float() - v_target.float()).pow(2).flatten(1).mean(1)


def repa_loss(zs_target, zs_pred):
    """Representation alignment (REPA eq. 2), per sample:

        L_REPA = - 1/K sum_k 1/N sum_n sim(y_*^[k,n], h_phi^k(h_t^[n])),   sim = cosine similarity

    zs_target, zs_pred: lists over the K target encoders of [B, N, D_k] tensors (targets from the clean image,
    predictions from the projector h_phi). The released code averages over tokens, then over the batch and the
    encoders; for REG the N tokens include the class token (N + 1 tokens) [code]. Returns a [B] tensor.
    """
    if len(zs_target) != len(zs_pred) or not zs_pred:
        raise ValueError(f"repa_loss needs one prediction per target encoder, got {len(zs_pred)} predictions "
                         f"for {len(zs_target)} targets")
    # sim(a, b) = <a/|a|, b/|b|>, normalizing each side separately as the released code does.
    sims = [(F.normalize(z.float(), dim=-1) * F.normalize(z_tilde.float(), dim=-1)).sum(-1).mean(1)
            for z, z_tilde in zip(zs_target, zs_pred)]  # a loop over encoders (K is 1 or 2), not the batch
    return -torch.stack(sims).mean(0)


def repa_targets(cls_token, patch_tokens, reg):
    """Alignment target y_*: the encoder's patch tokens f_* (REPA), or [cls_*, f_*] with the class token
    prepended (REG, matching the class token the model sees at position 0)."""
    return torch.cat([cls_token.unsqueeze(1), patch_tokens], 1) if reg else patch_tokens


def spatial_normalize(patch_tokens, gamma=1.0, eps=1e-6):
    """iREPA's spatial normalization of the target (Singh et al. 2025, arXiv 2512.10794, §5), per image and per
    channel, over the N patch tokens:

        f^[n] <- (f^[n] - gamma * 1/N sum_m f^[m]) / (std_m f^[m] + eps)      (std: unbiased, over the tokens)

    Subtracting the token mean removes what every token of an image shares (e.g. a per-image class code), so
    that what is left to align to is how the tokens differ across the image: its spatial structure.
    patch_tokens: [B, N, D] with N >= 2. Off by default (train.py --target-norm), as in REPA and REG."""
    if patch_tokens.shape[1] < 2:
        raise ValueError(f"spatial normalization needs at least 2 patch tokens per image, got "
                         f"{patch_tokens.shape[1]}")
    mean = patch_tokens.mean(dim=1, keepdim=True)
    std = patch_tokens.std(dim=1, keepdim=True)
    return (patch_tokens - gamma * mean) / (std + eps)


def compute_loss(model, x, y, zs_target, cls_target=None, path_type="linear", weighting="uniform",
                 proj_coeff=0.5, cls_weight=0.03, generator=None):
    """One Monte-Carlo estimate of the full objective.

        z_t   = alpha_t x + sigma_t eps,          v   = d_alpha_t x + d_sigma_t eps
        cls_t = alpha_t cls_* + sigma_t eps_cls,  v^c = d_alpha_t cls_* + d_sigma_t eps_cls   (REG, same t)
        L = E[ L_pred(v_theta(z_t), v) + beta L_pred(v_theta(cls_t), v^c) ] + lambda E[ L_REPA ]

    x: clean latents [N, C, H, W] (already scaled); y: labels [N]; zs_target: list of [N, T, D] targets (empty
    for plain SiT); cls_target: [N, D] clean class token (REG) or None. beta = cls_weight (the released `--cls`),
    lambda = proj_coeff. Random draws follow the released order: t (CPU generator), then eps, then eps_cls.

    Returns a dict: 'loss' (differentiable scalar) and detached scalars 'pred', 'cls', 'repa' for logging.
    """
    n = x.shape[0]
    t = sample_time(n, weighting, path_type, generator=generator).to(device=x.device, dtype=x.dtype)
    eps = torch.randn_like(x)
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = (expand_like(c, x) for c in interpolant(t, path_type))
    z_t = alpha_t * x + sigma_t * eps
    v_target = d_alpha_t * x + d_sigma_t * eps

    cls_t = cls_v_target = None
    if cls_target is not None:
        eps_cls = torch.randn_like(cls_target)
        a, s, da, ds = (c[:, None] for c in interpolant(t.to(cls_target.dtype), path_type))
        cls_t = a * cls_target + s * eps_cls
        cls_v_target = da * cls_target + ds * eps_cls

    v_pred, zs_pred, cls_v_pred = model(z_t, t, y, cls=cls_t)

    l_pred = pred_loss(v_pred, v_target).mean()
    loss = l_pred
    l_cls = torch.zeros((), device=x.device)
    if cls_target is not None:
        l_cls = pred_loss(cls_v_pred, cls_v_target).mean()
        loss = loss + cls_weight * l_cls
    l_repa = torch.zeros((), device=x.device)
    if zs_target:
        l_repa = repa_loss(zs_target, zs_pred).mean()
        loss = loss + proj_coeff * l_repa
    return {"loss": loss, "pred": l_pred.detach(), "cls": l_cls.detach(), "repa": l_repa.detach()}
