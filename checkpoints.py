"""Checkpoints: writing them, reading them back, and continuing a run exactly where it stopped; also the
checkpoints of the released REPA / REG train.py.

checkpoints/<step:07d>.pt = {model, ema, opt, args, steps} like the released code, plus what exact resumption
needs: the grad scaler, the data position (epoch, item), every rank's RNG state and the world size. Files are
written atomically and fsynced (plumbing.write_atomic), so the latest complete checkpoint is never replaced by a
partial one. A resumed run restores weights, EMA, AdamW, the scaler, the RNG streams of each rank and the data
position, so that it continues bit for bit; a released checkpoint restores weights, EMA, AdamW (matched by
parameter name) and the step.
"""
import argparse
import os
import random
import re

import numpy as np
import torch

import encoders
from model import detect_model_config
from plumbing import (UsageError, WriteError, all_gather, load_torch_file, os_error_advice, strip_prefixes,
                      write_atomic)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def save_training_state(exp_dir, step, nets, batches, args, world_size, rank, device, log, tag=""):
    """All ranks gather their RNG state; rank 0 writes checkpoints/<step>.pt atomically: {model, ema, opt, args,
    steps} like the released code, plus what exact resumption needs (scaler, data position, RNG, world size)."""
    raw_model, ema, opt, scaler = nets
    rngs = all_gather(get_rng_state(device), world_size)
    if rank != 0:
        return
    path = os.path.join(exp_dir, "checkpoints", f"{step:07d}.pt")
    if not os.path.isdir(os.path.dirname(path)):  # made at the start: someone deleted (or unmounted) it since
        log.info(f"warning: {os.path.dirname(path)} vanished during the run (deleted, moved or unmounted); writing "
                 f"this checkpoint into a new one (the run's log.txt and metrics.jsonl went with the old folder)")
    save_checkpoint({"model": raw_model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "args": vars(args), "steps": step, "scaler": scaler.state_dict(),
                     "data": [batches.epoch, batches.pos], "rng": rngs, "world_size": world_size}, path)
    log.info(f"saved checkpoint {path}{tag}")


def save_checkpoint(obj, path):
    """torch.save to `path` atomically (write_atomic, fsynced): a crash or kill mid-write leaves at most a
    stale temp file; an existing good checkpoint is never replaced by a partial one. A write the file system
    refuses (full disk, quota, read-only or vanished folder) is a UsageError naming the cause, the intact
    previous checkpoint and what to do."""
    previous = latest_checkpoint(os.path.dirname(path) or ".")
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_atomic(path, lambda f: torch.save(obj, f), fsync=True)
    except OSError as e:  # WriteError from write_atomic (the cause in words), or makedirs' own
        what, todo = (e.cause, e.todo) if isinstance(e, WriteError) else os_error_advice(e)
        raise UsageError(f"could not write checkpoint {path} ({what}); nothing was written under that name. "
                         + (f"The previous checkpoint {previous} is intact: {todo} and rerun the same command to "
                            f"continue from it." if previous else
                            f"There is no earlier checkpoint: {todo} and rerun the same command.")) from None


def latest_checkpoint(checkpoint_dir):
    """Path of the highest-step `<step:07d>.pt` in the folder, or None (temp files are ignored)."""
    found = checkpoint_steps(checkpoint_dir)
    return found[max(found)] if found else None


def checkpoint_steps(checkpoint_dir):
    """{step: path} of the `<step:07d>.pt` files in the folder, in step order (temp files are ignored)."""
    if not os.path.isdir(checkpoint_dir):
        return {}
    steps = sorted(int(m.group(1)) for f in os.listdir(checkpoint_dir) if (m := re.fullmatch(r"(\d+)\.pt", f)))
    return {s: os.path.join(checkpoint_dir, f"{s:07d}.pt") for s in steps}


# ----------------------------------------------------------------------------------------------------------------
# Reading and resuming (ours and the released train.py's)
# ----------------------------------------------------------------------------------------------------------------

