"""Train SiT, SiT + REPA, or SiT + REG: one flat script from a CPU smoke run to many GPUs under torchrun.

    plain SiT   python train.py --model SiT-XL/2 --data-dir DATA --proj-coeff 0
    REPA        torchrun --nproc_per_node=8 train.py --model SiT-XL/2 --data-dir DATA          (the default method)
    REG         torchrun --nproc_per_node=8 train.py --model SiT-XL/2 --data-dir DATA --reg
    smoke       python train.py --smoke [sit|repa|reg]   (tiny SiT on the toy set, CPU, offline, a few minutes)
    benchmark   python train.py --model SiT-XL/2 --reg --batch-size 32 --benchmark      (synthetic data, 50 steps)
    profile     python train.py --model SiT-XL/2 --reg --batch-size 32 --profile prof   (prof.md: time per part)

The defaults are the recipes of the released REPA / REG code: AdamW lr 1e-4, betas (0.9, 0.999),
wd 0, eps 1e-8, grad clip 1.0, EMA 0.9999 every step, label dropout 0.1, global batch 256, linear path,
v-prediction, uniform time, DINOv2-B target, lambda (--proj-coeff) 0.5, beta (--cls) 0.03, encoder_depth 4 for
SiT-B (and the small configs) and 8 for SiT-L/XL. One training step:

    z      = (mean + std * eps) * latent_scale                  posterior sample of the stored VAE moments
    cls_*, f_* = encoder(image)                                 frozen target, no grad, same autocast
    y_*    = f_* (REPA)  or  [cls_*, f_*] (REG)                 losses.repa_targets
    L      = L_pred + beta L_pred^cls + lambda L_REPA           losses.compute_loss
    theta <- AdamW(clip(grad L, 1.0));  theta_ema <- 0.9999 theta_ema + 0.0001 theta

Experiment folder <output-dir>/<exp-name>/: args.json, log.txt, metrics.jsonl, checkpoints/<step:07d>.pt
({model, ema, opt, args, steps} like the released code, plus the state that exact resumption needs), and
samples/<step:07d>.png (EMA model, fixed noise and labels). A folder belongs to one configuration and one run at a
time (a `lock` file): the same command again continues from its latest checkpoint, another configuration is refused.
"""
import argparse
import contextlib
import copy
import math
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
import encoders as encoders_module
import toy_world
from checkpoints import load_resume, restore, seed_everything, seed_rank, save_training_state, set_optimizer_flags
from encoders import VAE_SCALE
from losses import compute_loss, repa_targets, spatial_normalize
from model import PROJECTORS, SIZES, SiT_models, default_encoder_depth
from monitor import (BENCHMARK_DEFAULT, BENCHMARK_WARMUP, BENCHMARK_WINDOW, STATS, BenchmarkTimer, Logger, Meter,
                     StepStats, StopSignal, check_finite, device_peak_tflops, make_monitor, out_of_memory_message,
                     save_samples)
from profiling import (BACKWARD, BATCH, CLIP, EMA, FORWARD, OPTIMIZER, PROFILE_STEPS, STATS as STATS_PART,
                       StepProfiler, part)
from plumbing import (ArgumentParser, RefusedFlag, UsageError, WriteError, autocast_ctx, check_name, released_spelling,
                      set_tf32, setup_distributed, show_defaults)
from run_folder import (ExperimentFolder, changed_settings, choose_start, folder_notes, rank0_decides,
                        run_fault_message)


# ----------------------------------------------------------------------------------------------------------------
# The method: one optimizer step (batch -> targets -> loss -> step -> EMA)
# ----------------------------------------------------------------------------------------------------------------

def train_step(model, raw_model, ema_params, params, opt, scaler, batches, encoders, args, ctx, device):
    """One optimizer step over args.grad_accum micro-batches (DDP all-reduces only on the last one).
    Returns {name: detached 0-d tensor} for STATS (loss terms averaged over the micro-batches)."""
    if getattr(args, "compile_mode", None) == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the previous step's outputs may be overwritten
    terms = torch.zeros(4, device=device)
    align = bool(raw_model.z_dims)
    for i in range(args.grad_accum):
        with part(BATCH):
            x, y, zs_target, cls_target = prepare_batch(next(batches), encoders, args.latent_scale, args.reg, align,
                                                        device, ctx, target_norm_gamma(args))
        if args.legacy:  # the released --legacy: a second label dropout before the model's own
            y = drop_labels(y, args.cfg_prob, args.num_classes)
        last = i == args.grad_accum - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()
        with sync:
            with part(FORWARD):
                with ctx:
                    out = compute_loss(model, x, y, zs_target, cls_target, path_type=args.path_type,
                                       weighting=args.weighting, proj_coeff=args.proj_coeff, cls_weight=args.cls)
                terms += torch.stack([out["loss"].detach().float(), out["pred"].float(), out["repa"].float(),
                                      out["cls"].float()]) / args.grad_accum
            with part(BACKWARD):
                scaler.scale(out["loss"] / args.grad_accum).backward()
    grad_norm = clip_and_step(opt, scaler, params, args.max_grad_norm)
    opt.zero_grad(set_to_none=True)
    with part(EMA):
        update_ema(ema_params, params, args.ema_decay)
    return dict(zip(STATS, torch.cat([terms, grad_norm.detach().float().reshape(1)])))


