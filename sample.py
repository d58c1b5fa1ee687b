"""Sampling: ODE / SDE samplers, classifier-free guidance with a guidance interval, REG joint sampling,
image grids and evaluation folders (PNGs + the .npz the ADM evaluator reads).

    euler_sampler           probability-flow ODE, Euler or Heun                          (SiT paper) 
    euler_maruyama_sampler  reverse SDE, Euler-Maruyama, w_t = 2t, last step mean-only   (SiT paper) 
    score_from_velocity     s = (alpha_t/d_alpha_t v - x) / (sigma_t^2 - alpha_t/d_alpha_t d_sigma_t sigma_t)
    guide                   classifier-free guidance u + s (c - u), inside [guidance_low, guidance_high] only
    to_uint8                x in [-1, 1] -> uint8, exactly as the released code

The samplers follow the released REPA / REG `samplers.py` step for step (time grid, float64 state, the order of
the floating-point operations, the time fed to the model in the latents' dtype), so the same model, noise and
labels give the same trajectory.

Command line (our checkpoints, the released REPA file = EMA state dict, the released REG file = {'ema': ...}):

    python sample.py --ckpt results/exp/checkpoints/0400000.pt --class-labels 207 360 387 974     # a grid PNG
    torchrun --nproc_per_node=8 sample.py --ckpt last.pt --num-fid-samples 50000 \\
        --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7                           # PNGs + .npz
"""
import argparse
import glob
import hashlib
import io
import json
import math
import os
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from encoders import VAE_SCALE, load_vae
from losses import interpolant
from model import SiT_models, build_model, describe_config, load_checkpoint, rename_legacy_blocks
from plumbing import (ArgumentParser, MissingFileError, Progress, UsageError, barrier, check_number, check_output_file,
                      released_spelling, run_script, set_tf32, setup_distributed, show_defaults, write_atomic)
from toy_world import toy_accuracy

# The null label of classifier-free guidance is row `num_classes` of the label table (1000 for ImageNet).
IMAGENET_DEMO_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # the DiT / SiT sample.py defaults


# --------------------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------------------

def score_from_velocity(v, x, t, path_type="linear"):
    """Score of p_t from the velocity (SiT / the released `get_score_from_velocity`):

        s(x, t) = (alpha_t / d_alpha_t * v - x) / (sigma_t^2 - alpha_t / d_alpha_t * d_sigma_t * sigma_t)

    v, x: [N, ...]; t: [N] (float64). For the linear path this is s = (-(1 - t) v - x) / t."""
    t = t.reshape(-1, *([1] * (x.dim() - 1)))
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(t, path_type)
    reverse_alpha_ratio = alpha_t / d_alpha_t
    var = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
    return (reverse_alpha_ratio * v - x) / var


def diffusion_coefficient(t):
    """SDE diffusion w_t = 2 t (the released `compute_diffusion`, for both paths)."""
    return 2 * t


def guide(cond, uncond, scale):
    """Classifier-free guidance: u + s (c - u)."""
    return uncond + scale * (cond - uncond)


def _guided(cfg_scale, t, guidance_low, guidance_high):
    """Is step t inside the guidance interval? Outside it (or with cfg_scale <= 1) only the conditional batch runs."""
    return cfg_scale > 1.0 and guidance_low <= t <= guidance_high


def _evaluate(model, x, cls, t, y, guided, dtype):
    """One model call at time t on [x; x] with labels [y; null] when guided, else on x with y.

    Like the released code the model sees x, cls and t = full([B], t) cast to the latents' dtype (the caller's
    autocast decides the compute dtype) and its outputs come back in float64. Returns the float64 inputs it was
    evaluated at (x_in, cls_in, t_in) and the velocities (v, cls_v)."""
    if guided:
        x = torch.cat([x, x], dim=0)
        cls = None if cls is None else torch.cat([cls, cls], dim=0)
        y = torch.cat([y, torch.full_like(y, getattr(model, "num_classes", 1000))], dim=0)
    t_in = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
    v, _, cls_v = model(x.to(dtype), t_in.to(dtype), y, cls=None if cls is None else cls.to(dtype))
    return x, cls, t_in, v.to(torch.float64), None if cls is None else cls_v.to(torch.float64)