# What must agree between a checkpoint and the run that resumes it (anything else may change, e.g. the path).
RESUME_KEYS = ("model", "input_size", "in_channels", "num_classes", "encoder_depth", "projector_dim", "enc_type",
               "reg", "method", "path_type", "resolution", "projector", "target_norm")


def check_resume_compatible(ckpt_args, args, path):
    """Raise UsageError naming every setting where the checkpoint's run differs from this one."""
    diffs = [f"{k}: checkpoint {ckpt_args.get(k)!r} vs now {getattr(args, k)!r}"
             for k in RESUME_KEYS if k in ckpt_args and ckpt_args.get(k) != getattr(args, k)]
    if diffs:
        raise UsageError(f"--resume {path} was trained with other settings: " + "; ".join(diffs) +
                         ". Pass the same --model / --reg / --enc-type / --proj-coeff / --encoder-depth / data as "
                         "that run, or start a new experiment (--exp-name).")


def load_resume(path, args):
    """Load the checkpoint a run starts from (every rank, on the CPU, memory-mapped) and check that it fits this
    model; None for a fresh start."""
    if path is None:
        return None
    ckpt = read_checkpoint(path)
    check_resume_compatible(ckpt.get("args") or {}, args, path)
    return ckpt


def read_checkpoint(path):
    """torch.load a training checkpoint (weights only, memory-mapped); a file that is not one gives a UsageError."""
    try:
        ckpt = load_torch_file(path)  # weights only; the released train.py's pickled args Namespace is allowed
    except Exception as e:  # a torn or foreign file: say which file, not a deep unpickling trace
        raise UsageError(f"--resume {path} is not a readable training checkpoint ({type(e).__name__}; truncated, "
                         f"or not written by torch.save): pass another file, or --resume auto") from None
    if not isinstance(ckpt, dict) or not {"model", "ema", "opt", "steps"} <= set(ckpt):
        raise UsageError(f"--resume {path} is not a training checkpoint of this script (it lacks model/ema/opt/steps; "
                         "released weights are for sampling, not for resuming)")
    if isinstance(ckpt.get("args"), argparse.Namespace):  # written by the released REPA / REG train.py
        ckpt = from_released_checkpoint(ckpt)
    return ckpt


def from_released_checkpoint(ckpt):
    """A checkpoint of the released REPA / REG train.py, {'model', 'ema', 'opt', 'args': Namespace, 'steps'}, in
    our terms: its settings as the dict check_resume_compatible compares (the architecture read from the weights,
    the rest from the Namespace), marked 'released' so that restore() maps its optimizer state."""
    sd = strip_prefixes(ckpt["model"])
    try:
        config = detect_model_config(sd)
    except ValueError as e:
        raise UsageError(f"--resume: the released checkpoint's weights are not a SiT: {e}") from None
    ns = vars(ckpt["args"])
    enc_type = str(ns.get("enc_type", "dinov2-vit-b"))
    if enc_type.lower() != "none":
        enc_type = ",".join(encoders.canonical_name(n) for n in enc_type.split(","))
    method = "reg" if config["cls_dim"] else ("repa" if config["z_dims"] else "sit")
    args = dict(model=config["model"], input_size=config["input_size"], in_channels=config["in_channels"],
                num_classes=config["num_classes"], projector_dim=config["projector_dim"], reg=method == "reg",
                method=method, enc_type="none" if enc_type.lower() == "none" else enc_type,
                **{k: ns[k] for k in ("encoder_depth", "path_type", "resolution") if k in ns})
    return {**ckpt, "model": sd, "args": args, "released": True}