def clip_and_step(opt, scaler, params, max_norm):
    """theta <- AdamW(g * min(1, max_norm / (||g|| + 1e-6))), the gradient clipped to a total norm of max_norm;
    returns ||g|| before clipping (the logged grad norm).

    With a fused AdamW and no fp16 scaler, the clip factor rides along where the optimizer reads the gradients
    anyway: the fused kernel divides each gradient by the optimizer's `grad_scale` tensor (the hook GradScaler uses to
    unscale fp16 gradients), so passing 1 / factor saves the pass over all gradients that clip_grad_norm_ makes to
    scale them in place. The update is the same up to rounding (g / (1 / c) instead of g * c). With fp16 the scaler
    owns grad_scale, so the released order stays: unscale, clip in place, step."""
    if scaler.is_enabled() or not opt.param_groups[0].get("fused"):
        scaler.unscale_(opt)
        with part(CLIP):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        with part(OPTIMIZER):
            scaler.step(opt)
            scaler.update()
        return grad_norm
    with part(CLIP):
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        opt.grad_scale = ((grad_norm + 1e-6) / max_norm).clamp_(min=1.0)
    try:
        with part(OPTIMIZER):
            opt.step()
    finally:
        del opt.grad_scale
    return grad_norm


def prepare_batch(batch, encoders, latent_scale, reg, align, device, ctx, target_norm=None):
    """(image, moments, y) -> model input x, labels, alignment targets y_* and REG's class token cls_*.

        x = (mean + std * eps) * latent_scale          (posterior sample of the stored VAE moments)

    The frozen encoders see the uint8 images under no_grad in the training autocast; their features are cast
    to fp32 for the loss. target_norm: gamma of iREPA's spatial normalization of the patch tokens (None: off)."""
    image, moments, y = (b.to(device, non_blocking=True) for b in batch)
    mean, std = moments.float().chunk(2, dim=1)
    x = (mean + std * torch.randn_like(mean)) * latent_scale
    feats = []
    if encoders:
        with torch.no_grad(), ctx:
            feats = [enc(image) for enc in encoders]
    if target_norm is not None:  # iREPA: the alignment targets only; REG's class token stays as it is
        feats = [(cls, spatial_normalize(patches.float(), target_norm)) for cls, patches in feats]
    zs_target = [repa_targets(cls.float(), patches.float(), reg) for cls, patches in feats] if align else []
    cls_target = feats[0][0].float() if reg else None
    return x, y, zs_target, cls_target


def target_norm_gamma(args):
    """gamma of --target-norm spatial (iREPA), None when the targets are used as the encoder gives them."""
    return args.target_norm_gamma if args.target_norm == "spatial" else None


def drop_labels(y, prob, null_label):
    """Each label becomes the null label with probability `prob` (classifier-free guidance training)."""
    return torch.where(torch.rand(y.shape[0], device=y.device) < prob, torch.full_like(y, null_label), y)