def _combine(d, cls_d, guided, cfg_scale, cls_cfg_scale):
    """Guidance on the doubled batch [cond; uncond]: the image uses cfg_scale; REG's class token uses cls_cfg_scale
    when > 0, else its conditional prediction (the released REG rule). Unguided: returned as is."""
    if not guided:
        return d, cls_d
    d = guide(*d.chunk(2), cfg_scale)
    if cls_d is not None:
        cls_cond, cls_uncond = cls_d.chunk(2)
        cls_d = guide(cls_cond, cls_uncond, cls_cfg_scale) if cls_cfg_scale > 0 else cls_cond
    return d, cls_d


def _randn(x, generator):
    """eps ~ N(0, I) shaped like x (float64). generator: None (global RNG, as the released torch.randn_like),
    one torch.Generator for the batch, or a list of one generator per sample (noise independent of the batch
    it is drawn in; a loop because torch has no batched generators, it costs little next to a model call)."""
    if generator is None:
        return torch.randn_like(x)
    # A generator on another device (e.g. CPU generators for a CUDA run, so that the noise is the same on any device)
    # draws there; the noise is then moved to x's device.
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}: pass one per sample")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device)
                        for g in generator]).to(x.device)


def _check_inputs(model, cls_latents):
    if getattr(model, "cls_dim", None) is not None and cls_latents is None:
        raise ValueError("this is a REG model: pass cls_latents = torch.randn(N, model.cls_dim), the class token's "
                         "noise at t = 1")


@torch.no_grad()
def euler_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                  path_type="linear", cls_latents=None, cls_cfg_scale=0, generator=None, return_cls=False):
    """Probability-flow ODE dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data), Euler or Heun:

        t_i = linspace(1, 0, num_steps + 1)
        Euler:  x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)
        Heun:   x'      = x_i + (t_{i+1} - t_i) v(x_i, t_i)
                x_{i+1} = x_i + (t_{i+1} - t_i) (v(x_i, t_i) + v(x', t_{i+1})) / 2     (not on the last step)
        CFG:    v = v(x, t, null) + cfg_scale (v(x, t, y) - v(x, t, null))   for guidance_low <= t_i <= guidance_high
        REG:    the class token cls_t follows the same update with its own velocity; inside the interval it is
                guided with cls_cfg_scale if > 0, else it takes its conditional velocity.

    The state is float64; the model sees x (and t) in latents.dtype. path_type is unused (the velocity does not
    depend on it) and generator too (the ODE is deterministic): both are accepted so that both samplers take the
    same arguments. Returns x_0 in float64 (and cls_0 with return_cls=True)."""
    _check_inputs(model, cls_latents)
    dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x_next = latents.to(torch.float64)
    cls_next = None if cls_latents is None else cls_latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur, cls_cur = x_next, cls_next
        guided = _guided(cfg_scale, t_cur, guidance_low, guidance_high)
        *_, d_cur, cls_d_cur = _evaluate(model, x_cur, cls_cur, t_cur, y, guided, dtype)
        d_cur, cls_d_cur = _combine(d_cur, cls_d_cur, guided, cfg_scale, cls_cfg_scale)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if cls_cur is not None:
            cls_next = cls_cur + (t_next - t_cur) * cls_d_cur
        if heun and i < num_steps - 1:
            # The corrector is guided by the same rule as its predictor (decided at t_cur), like the released code.
            *_, d_prime, cls_d_prime = _evaluate(model, x_next, cls_next, t_next, y, guided, dtype)
            d_prime, cls_d_prime = _combine(d_prime, cls_d_prime, guided, cfg_scale, cls_cfg_scale)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
            if cls_cur is not None:
                cls_next = cls_cur + (t_next - t_cur) * (0.5 * cls_d_cur + 0.5 * cls_d_prime)
    return (x_next, cls_next) if return_cls else x_next