def released_optimizer_state(opt_state, released_names, raw_model, opt):
    """The released optimizer state in our layout. The released AdamW covers every parameter in the order of the
    released model's state dict (the frozen position embedding included, which never gets a state); ours covers
    the trainable ones in our order. Entries are matched by name through that order, and their shapes checked.
    The implementation flags (fused / foreach) stay ours; lr, betas, eps and weight decay come from the file."""
    groups = opt_state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(released_names):
        raise UsageError(f"the released checkpoint's optimizer lists {sum(len(g['params']) for g in groups)} "
                         f"parameters in {len(groups)} group(s), its model {len(released_names)}: cannot match them")
    released_id = dict(zip(released_names, groups[0]["params"]))
    ours = [(name, p) for name, p in raw_model.named_parameters() if p.requires_grad]
    state = {}
    for i, (name, p) in enumerate(ours):
        entry = opt_state["state"].get(released_id[name])
        if entry is None:
            continue
        wrong = [k for k, v in entry.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape]
        if wrong:
            raise UsageError(f"the released checkpoint's optimizer state {wrong} of {name} has shape "
                             f"{tuple(entry[wrong[0]].shape)}, the parameter {tuple(p.shape)}")
        state[i] = entry
    hyper = {k: groups[0][k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize") if k in groups[0]}
    group = {**opt.state_dict()["param_groups"][0], **hyper, "params": list(range(len(ours)))}
    return {"state": state, "param_groups": [group]}


def restore(ckpt, ckpt_path, raw_model, ema, opt, scaler, world_size, log):
    """Load a resumed checkpoint's weights and optimizer; returns (step, (epoch, item)) of the data stream."""
    if ckpt is None:
        return 0, (0, 0)
    try:
        raw_model.load_state_dict(ckpt["model"])
        ema.load_state_dict(strip_prefixes(ckpt["ema"]))
        released = ckpt.get("released", False)
        opt.load_state_dict(released_optimizer_state(ckpt["opt"], list(ckpt["model"]), raw_model, opt) if released
                            else ckpt["opt"])
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--resume {ckpt_path} does not fit this model: {str(e)[:500]}") from None
    if "scaler" in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    step, data_state = int(ckpt["steps"]), tuple(ckpt.get("data", (0, 0)))
    if ckpt.get("world_size", world_size) != world_size:  # other shards: restart the epoch's data order
        log.info(f"warning: checkpoint was written by {ckpt.get('world_size')} ranks, now {world_size}: "
                 f"the data position restarts at the beginning of epoch {data_state[0]}")
        data_state = (data_state[0], 0)
    log.info(f"resumed from {ckpt_path} at step {step} (epoch {data_state[0]}, item {data_state[1]})")
    if released:
        log.info("released checkpoint: weights, EMA, AdamW state (matched by parameter name) and the step are "
                 "restored; it holds no RNG state and no data position, so the RNG streams are reseeded from --seed "
                 "and the step, and the data order starts a fresh shuffle (epoch 0)")
    return step, data_state


def set_optimizer_flags(opt, args):
    """The AdamW hyperparameters of the flags, also after loading an optimizer state (which holds the old ones):
    a learning rate lowered on resume must reach the optimizer."""
    for group in opt.param_groups:
        group.update(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                     weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                     fused=opt.defaults["fused"], foreach=opt.defaults["foreach"])  # this run's kernels, not the file's


# ----------------------------------------------------------------------------------------------------------------
# RNG streams
# ----------------------------------------------------------------------------------------------------------------

def seed_rank(args, rank, world_size, ckpt, step, device, log):
    """Per-rank randomness (noise, t, label dropout) like the released code; a resumed run takes back the exact
    RNG streams its checkpoint saved."""
    seed_everything(args.seed + rank)
    if ckpt is None:
        return
    rng = ckpt.get("rng") or []
    if len(rng) == world_size:
        set_rng_state(rng[rank], device)
    else:
        if rng:  # (a released checkpoint has none; restore() says so)
            log.info(f"warning: checkpoint was written by {len(rng)} ranks, now {world_size}: RNG streams reseeded "
                     "(training continues correctly but not bit-identically)")
        seed_everything(args.seed + rank + 1000003 * step)


def seed_everything(seed):
    """Seed python, numpy, torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state(device):
    """This process's RNG states, as types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """Inverse of get_rng_state."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