@torch.no_grad()
def update_ema(ema_params, model_params, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, written theta_ema + (1 - decay) * (theta - theta_ema):
    one pass over the parameters (foreach lerp) instead of two. Equal to the released arithmetic (update_ema_mul_add)
    up to fp32 rounding: docs/training.md gives the bound that tests/test_step.py checks."""
    torch._foreach_lerp_(ema_params, model_params, 1 - decay)


@torch.no_grad()
def update_ema_mul_add(ema_params, model_params, decay):
    """The released EMA arithmetic, theta_ema <- theta_ema * decay, then += theta * (1 - decay) (two foreach passes);
    bit for bit what the released per-parameter loop computes. Kept as the reference for update_ema."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, model_params, alpha=1 - decay)


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    """Parse flags, run training (or the benchmark); bad input exits with one clear message and status 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OSError as e:  # the file system failed the run (full, quota, read-only, a file gone): not a bug
        exp_dir = os.path.join(args.output_dir, args.exp_name) if args.exp_name and not args.benchmark else None
        print(f"train.py: error: {run_fault_message(e, exp_dir)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # a second Ctrl-C (the first one checkpoints), or one during set-up
        print("train.py: interrupted; the latest checkpoint in the experiment folder is intact: rerun the same "
              "command to continue from it", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args):
    """Check the flags, take the experiment folder (one writer at a time), then train in it; returns {'steps',
    'exp_dir'}, or the figures of --benchmark."""
    rank, world_size, device = setup_distributed(args.device)
    check_args(args, world_size)
    args.method = method_name(args)
    bench = args.benchmark > 0 or args.profile is not None
    exp_dir = None if bench else os.path.join(args.output_dir, args.exp_name)
    folder = None if bench else rank0_decides(lambda: ExperimentFolder(exp_dir), rank, world_size, share=False)
    try:
        return train_in_folder(args, rank, world_size, device, exp_dir, folder)
    finally:
        if folder is not None:
            folder.release()


def train_in_folder(args, rank, world_size, device, exp_dir, folder):
    """Everything after the folder is ours: data, where to start, model, then the loop (all checks before any
    compute). `folder` is None on ranks other than 0 and for --benchmark."""
    bench = exp_dir is None  # --benchmark or --profile
    dataset, num_data_classes, grid_size = resolve_data(args, bench)
    ckpt_path, notes = (None, []) if bench else rank0_decides(lambda: choose_start(args, exp_dir), rank, world_size)
    ckpt = load_resume(ckpt_path, args)
    if ckpt is not None and int(ckpt["steps"]) >= args.max_train_steps:
        if rank == 0:
            print(f"{ckpt_path} is at step {int(ckpt['steps'])} and --max-train-steps is {args.max_train_steps}: "
                  f"nothing to do (raise --max-train-steps to train further)", flush=True)
        return {"steps": int(ckpt["steps"]), "exp_dir": exp_dir}
    log = Logger(exp_dir, rank, args, start_step=int(ckpt["steps"]) if ckpt is not None else 0)
    if folder is not None:
        log.info(f"experiment folder {exp_dir} (lock held by pid {os.getpid()} on {socket.gethostname()})")
    for note in notes + folder_notes(folder) + changed_settings(ckpt, args):
        log.info(note)
    log.info(f"{args.method.upper()} | {args.model} | world size {world_size}"
             f"{f' ({dist.get_backend()})' if dist.is_initialized() else ''} on {device} | global batch {args.batch_size}"
             f" = {args.micro_batch}/device x {world_size} ranks x {args.grad_accum} accumulation | "
             f"{args.mixed_precision} autocast | data {args.data_dir if dataset is not None else 'synthetic'}")
    resumed = ckpt is not None
    try:  # set-up failures close the log files (release() may then remove a folder that this run created)
        encoders, raw_model, ema, opt, scaler = build_training(args, device, grid_size, bench, log)
        step, data_state = restore(ckpt, ckpt_path, raw_model, ema, opt, scaler, world_size, log)
        set_optimizer_flags(opt, args)  # --learning-rate & co. apply on resume (the loaded state held the old ones)
        seed_rank(args, rank, world_size, ckpt, step, device, log)
        del ckpt
        model = torch.compile(raw_model, mode=compile_mode(args)) if args.compile else raw_model
        if args.compile:  # the frozen target's forward too, its preprocessing (normalize, resize) included
            encoders = [torch.compile(enc, mode=compile_mode(args)) for enc in encoders]
        if world_size > 1:
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        model.train()
        params = [p for p in raw_model.parameters() if p.requires_grad]
        ema_params = [q for p, q in zip(raw_model.parameters(), ema.parameters()) if p.requires_grad]
        batches = make_batches(args, dataset, data_state, rank, world_size, device, num_data_classes, bench)
        monitor = make_monitor(args, rank, device, num_data_classes, bench)
    except BaseException:
        log.close()
        raise
    if folder is not None:
        folder.start(args, resumed)
    peak, peak_desc = device_peak_tflops(device, args.peak_tflops)
    log.info(f"MFU peak: {peak_desc}")

    ctx = autocast_ctx(device, args.mixed_precision)
    timer = BenchmarkTimer(args, step, device)
    profiler = StepProfiler(args.profile, timer.end_step, device, rank) if args.profile is not None else None
    total_steps = (profiler or timer).end_step if bench else args.max_train_steps
    meter = Meter(log, args, raw_model.forward_flops(), peak, total_steps)
    stop = StopSignal()  # SIGTERM / SIGINT: all ranks agree at the next step, checkpoint and exit
    log.info(f"training from step {step} to {total_steps}")
    first_step, pending, stopping = step + 1, None, False
    try:
        while step < total_steps and batches.epochs_done() < args.epochs:
            timer.tick(step)
            if profiler is not None:
                profiler.tick(step)
            stats = train_step(model, raw_model, ema_params, params, opt, scaler, batches, encoders, args, ctx,
                               device)
            step += 1
            # No host sync per step: this step's stats are read once the next step is queued. A step whose state
            # is saved or sampled (or the last, or a stop) first reads its own stats, so a non-finite value always
            # stops the run before a checkpoint or grid of the bad state.
            last = step == total_steps or batches.epochs_done() >= args.epochs  # --epochs may end it first
            with part(STATS_PART):
                current = StepStats(stats, stop.signal is not None, step, batches.epoch, world_size, device)
                if pending is not None:
                    stopping = account(pending, meter, args, exp_dir, bench, first_step) or stopping
                pending = current
                sampling = monitor is not None and (step % args.sample_every == 0 or last)
                saving = not bench and (step % args.checkpointing_steps == 0 or last)
                if stopping or saving or sampling or last:
                    stopping = account(pending, meter, args, exp_dir, bench, first_step, last) or stopping
                    pending = None
            if pending is not None:
                continue
            if not bench and (saving or stopping):
                tag = f" ({stop.signal or 'signal from another rank'})" if stopping else ""
                save_training_state(exp_dir, step, (raw_model, ema, opt, scaler), batches, args, world_size, rank,
                                    device, log, tag)
            if sampling:
                save_samples(ema, monitor, step, args, ctx, exp_dir, log)
                meter.restart_clock()  # sampling time is not training throughput
            if stopping:
                log.info(f"stopped by {stop.signal or 'a signal on another rank'} at step {step}; rerun the same "
                         f"command to continue from here")
                break
    except FloatingPointError as e:
        log.info(f"error: {e}")
        raise UsageError(str(e)) from None
    except torch.OutOfMemoryError:
        msg = out_of_memory_message(args, device, exp_dir, step)
        log.info(f"error: {msg}")
        raise UsageError(msg) from None
    finally:
        stop.restore()
        log.close()
    if bench:
        result = timer.report(step, world_size, meter.flops, peak, peak_desc, rank) if args.benchmark > 0 else {}
        if profiler is not None:
            result["profile"] = profiler.finish()
        return result
    return {"steps": step, "exp_dir": exp_dir}


def account(pending, meter, args, exp_dir, bench, first_step, last=False):
    """Read one step's stats (waiting for that step's kernels only): stop on a non-finite value, naming the step;
    add them to the log's running means and write the log line when due (every --log-every steps and at the last
    step, which the loop always reads at once). Returns whether any rank asked to stop."""
    stats, stopping = pending.read()
    check_finite(stats, pending.step, args, exp_dir)
    meter.add(stats)
    if not bench and (pending.step % args.log_every == 0 or last):
        meter.log(pending.step, pending.epoch, pending.done)
    elif not bench and pending.step == first_step:
        meter.show_first(pending.step, stats, pending.done)  # a line at once, not minutes of silence until the first --log-every
    return stopping


# torch.compile's modes (--compile-mode). On a CPU only their correctness can be checked, not their speed.
COMPILE_MODES = {
    "default": "torch's default (fusion, no CUDA graphs)",
    "max-autotune-no-cudagraphs": "also benchmarks GEMM / kernel configurations at compile time (slow to compile)",
    "max-autotune": "max-autotune-no-cudagraphs plus CUDA graphs",
    "reduce-overhead": "CUDA graphs (fewer launches; more memory)",
}


def compile_mode(args):
    """torch.compile's mode for --compile-mode ('default' is torch's own default)."""
    return None if args.compile_mode == "default" else args.compile_mode


# ----------------------------------------------------------------------------------------------------------------
# Set-up, in the order run() calls it
# ----------------------------------------------------------------------------------------------------------------

def resolve_data(args, bench):
    """The dataset (None for the synthetic --benchmark shapes) and the model configuration it implies, checked
    before any compute. Sets args.latent_*, pixel_space, num_classes, input_size, in_channels; returns
    (dataset, the dataset's number of classes, the SiT token grid size)."""
    if bench and args.data_dir != "toy":
        # Synthetic ImageNet-like batches: SD-VAE latents (4 channels, 8x down).
        args.latent_channels, args.latent_size, args.latent_scale, args.pixel_space = 4, args.resolution // 8, VAE_SCALE, False
        dataset, num_data_classes = None, 1000
    else:
        dataset = load_dataset(args)
        args.latent_channels, args.latent_size = dataset.latent_channels, dataset.latent_size
        args.latent_scale, args.pixel_space = float(dataset.latent_scale), bool(dataset.pixel_space)
        num_data_classes = dataset.num_classes
    args.num_classes = args.num_classes or num_data_classes
    if args.num_classes < num_data_classes:
        raise UsageError(f"--num-classes {args.num_classes} is smaller than the dataset's {num_data_classes} classes")
    args.input_size, args.in_channels = args.latent_size, args.latent_channels
    patch = int(args.model.split("/")[-1])
    if args.input_size % patch:
        raise UsageError(f"{args.model} needs a latent size divisible by {patch}; the data gives {args.input_size}")
    return dataset, num_data_classes, args.input_size // patch


def load_dataset(args):
    """Build the training dataset and check it against the flags (clear errors, no compute)."""
    if args.data_dir != "toy" and not os.path.exists(args.data_dir):
        raise UsageError(no_data_message(f"--data-dir {args.data_dir} does not exist.", args.data_dir,
                                         args.resolution))
    try:
        dataset = data.build_dataset(args.data_dir, args.resolution, toy_samples=args.toy_samples,
                                     toy_style=args.toy_style)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"cannot read --data-dir {args.data_dir}: {e}") from None
    if dataset.resolution != args.resolution:
        raise UsageError(f"--data-dir {args.data_dir} holds {dataset.resolution}px images but --resolution is "
                         f"{args.resolution}; pass --resolution {dataset.resolution} or preprocess the data at "
                         f"{args.resolution}px")
    if len(dataset) == 0:
        raise UsageError(f"--data-dir {args.data_dir} holds no samples")
    return dataset