@torch.no_grad()
def euler_maruyama_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0, path_type="linear", cls_latents=None, cls_cfg_scale=0, generator=None,
                           return_cls=False):
    """Reverse SDE  dx = [v(x, t) - 1/2 w_t s(x, t)] dt + sqrt(w_t) dW  from t = 1 to 0, Euler-Maruyama:

        t_i = linspace(1, 0.04, num_steps), then t = 0;  w_t = 2 t;  s = score_from_velocity(v, x, t)
        d_i     = v(x_i, t_i) - 1/2 w_{t_i} s(x_i, t_i)
        x_{i+1} = x_i + d_i (t_{i+1} - t_i) + sqrt(w_{t_i}) sqrt(|t_{i+1} - t_i|) eps_i,   eps_i ~ N(0, I)
        last step (0.04 -> 0): the mean only, x_0 = x + d (0 - 0.04)
        CFG:    d = d(x, t, null) + cfg_scale (d(x, t, y) - d(x, t, null))  for guidance_low <= t_i <= guidance_high
                (the guidance acts on the drift, as in the released code)
        REG:    the class token follows the same SDE with its own noise (each step draws the image's eps, then the
                class token's); guided with cls_cfg_scale if > 0, else its conditional drift.

    generator: None (global RNG, as the released code), a torch.Generator, or one generator per sample. State in
    float64, model inputs in latents.dtype. `heun` is unused (kept for the shared signature). Returns x_0 in float64
    (and cls_0 with return_cls=True)."""
    _check_inputs(model, cls_latents)
    dtype = latents.dtype
    t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64),
                         torch.tensor([0.0], dtype=torch.float64)]).tolist()
    x_cur = latents.to(torch.float64)
    cls_cur = None if cls_latents is None else cls_latents.to(torch.float64)

    def drift(x, cls, t, guided):
        x_in, cls_in, t_in, v, cls_v = _evaluate(model, x, cls, t, y, guided, dtype)
        w = diffusion_coefficient(t)
        d = v - 0.5 * w * score_from_velocity(v, x_in, t_in, path_type)
        cls_d = None if cls is None else cls_v - 0.5 * w * score_from_velocity(cls_v, cls_in, t_in, path_type)
        return _combine(d, cls_d, guided, cfg_scale, cls_cfg_scale)

    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt = t_next - t_cur
        eps = _randn(x_cur, generator)
        cls_eps = None if cls_cur is None else _randn(cls_cur, generator)
        d_cur, cls_d_cur = drift(x_cur, cls_cur, t_cur, _guided(cfg_scale, t_cur, guidance_low, guidance_high))
        sqrt_w, sqrt_dt = math.sqrt(diffusion_coefficient(t_cur)), math.sqrt(abs(dt))
        x_cur = x_cur + d_cur * dt + sqrt_w * (eps * sqrt_dt)
        if cls_cur is not None:
            cls_cur = cls_cur + cls_d_cur * dt + sqrt_w * (cls_eps * sqrt_dt)

    t_cur, t_next = t_steps[-2], t_steps[-1]  # last step: the mean, no noise
    d_cur, cls_d_cur = drift(x_cur, cls_cur, t_cur, _guided(cfg_scale, t_cur, guidance_low, guidance_high))
    x_0 = x_cur + (t_next - t_cur) * d_cur
    cls_0 = None if cls_cur is None else cls_cur + (t_next - t_cur) * cls_d_cur
    return (x_0, cls_0) if return_cls else x_0


SAMPLERS = {"ode": euler_sampler, "sde": euler_maruyama_sampler}


# --------------------------------------------------------------------------------------------------------------
# Command line: load a checkpoint, then a grid PNG or an evaluation folder
# --------------------------------------------------------------------------------------------------------------