def build_training(args, device, grid_size, bench, log):
    """Target encoders, SiT, its EMA copy, AdamW and the grad scaler. The same seed on every rank, so that
    random-init encoders (and the initial weights) agree. Sets args.z_dims and args.cls_dim."""
    if device.type == "cuda":
        set_tf32(args.tf32)
    seed_everything(args.seed)
    encoders = []
    if args.enc_type != "none" and args.method != "sit":
        random_init = args.random_encoder or bench
        try:
            if not random_init and not args.enc_path:  # toy-vit: trained once, then cached (every rank makes
                toy_world.ensure_toy_encoder(args.enc_type, grid_size, log=log.info,  # the same file, written
                                       style=args.toy_style)                    # atomically)
            encoders = encoders_module.load_encoders(args.enc_type, device, resolution=args.resolution,
                                                     grid_size=grid_size, enc_path=args.enc_path,
                                                     random_init=random_init, toy_style=args.toy_style)
        except WriteError:  # the trained toy encoder could not be cached: its own message names the cause
            raise
        except (OSError, ValueError, RuntimeError) as e:
            hint = "" if "--enc-path" in str(e) else ". Offline? pass --enc-path"
            raise UsageError(f"cannot load target encoder {args.enc_type!r}: {e}{hint} (--enc-type tiny-vit runs "
                             f"a smoke test without weights)") from None
        for enc in encoders:
            if enc.name == "tiny-vit" or random_init:
                log.info("!" * 100)
                log.info(f"WARNING: target encoder {enc.name!r} has RANDOM weights (smoke/test/benchmark only). "
                         "Alignment to it checks the code path, it does NOT give REPA/REG's speed-up.")
                log.info("!" * 100)
    args.z_dims = [enc.embed_dim for enc in encoders] if args.proj_coeff > 0 else []
    if args.z_dims and args.target_norm == "spatial" and grid_size ** 2 < 2:
        raise UsageError(f"--target-norm spatial normalizes over the patch tokens, but {args.model} at --resolution "
                         f"{args.resolution} has a {grid_size}x{grid_size} token grid; use a smaller patch or drop "
                         f"--target-norm")
    args.cls_dim = encoders[0].embed_dim if args.reg else None
    raw_model = SiT_models[args.model](
        input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes,
        encoder_depth=args.encoder_depth, z_dims=args.z_dims, projector_dim=args.projector_dim,
        cls_dim=args.cls_dim, class_dropout_prob=args.cfg_prob, projector=args.projector).to(device)
    raw_model.grad_checkpointing = args.grad_checkpointing
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    params = [p for p in raw_model.parameters() if p.requires_grad]
    # Fused AdamW (one kernel over all parameters; torch has it for CUDA and the CPU, the devices we run on); it also
    # takes the clip factor (clip_and_step). The implementation does not change the update beyond rounding.
    opt = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    n_params = sum(p.numel() for p in raw_model.parameters())
    log.info(f"{args.model}: {n_params:,} parameters, encoder_depth {args.encoder_depth}, z_dims {args.z_dims}, "
             f"cls_dim {args.cls_dim}; {raw_model.forward_flops() / 1e9:.2f} GFLOPs forward / image; lambda "
             f"{args.proj_coeff}" + (f", beta {args.cls}" if args.reg else ""))
    return encoders, raw_model, ema, opt, scaler


def make_batches(args, dataset, data_state, rank, world_size, device, num_data_classes, bench):
    """The endless micro-batch stream of this rank, from the resumed (epoch, item) position."""
    if bench:
        return data.SyntheticBatches(args.micro_batch, args.resolution, args.latent_channels, args.latent_size,
                                num_data_classes, pin_memory=device.type == "cuda")  # as the loader's
    sampler = data.ShardSampler(len(dataset), rank=rank, world_size=world_size, shuffle=True, seed=args.seed)
    if len(sampler) < args.micro_batch and data_state[1] == 0:
        raise UsageError(f"each rank's share of the data ({len(dataset)} // {world_size}) is smaller than the "
                         f"per-device batch {args.micro_batch}; lower --batch-size")
    # Own generator: creating a loader iterator must not draw from the global RNG (exact resumption).
    loader = DataLoader(dataset, batch_size=args.micro_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True, generator=torch.Generator(),
                        persistent_workers=args.num_workers > 0)
    return data.Batches(loader, sampler, args.micro_batch, *data_state)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------

# REG's beta (--cls) and, per method, the defaults where the released REG train.py differs from REPA's (its
# batch-size default of 8 is a debugging leftover, "#256" beside it; its train.sh passes 256, our default).
REG_BETA = 0.03
METHOD_DEFAULTS = {"repa": dict(max_train_steps=400_000, checkpointing_steps=50_000),
                   "reg": dict(max_train_steps=1_000_000, checkpointing_steps=10_000)}

# The smoke preset: a tiny SiT on the 16 px toy set (`sizes`: a centred shape per class at any size, toy_world.TOY_STYLES),
# CPU, offline, 1 to 3 minutes on 2 cores (1 min 7 s measured). The target encoder is `toy-vit`, a small ViT trained on the toy shapes by
# toy_world.train_toy_encoder on first use (cached), so that alignment has features worth aligning to; REPA and REG align
# to its patch tokens spatially normalized (iREPA's --target-norm spatial), which removes the class code they
# share and leaves the layout that the label does not say (docs/toy.md). Tuned for speed,
# not faithfulness (experiments/toy/pilots.md): a 512-wide projector (the recipe's 2048 would dominate the FLOPs
# of SiT-T), lr 3e-3, batch 32, 400 steps, EMA 0.98 (0.9999 would average over far more steps than the run has;
# 0.99 lags the fast-moving weights of so short a run), two guided grids (CFG 2; each costs ~10 s), fp32 (bf16 autocast made SiT-T/4 7x
# slower on our CPU: 2.9 vs 20 img/s). `--smoke METHOD` picks the method (SMOKE_METHODS; default reg).
SMOKE = dict(
    model="SiT-T/4", data_dir="toy", resolution=16, toy_style="sizes", enc_type="toy-vit", projector_dim=512,
    batch_size=32, learning_rate=3e-3, ema_decay=0.98, max_train_steps=400,
    checkpointing_steps=200, sample_every=200, log_every=50, num_sample_images=64, sample_steps=25,
    sample_cfg_scale=2.0, num_workers=0, mixed_precision="no", device="cpu",
)
SMOKE_METHODS = {"sit": dict(reg=False, proj_coeff=0.0, enc_type="none"),
                 "repa": dict(reg=False, target_norm="spatial"), "reg": dict(reg=True, target_norm="spatial")}