def main(argv=None):
    """Run the command line; returns the path written (grid PNG or .npz). Bad input raises UsageError."""
    args = parse_args(argv)
    check_args(args)
    # A long collective timeout: after a resume the ranks may have very different amounts of work left.
    rank, world, device = setup_distributed(args.device, timeout=timedelta(hours=6))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    try:
        set_tf32(args.tf32)
        model, vae, config = load_for_sampling(args, rank, world, device)
        name = output_name(args, config)
        if args.num_fid_samples is None:
            return sample_grid(args, rank, model, vae, config, name, device)
        return sample_folder(args, rank, world, model, vae, config, name, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def sample_grid(args, rank, model, vae, config, name, device):
    """Grid mode (rank 0): one image per --class-labels label (default: the DiT demo classes) in one PNG."""
    labels = args.class_labels
    if labels is None:
        k = config["num_classes"]
        labels = IMAGENET_DEMO_CLASSES if k == 1000 else list(range(min(8, k)))
    bad = [c for c in labels if not 0 <= c < config["num_classes"]]
    if bad:
        raise UsageError(f"class label(s) {bad} out of range: this model has {config['num_classes']} classes "
                         f"(0..{config['num_classes'] - 1})")
    path = args.grid_path or os.path.join(args.sample_dir, f"{name}.png")
    if rank == 0:
        t0, images = time.time(), []
        for s in range(0, len(labels), args.per_proc_batch_size):
            idx = list(range(s, min(s + args.per_proc_batch_size, len(labels))))
            images.append(_sample_batch(args, model, vae, config["latent_scale"], config["path_type"], idx,
                                        [labels[i] for i in idx], device)[0])
        images = torch.cat(images)
        save_grid(images, path, nrow=args.nrow)
        print(f"saved {path}: {len(labels)} images in {time.time() - t0:.1f} s "
              f"({len(labels) / (time.time() - t0):.2f} images/s)", flush=True)
        _toy_score(config, images, labels)
    return path


def sample_folder(args, rank, world, model, vae, config, name, device):
    """Evaluation mode: --num-fid-samples PNGs (random labels) split over the ranks, resumable, then the .npz."""
    folder = os.path.join(args.sample_dir, name)
    todo = _open_folder(folder, args, rank, config, device)
    mine = todo[rank::world]
    progress = Progress(len(todo), world=world, quiet=rank != 0)
    for s in range(0, len(mine), args.per_proc_batch_size):
        idx = mine[s:s + args.per_proc_batch_size]
        images, _ = _sample_batch(args, model, vae, config["latent_scale"], config["path_type"], idx, None, device)
        for i, img in zip(idx, images.permute(0, 2, 3, 1).numpy()):
            _save_png(img, os.path.join(folder, f"{i:06d}.png"))
        progress.update(len(idx))
    if todo:
        progress.close()
    barrier(device)
    npz = f"{folder}.npz"
    if rank == 0:
        shape = write_npz(folder, args.num_fid_samples, npz)
        print(f"saved {npz} [arr_0 {shape}]" + (f"; {progress.rate():.2f} images/s" if todo else ""), flush=True)
    return npz


def _sample_batch(args, model, vae, latent_scale, path_type, indices, labels, device):
    """uint8 images [B, 3, H, W] for global image indices (noise from image_generators) and labels (or None)."""
    gens = image_generators(args.seed, indices, device)
    z, cls, y = initial_noise(gens, model, labels)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with autocast:
        x = SAMPLERS[args.mode](model, z, y, num_steps=args.num_steps, heun=args.heun, cfg_scale=args.cfg_scale,
                                guidance_low=args.guidance_low, guidance_high=args.guidance_high,
                                path_type=path_type, cls_latents=cls, cls_cfg_scale=args.cls_cfg_scale,
                                generator=gens)
    with torch.no_grad():
        return to_uint8(decode(x, vae, latent_scale)).cpu(), y.cpu()


# --------------------------------------------------------------------------------------------------------------
# Set-up: flags, model and VAE, the output folder
# --------------------------------------------------------------------------------------------------------------

def check_args(args):
    """Flag values and combinations argparse cannot check; raises UsageError before anything is loaded."""
    check_number("--cfg-scale", args.cfg_scale, 1.0, what="a number >= 1 (1 = no guidance, as the released code)")
    check_number("--cls-cfg-scale", args.cls_cfg_scale, 0.0, what="a number >= 0 (0 = the conditional class token)")
    check_number("--guidance-low", args.guidance_low, 0.0, 1.0)
    check_number("--guidance-high", args.guidance_high, 0.0, 1.0)
    check_number("--nrow", args.nrow, 1, what="a positive integer (images per grid row)")
    for flag, value in (("--num-classes", args.num_classes), ("--encoder-depth", args.encoder_depth),
                        ("--resolution", args.resolution), ("--cls", args.cls)):
        check_number(flag, value, 1, what="a positive integer")
    bad = [c for c in args.class_labels or [] if c < 0]
    if bad:
        raise UsageError(f"--class-labels {bad[0]}: class labels are 0 .. num_classes - 1")
    if args.grid_path is not None:
        check_output_file("--grid-path", args.grid_path, (".png",))
    if os.path.exists(args.sample_dir) and not os.path.isdir(args.sample_dir):
        raise UsageError(f"--sample-dir {args.sample_dir} is a file; pass a folder")
    if not os.path.exists(args.ckpt):
        raise MissingFileError(f"--ckpt {args.ckpt}: checkpoint not found")
    if not args.guidance_low <= args.guidance_high:
        raise UsageError(f"--guidance-low {args.guidance_low} > --guidance-high {args.guidance_high}")
    if args.num_fid_samples is not None and args.class_labels is not None:
        raise UsageError("choose one: --class-labels (a grid) or --num-fid-samples (an evaluation folder)")
    if not 0 <= args.seed < 2 ** 31:
        raise UsageError(f"--seed must be in [0, 2^31), got {args.seed}")
    if args.qk_norm:
        raise UsageError("--qk-norm: the papers' SiT models (and the released checkpoints) have no q/k "
                         "normalization, and this implementation has none; drop the flag")
    if os.path.isdir(args.ckpt):
        found = sorted(glob.glob(os.path.join(args.ckpt, "**", "*.pt"), recursive=True))
        raise UsageError(f"--ckpt {args.ckpt} is a folder; pass a checkpoint file"
                         + (f", e.g. --ckpt {found[-1]}" if found else " (a .pt file)"))


def check_released_flags(args, config):
    """--cls and --projector-embed-dims of the released generate.py build the model there; here the weights do, so
    the flags must agree with them."""
    if args.cls is not None and args.cls != config["cls_dim"]:
        raise UsageError(f"--cls {args.cls}: the checkpoint's class token has dimension {config['cls_dim']} "
                         + ("(not a REG model: drop --cls)" if config["cls_dim"] is None else "") )
    if args.projector_embed_dims is not None:
        dims = [int(d) for d in args.projector_embed_dims.split(",") if d.strip()]
        if dims != config["z_dims"]:
            raise UsageError(f"--projector-embed-dims {args.projector_embed_dims}: the checkpoint's projectors "
                             f"output {config['z_dims']}; drop the flag (the weights decide)")


def load_for_sampling(args, rank, world, device):
    """The EMA (or raw) SiT of --ckpt, the VAE that decodes its latents (None in pixel space), and its config
    extended with what sampling needs from the training run: path_type, latent_scale, resolution, weights hash."""
    sd, ckpt_args = load_checkpoint(args.ckpt, args.use_model_weights, args.trust_checkpoint)
    a = ckpt_args or {}
    pixel_space = bool(a.get("pixel_space", False))
    input_size = None
    if args.resolution is not None:
        input_size = args.resolution if pixel_space else args.resolution // 8
    if args.legacy:
        sd = rename_legacy_blocks(sd, args.encoder_depth or 8)
    elif any(k.startswith("decoder_blocks.") for k in sd):
        raise UsageError(f"{args.ckpt} stores decoder_blocks.* (weights of the authors' early runs): pass --legacy "
                         "and the --encoder-depth it was trained with (default 8)")
    model, config = build_model(sd, ckpt_args, args.model, input_size, args.num_classes, args.encoder_depth, device)
    check_released_flags(args, config)
    config.update(pixel_space=pixel_space, resolution=config["input_size"] * (1 if pixel_space else 8),
                  path_type=args.path_type or a.get("path_type", "linear"), data_dir=a.get("data_dir"),
                  weights=weights_fingerprint(sd) if args.num_fid_samples is not None else None)
    if args.cls_cfg_scale > 0 and config["cls_dim"] is None:
        _log(rank, "warning: --cls-cfg-scale is for REG models; this checkpoint has no class token, ignoring it")
    vae, config["latent_scale"] = None, float(a.get("latent_scale", 1.0 if pixel_space else VAE_SCALE))
    if not pixel_space:
        try:
            vae = load_vae(args.vae, device)
        except (OSError, RuntimeError) as e:
            raise UsageError(f"cannot load --vae {args.vae}: {e}") from None
    # The REPA projector outputs (zs) play no part in sampling; dropping the projectors saves their MLP on every
    # token of every call (about 1% of SiT-XL/2's compute, half of a tiny model's). The weights stay in `sd`.
    model.projectors = torch.nn.ModuleList()
    if args.compile:
        model = torch.compile(model)
    _log(rank, f"{args.ckpt}: {describe_config(config)}, {'EMA' if not args.use_model_weights else 'raw'} weights, "
               f"{args.mode.upper()} {args.num_steps} steps{' Heun' if args.heun and args.mode == 'ode' else ''}, "
               f"cfg {args.cfg_scale} in [{args.guidance_low}, {args.guidance_high}]"
               f"{f', cls cfg {args.cls_cfg_scale}' if config['cls_dim'] else ''}, {config['path_type']} path, "
               f"{args.precision}, {world} process(es) on {device.type}")
    return model, vae, config


def output_name(args, config):
    """The grid's / folder's name: model, checkpoint, size, VAE and every sampler setting."""
    model_tag = config["model"].replace("/", "-")
    ckpt_tag = os.path.splitext(os.path.basename(args.ckpt))[0]
    vae = "pixel" if config["pixel_space"] else os.path.basename(args.vae)
    return (f"{model_tag}-{ckpt_tag}-size-{config['resolution']}-vae-{vae}"
            f"-cfg-{args.cfg_scale}-gi-{args.guidance_low}-{args.guidance_high}"
            + (f"-clscfg-{args.cls_cfg_scale}" if config["cls_dim"] else "")
            + f"-{args.mode}-{args.num_steps}{'-heun' if args.heun and args.mode == 'ode' else ''}-seed-{args.seed}")


def _open_folder(folder, args, rank, config, device):
    """Create or resume an evaluation folder; returns the image indices still missing. Every rank checks the
    folder's config.json first, so a mismatch stops all of them alike."""
    identity = dict(weights=config["weights"], model=config["model"], ema=not args.use_model_weights,
                    mode=args.mode, num_steps=args.num_steps, heun=bool(args.heun and args.mode == "ode"),
                    cfg_scale=args.cfg_scale, guidance_low=args.guidance_low, guidance_high=args.guidance_high,
                    cls_cfg_scale=args.cls_cfg_scale if config["cls_dim"] else None, path_type=config["path_type"],
                    seed=args.seed, vae=None if config["pixel_space"] else args.vae,
                    latent_scale=config["latent_scale"], resolution=config["resolution"], precision=args.precision,
                    tf32=args.tf32 if device.type == "cuda" else None, device_type=device.type,
                    noise=f"per-image generator, {NOISE_SEED}")
    os.makedirs(folder, exist_ok=True)
    exists = _check_folder(folder, identity)
    barrier(device)
    if rank == 0:
        for n in os.listdir(folder):
            if n.endswith(".tmp"):  # left by a killed run
                os.remove(os.path.join(folder, n))
        if not exists:
            write_atomic(os.path.join(folder, "config.json"),
                         json.dumps(dict(identity, ckpt=os.path.abspath(args.ckpt)), indent=1).encode())
    barrier(device)
    done = {n for n in os.listdir(folder) if n.endswith(".png")}
    todo = [i for i in range(args.num_fid_samples) if f"{i:06d}.png" not in done]
    _log(rank, f"{folder}: {args.num_fid_samples - len(todo)} of {args.num_fid_samples} images already there, "
               f"{len(todo)} to sample")
    return todo


def _check_folder(folder, config):
    """An evaluation folder holds one configuration's images: config.json is written on first use and a later run
    with another configuration stops instead of mixing two sample sets."""
    path = os.path.join(folder, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [f"{k}: {old.get(k)!r} (folder) vs {v!r} (now)" for k, v in config.items() if old.get(k) != v]
        if diff:
            raise UsageError(f"{folder} already holds samples made with another configuration ({'; '.join(diff)}). "
                             "Use another --sample-dir, or delete that folder to start over.")
        return True
    if any(n.endswith(".png") for n in os.listdir(folder)):
        raise UsageError(f"{folder} holds PNGs but no config.json, so it cannot be resumed safely; use another "
                         "--sample-dir or empty it")
    return False


def _log(rank, msg):
    if rank == 0:
        print(msg, flush=True)


def _toy_score(config, images, labels):
    """Toy checkpoints (data 'toy'): print toy_world.toy_accuracy of the grid (joint = shape and colour both right)."""
    if config.get("data_dir") == "toy":
        acc = toy_accuracy(images, torch.as_tensor(labels))
        print(f"toy accuracy: joint {acc['joint']:.3f} (shape {acc['shape']:.3f}, colour {acc['colour']:.3f})",
              flush=True)


# --------------------------------------------------------------------------------------------------------------
# Pixels and files
# --------------------------------------------------------------------------------------------------------------

def decode(z, vae, latent_scale):
    """Latents -> pixels in [-1, 1] (float32): x = VAE.decode(z / latent_scale); pixel-space models (vae=None) have
    x = z / latent_scale. The division is by a tensor, like the released code (a CUDA division by a Python scalar
    multiplies by its reciprocal, which can differ in the last bit)."""
    z = z.to(torch.float32) / torch.tensor(latent_scale, dtype=torch.float32, device=z.device)
    return z if vae is None else vae.decode(z).float()


def to_uint8(x):
    """[-1, 1] -> uint8, as the released code: clamp(255 * ((x + 1) / 2), 0, 255), truncated toward zero."""
    return torch.clamp(255.0 * ((x + 1) / 2.0), 0, 255).to(torch.uint8)


def _save_png(image_hwc, path):
    """Write a PNG atomically (plumbing.write_atomic): a killed run never leaves a truncated image under its name."""
    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def save_grid(images, path, nrow=8, padding=2):
    """Write uint8 images [N, 3, H, W] as one PNG grid (nrow per row, `padding` black pixels around each)."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    full = torch.zeros(rows * nrow, c, h, w, dtype=torch.uint8)
    full[:n] = images.cpu()
    full = F.pad(full, (padding, 0, padding, 0))  # top/left padding of each tile; the right/bottom edge below
    grid = full.reshape(rows, nrow, c, h + padding, w + padding).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * (h + padding), nrow * (w + padding), c)
    grid = F.pad(grid.permute(2, 0, 1), (0, padding, 0, padding)).permute(1, 2, 0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _save_png(grid.contiguous().numpy(), path)


def write_npz(folder, num, path):
    """Pack folder/000000.png ... into path (.npz with arr_0 uint8 [num, H, W, 3], the ADM evaluator's input),
    written atomically."""
    first = np.asarray(Image.open(os.path.join(folder, f"{0:06d}.png")).convert("RGB"))
    arr = np.empty((num, *first.shape), dtype=np.uint8)
    for i in range(num):
        arr[i] = np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png")).convert("RGB"))
    write_atomic(path, lambda f: np.savez(f, arr_0=arr))  # a file object: numpy adds no second ".npz"
    return arr.shape


def weights_fingerprint(sd):
    """A short hash of the weights (names, shapes and 1024 evenly spaced values per tensor): cheap on a
    memory-mapped checkpoint, and different for any two trained models."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().reshape(-1)
        h.update(f"{k}{tuple(sd[k].shape)}".encode())
        h.update(v[:: max(1, v.numel() // 1024)][:1024].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Per-image noise
# --------------------------------------------------------------------------------------------------------------

NOISE_SEED = "seed * 2^32 + (index + seed * 2654435769) % 2^32"  # as config.json states it


def image_seed(seed, index):
    """The seed of image `index`'s generator: seed * 2^32 + (index + seed * 2654435769) mod 2^32. torch's CPU
    generator keeps only the low 32 bits of a seed (CUDA's keeps all 64), so they must differ between seeds too
    (plain seed * 2^32 + index gave every --seed the same CPU noise): index plus a per-seed offset (Knuth's
    golden-ratio multiplier spreads the offsets of nearby seeds about 2^31 apart) stays distinct within a seed
    and, for any practical number of images, between seeds."""
    return seed * 2 ** 32 + (int(index) + seed * 2654435769) % 2 ** 32


def image_generators(seed, indices, device):
    """One generator per image, seeded by (global seed, image index) only (image_seed). The images are then the
    same for any number of processes, any batch size, and after a resume."""
    return [torch.Generator(device).manual_seed(image_seed(seed, i)) for i in indices]


def initial_noise(generators, model, labels=None):
    """The sampler's inputs, drawn per image from its own generator in this order: z_1 ~ N(0, I) [C, H, W],
    cls_1 ~ N(0, I) [cls_dim] (REG), and the label ~ U{0..num_classes-1} when `labels` is None. The SDE then keeps
    drawing its step noise from the same generators."""
    device = generators[0].device
    shape = (model.in_channels, model.input_size, model.input_size)
    z = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    cls = None
    if model.cls_dim is not None:
        cls = torch.stack([torch.randn(model.cls_dim, generator=g, device=device) for g in generators])
    if labels is None:
        labels = torch.cat([torch.randint(0, model.num_classes, (1,), generator=g, device=device)
                            for g in generators])
    return z, cls, torch.as_tensor(labels, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def parse_args(argv=None):
    p = ArgumentParser(prog="sample.py", allow_abbrev=False,
                       description="Sample images from a SiT / REPA / REG checkpoint (grid or FID folder).")
    p.add_argument("--ckpt", required=True, help="our checkpoint, or the released REPA / REG .pt file")
    p.add_argument("--use-model-weights", action="store_true", help="our checkpoints: raw weights instead of EMA")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load with full pickle (torch.load weights_only=False); only for files you trust")
    # The architecture is read from the weights; these flags only check that it is what you expect.
    p.add_argument("--model", default=None, choices=list(SiT_models), metavar="MODEL",
                   help="check that the checkpoint is this model (default: read from the weights)")
    p.add_argument("--resolution", type=int, default=None, help="image size (latents are resolution / 8)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--encoder-depth", type=int, default=None, help="irrelevant for sampling; default from ckpt")
    p.add_argument("--path-type", default=None, choices=["linear", "cosine"], help="default: the training run's")
    # The released generate.py builds the model from flags; here they only check what the weights say.
    p.add_argument("--cls", type=int, default=None, metavar="DIM",
                   help="REG's class-token dimension (released generate.py); checked against the checkpoint")
    p.add_argument("--projector-embed-dims", default=None, metavar="D1[,D2]",
                   help="REPA projector output dims (released generate.py); checked against the checkpoint")
    p.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="the released --legacy: weights of the authors' early runs, with blocks after "
                        "--encoder-depth (default 8) stored as decoder_blocks.*")
    p.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True,
                   help="accepted for the released command lines: attention always runs through torch SDPA")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False,
                   help="the papers' models have no q/k normalization; only --no-qk-norm is accepted")
    p.add_argument("--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # torch.distributed.launch
    # Sampler (the paper recipes are in README: REPA sde 250 / cfg 1.8 / [0, 0.7], REG adds --cls-cfg-scale 2.3).
    p.add_argument("--mode", default="sde", choices=["ode", "sde"])
    p.add_argument("--num-steps", type=_positive_int, default=250)
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="ODE only: Heun's second-order correction")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="1 = no guidance")
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--cls-cfg-scale", type=float, default=0.0, help="REG: guidance of the class token (0 = cond.)")
    p.add_argument("--seed", "--global-seed", type=int, default=0)
    p.add_argument("--vae", default="ema", help="ema | mse | a local VAE dir/file | random (SD-VAE decoder)")
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                   help="model autocast dtype (default: bf16 on a GPU, fp32 on a CPU, where bf16 is emulated and "
                        "several times slower without bf16 units)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    # Output
    p.add_argument("--class-labels", type=int, nargs="+", default=None, help="grid mode: one image per label")
    p.add_argument("--nrow", type=int, default=8)
    p.add_argument("--grid-path", default=None, help="grid mode: output PNG (default: under --sample-dir)")
    p.add_argument("--num-fid-samples", type=_positive_int, default=None,
                   help="evaluation mode: this many images (random labels) as PNGs + .npz")
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--per-proc-batch-size", type=_positive_int, default=32)
    return show_defaults(p).parse_args(released_spelling(sys.argv[1:] if argv is None else argv))


def cli(argv=None):
    """The command line's exit status: 0; 2 with one line for bad input (or a file system error); 130 on Ctrl-C."""
    return run_script("sample.py", main, argv, also=(OSError,), interrupted="interrupted; rerun the same command to "
                      "continue (an evaluation folder keeps its finished images)")


if __name__ == "__main__":
    sys.exit(cli())