def build_parser():
    """All flags; names follow the released REPA train.py where it has one (aliases give our short names)."""
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    g = p.add_argument_group("experiment")
    g.add_argument("--output-dir", "--results-dir", dest="output_dir", default="results")
    g.add_argument("--exp-name", default=None, help="default: <model>-<method>, e.g. SiT-XL-2-reg")
    g.add_argument("--report-to", default="none", choices=["none", "wandb", "tensorboard"])
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--sample-every", "--sampling-steps", dest="sample_every", type=int, default=10000,
                   help="EMA image grid every N steps (0 = never)")
    g.add_argument("--num-sample-images", type=int, default=16)
    g.add_argument("--sample-steps", type=int, default=50, help="Euler ODE steps for the monitoring grid")
    g.add_argument("--sample-cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance of the monitoring grid (REG: also for the class token)")
    g.add_argument("--checkpointing-steps", "--ckpt-every", dest="checkpointing_steps", type=int, default=None,
                   help=f"default: {METHOD_DEFAULTS['repa']['checkpointing_steps']} (REPA release), "
                        f"{METHOD_DEFAULTS['reg']['checkpointing_steps']} with --reg (REG release)")
    g.add_argument("--resume", default=None,
                   help="checkpoint path (ours, or one written by the released REPA/REG train.py), or 'auto' = latest "
                        "in the experiment folder (a folder with checkpoints of the same configuration is continued "
                        "without it)")
    g.add_argument("--resume-step", type=int, default=0,
                   help="released spelling: resume <output-dir>/<exp-name>/checkpoints/<step:07d>.pt (0 = no)")
    g.add_argument("--smoke", nargs="?", const="reg", default=None, choices=list(SMOKE_METHODS), metavar="METHOD",
                   help="preset: tiny SiT on the toy set, CPU, offline, with the trained toy target encoder; METHOD "
                        "= sit | repa | reg (default reg). Flags given with it override the preset")
    g.add_argument("--benchmark", type=int, nargs="?", const=BENCHMARK_DEFAULT, default=0, metavar="N",
                   help=f"time N steps (alone: {BENCHMARK_DEFAULT}) on synthetic data of the real shapes after "
                        f"{BENCHMARK_WARMUP} warm-up steps, in windows of {BENCHMARK_WINDOW}; print the median "
                        f"images/s/device with its min-max over the windows, MFU and peak memory; exit")
    g.add_argument("--profile", default=None, metavar="PREFIX",
                   help=f"profile {PROFILE_STEPS} steps on synthetic data (after the warm-up and any --benchmark "
                        "steps) and write the time per part of the step (torch.profiler) to PREFIX.md and "
                        "PREFIX.json; exit")
    g.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    g.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda if available)")
    g.add_argument("--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # torch.distributed.launch
    g.add_argument("--logging-dir", action=RefusedFlag,
                   help="the logs are <output-dir>/<exp-name>/log.txt, metrics.jsonl and tensorboard/ "
                        "(--report-to tensorboard); drop the flag")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="SiT-XL/2", help=f"one of {', '.join(SiT_models)}")
    g.add_argument("--num-classes", type=int, default=None, help="default: the dataset's (1000 for ImageNet)")
    g.add_argument("--encoder-depth", type=int, default=None, help="default: 4 for SiT-B/T/S, 8 for SiT-L/XL")
    g.add_argument("--projector-dim", type=int, default=2048)
    g.add_argument("--projector", default="mlp", choices=list(PROJECTORS),
                   help="REPA's per-token MLP (default), or iREPA's 3x3 convolution over the token grid "
                        "(Singh et al. 2025, §5)")
    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True,
                   help="accepted for the released command lines: attention always runs through torch SDPA "
                        "(the same math as the released fused and unfused paths)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False,
                   help="the papers' models have no q/k normalization; only --no-qk-norm is accepted")
    g.add_argument("--ops-head", type=int, default=16, help="accepted for REG's command lines; unused (as there)")
    g.add_argument("--models", action=RefusedFlag, help="use --model (one model per run)")

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="ImageNet folder preprocessed by data.py, or 'toy'")
    g.add_argument("--data-path", action=RefusedFlag, help="use --data-dir (the flag the released train.py reads)")
    g.add_argument("--resolution", type=int, default=None,
                   help=f"image size in pixels (default: 256; {toy_world.TOY_RESOLUTION} for --data-dir toy, which warns above "
                        f"{toy_world.MAX_TOY_RESOLUTION})")
    g.add_argument("--batch-size", type=int, default=256,
                   help="global batch of one optimizer step over all ranks (with --gradient-accumulation-steps K: "
                        "of one accumulation step, as in the released train.py, so the step sees K x this)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="largest per-device forward batch; sets --grad-accum automatically")
    g.add_argument("--toy-samples", type=int, default=10000, help="size of the toy dataset (--data-dir toy)")
    g.add_argument("--toy-style", default=toy_world.TOY_STYLE, choices=list(toy_world.TOY_STYLES),
                   help="how the toy images are drawn (--data-dir toy): 'centred' one size and place per class, "
                        "'sizes' centred at any size, 'varied' any size and place (toy_world.TOY_STYLES)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data loading processes per rank (default: 4, at most the CPUs this process may use)")
    g.add_argument("--vae", default="ema", help="VAE that decodes the sample grids: ema | mse | hub id | path")

    g = p.add_argument_group("precision and speed")
    g.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"],
                   help="autocast dtype; the released code used fp16 (selectable; it adds a grad scaler)")
    g.add_argument("--tf32", "--allow-tf32", dest="tf32", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--compile", action="store_true", help="torch.compile the model and the target encoder")
    g.add_argument("--compile-mode", default="default", choices=list(COMPILE_MODES),
                   help="torch.compile mode with --compile: "
                        + "; ".join(f"{k}: {v}" for k, v in COMPILE_MODES.items()))
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")

    g = p.add_argument_group("optimization")
    g.add_argument("--max-train-steps", type=int, default=None,
                   help=f"default: {METHOD_DEFAULTS['repa']['max_train_steps']} (REPA release), "
                        f"{METHOD_DEFAULTS['reg']['max_train_steps']} with --reg (REG release)")
    g.add_argument("--epochs", type=int, default=1400)
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step; --batch-size stays the global batch of the step")
    g.add_argument("--gradient-accumulation-steps", type=int, default=None,
                   help="released meaning: --batch-size per accumulation step, so the global batch is K x "
                        "--batch-size (sets --grad-accum K)")
    g.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=1e-4)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-weight-decay", type=float, default=0.0)
    g.add_argument("--adam-epsilon", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("loss")
    g.add_argument("--path-type", default="linear", choices=["linear", "cosine"])
    g.add_argument("--prediction", default="v", choices=["v"])
    g.add_argument("--weighting", default="uniform", choices=["uniform", "lognormal"])
    g.add_argument("--cfg-prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    g.add_argument("--enc-type", default="dinov2-vit-b",
                   help="target encoder(s), comma separated; 'none' = plain SiT; 'toy-vit' (or 'toy-vit-dense', which "
                        "also knows where in the shape each patch is) = small ViT trained on the toy set (--data-dir "
                        "toy only); 'tiny-vit' = random ViT (tests, benchmarks)")
    g.add_argument("--target-norm", default="none", choices=["none", "spatial"],
                   help="spatial: normalize each image's target patch tokens over the tokens, "
                        "(f - gamma mean) / std (iREPA, Singh et al. 2025, §5); none: as the encoder gives them")
    g.add_argument("--target-norm-gamma", type=float, default=1.0, help="gamma of --target-norm spatial")
    g.add_argument("--enc-path", default=None, help="local encoder weights (offline)")
    g.add_argument("--random-encoder", action="store_true", help="random-init target encoder (tests only)")
    g.add_argument("--proj-coeff", type=float, default=0.5, help="lambda of L_REPA; 0 = plain SiT")
    g.add_argument("--repa", action="store_true", help="REPA (the default method; the flag only documents it)")
    g.add_argument("--reg", action="store_true", help="REG: entangle the target's class token")
    g.add_argument("--cls", type=float, default=None,
                   help=f"beta, weight of REG's class-token loss (default: {REG_BETA}); giving it turns on --reg, "
                        "as in REG's train.sh (the released REG train.py is always REG)")
    g.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="the released --legacy: labels are also dropped in the training loop with --cfg-prob before "
                        "the model's own dropout (twice, as in the authors' early runs)")
    return show_defaults(p)


def parse_args(argv=None):
    """Parse flags; --smoke first installs its preset as defaults, so explicit flags still override it. The released
    underscore spellings are accepted (plumbing.released_spelling); what a flag leaves unset gets the method's default."""
    argv = released_spelling(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.smoke:
        method = "repa" if pre.repa and pre.smoke == "reg" else pre.smoke  # `--smoke --repa` means REPA
        parser.set_defaults(**{**SMOKE, **SMOKE_METHODS[method], "exp_name": f"smoke-{method}"})
    args = parser.parse_args(argv)
    if args.resolution is None:  # the toy set renders at any size; its own default keeps a CPU step fast
        args.resolution = toy_world.TOY_RESOLUTION if args.data_dir == "toy" else 256
    if args.cls is not None:
        args.reg = True
    args.cls = REG_BETA if args.cls is None else args.cls
    for k, v in METHOD_DEFAULTS["reg" if args.reg else "repa"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def method_name(args):
    """'reg', 'repa' or 'sit' (no alignment, no target encoder)."""
    if args.reg:
        return "reg"
    return "repa" if args.proj_coeff > 0 and args.enc_type != "none" else "sit"


def check_args(args, world_size):
    """Everything that can be checked from the flags alone; raises UsageError before any compute.
    Resolves encoder_depth, the gradient accumulation and the per-device micro-batch."""
    if args.model not in SiT_models:
        raise UsageError(f"unknown --model {args.model!r}; choose one of: {', '.join(SiT_models)}")
    check_released_flags(args)
    check_numbers(args)
    if args.data_dir == "toy" and args.resolution > toy_world.MAX_TOY_RESOLUTION:
        print(f"train.py: warning: --resolution {args.resolution} with --data-dir toy: the toy set is trained in pixel "
              f"space, so a step costs (resolution / patch)^2 tokens and takes minutes on a CPU above "
              f"{toy_world.MAX_TOY_RESOLUTION} px; its default is {toy_world.TOY_RESOLUTION}", file=sys.stderr, flush=True)
    if args.num_workers is None:
        args.num_workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if args.reg and args.enc_type == "none":
        raise UsageError("--reg needs a target encoder for its class token: drop --enc-type none")
    if args.repa and args.reg:
        raise UsageError("--repa and --reg exclude each other (REG includes REPA's alignment term); pick one")
    toy_encoders = [n.strip() for n in args.enc_type.split(",")
                    if n.strip().lower() in encoders_module.TOY_ENCODERS]
    if args.data_dir != "toy" and toy_encoders:
        raise UsageError(f"--enc-type {toy_encoders[0]} is trained on the toy shapes and only fits --data-dir toy (got "
                         f"--data-dir {args.data_dir}); use a real encoder such as dinov2-vit-b for other data")
    if args.repa and (args.proj_coeff <= 0 or args.enc_type == "none"):
        raise UsageError("--repa needs --proj-coeff > 0 and a target encoder (--enc-type)")
    aligned = args.proj_coeff > 0 and args.enc_type != "none"
    for flag, value, off in (("--target-norm", args.target_norm, "none"), ("--projector", args.projector, "mlp")):
        if value != off and not aligned:
            raise UsageError(f"{flag} {value} changes REPA's alignment term, which this run does not have "
                             f"(--proj-coeff {args.proj_coeff}, --enc-type {args.enc_type}): drop {flag} or align "
                             f"to an encoder")
    if args.encoder_depth is None:
        args.encoder_depth = default_encoder_depth(args.model)
    depth = SIZES[args.model.split("-")[1].split("/")[0]][0]
    if args.encoder_depth > depth:
        raise UsageError(f"--encoder-depth {args.encoder_depth}: {args.model} has {depth} blocks; align after one of "
                         f"blocks 1..{depth}")
    if args.micro_batch_size:
        # Smallest accumulation that keeps every micro-batch <= the limit and splits the local batch evenly.
        local = args.batch_size // max(world_size, 1)
        args.grad_accum = next((a for a in range(max(args.grad_accum, 1), local + 1)
                                if local % a == 0 and local // a <= args.micro_batch_size), args.grad_accum)
    if args.grad_accum < 1 or args.batch_size % (world_size * args.grad_accum):
        raise UsageError(f"--batch-size {args.batch_size} (global) must be divisible by world size {world_size} x "
                         f"gradient accumulation {args.grad_accum} = {world_size * args.grad_accum}; "
                         f"change --batch-size, the number of processes, or --grad-accum")
    args.micro_batch = args.batch_size // (world_size * args.grad_accum)
    if args.report_to != "none":
        try:
            __import__("wandb" if args.report_to == "wandb" else "torch.utils.tensorboard")
        except ImportError:
            pkg = "wandb" if args.report_to == "wandb" else "tensorboard"
            raise UsageError(f"--report-to {args.report_to} needs `pip install {pkg}` (or drop --report-to); "
                             f"log.txt and metrics.jsonl are always written") from None
    if args.exp_name is None:
        args.exp_name = f"{args.model.replace('/', '-')}-{method_name(args)}"
    check_name("--exp-name", args.exp_name)  # the run stays inside --output-dir
    if args.resume_step:  # the released way to resume: a step number in the experiment's folder
        if args.resume is not None:
            raise UsageError("give either --resume or --resume-step, not both")
        args.resume = os.path.join(args.output_dir, args.exp_name, "checkpoints", f"{args.resume_step:07d}.pt")
    if not args.benchmark and args.profile is None and args.data_dir is None:
        raise UsageError(no_data_message("no --data-dir given.", resolution=args.resolution))
    return args


def check_released_flags(args):
    """Give the released train.py's flags their released meaning, or stop naming what to do instead: encoder names
    in the released spelling (`dinov2reg-vit-b`, `None`), --gradient-accumulation-steps (where
    --batch-size is the batch of one accumulation step), --qk-norm (not in the papers' models)."""
    if args.enc_type.strip().lower() == "none":
        args.enc_type = "none"
    else:
        try:
            args.enc_type = ",".join(encoders_module.canonical_name(n) for n in args.enc_type.split(",") if n.strip())
        except ValueError as e:
            raise UsageError(f"--enc-type: {e}") from None
    if args.qk_norm:
        raise UsageError("--qk-norm: the papers' SiT models (and the released checkpoints) have no q/k "
                         "normalization, and this implementation has none; drop the flag (or pass --no-qk-norm)")
    if args.gradient_accumulation_steps is not None:
        if args.grad_accum != 1 or args.micro_batch_size:
            raise UsageError("--gradient-accumulation-steps (released meaning: --batch-size per accumulation step) "
                             "cannot be combined with --grad-accum / --micro-batch-size (ours: --batch-size per "
                             "optimizer step); use one convention")
        args.grad_accum = args.gradient_accumulation_steps
        args.batch_size *= args.gradient_accumulation_steps
        args.gradient_accumulation_steps = None  # resolved: args.json and a resumed run see batch_size, grad_accum


# Numeric flags and the range argparse cannot check: (names, lowest allowed, highest allowed, what to say).
NUMBER_RANGES = [
    (("batch_size", "max_train_steps", "epochs", "log_every", "checkpointing_steps", "num_sample_images",
      "sample_steps", "toy_samples", "resolution", "grad_accum", "projector_dim", "micro_batch_size", "num_classes",
      "encoder_depth"), 1, None, "a positive integer"),
    (("sample_every", "num_workers", "benchmark", "seed", "resume_step"), 0, None,
     "an integer >= 0 (0 = off where it applies)"),
    (("learning_rate", "adam_epsilon", "max_grad_norm", "peak_tflops"), 0, None, "a positive number"),
    (("sample_cfg_scale",), 1, None, "a number >= 1 (1 = no guidance)"),
    (("proj_coeff", "cls", "adam_weight_decay", "target_norm_gamma"), 0, None, "a number >= 0"),
    (("ema_decay", "cfg_prob", "adam_beta1", "adam_beta2"), 0, 1, "a number in [0, 1]"),
]


def check_numbers(args):
    """Every numeric flag in its range (a UsageError naming the flag), e.g. --batch-size 0 or --max-train-steps -5,
    which would otherwise fail deep inside torch or end at once having done nothing."""
    for names, low, high, what in NUMBER_RANGES:
        for name in names:
            v = getattr(args, name, None)
            strict = what == "a positive number"
            if v is not None and (not math.isfinite(v) or v < low or (strict and v <= low) or (high and v > high)):
                raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {v}")


def no_data_message(what, data_dir="data/imagenet256", resolution=256):
    return (f"{what} Preprocess ImageNet (images + SD-VAE latents) with `python data.py --source IMAGENET/train "
            f"--dest {data_dir} --resolution {resolution}`, or train on the built-in toy set with --data-dir toy, or "
            f"run the offline CPU smoke preset: `python train.py --smoke`")


if __name__ == "__main__":
    main()
