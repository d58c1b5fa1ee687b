"""The offline toy world: a procedural class-conditional dataset of coloured shapes, its colour / shape / joint
metric, the toy target encoder the project trains (`toy-vit`), a PNG line plotter, and the toy experiment.

    toy_images / ToyDataset      12 classes (square, disk, triangle, plus x red, green, blue), pixel space, no files
    toy_accuracy                 colour, shape and joint accuracy of generated images against their labels
    train_toy_encoder            the toy-vit target encoder (supervised on the 12 classes), cached on first use
    python toy.py experiment --seeds 0 1 2
        trains SiT, REPA and REG on the toy set with the smoke preset (same seed, batch and steps), each as its own
        `python train.py ...` process; writes a table and a PNG plot of joint toy accuracy against the step

The toy world stands in for ImageNet + DINOv2 on a CPU: pixel space instead of SD-VAE latents (the VAE would cost
more than the tiny SiT), a small target encoder trained once on the toy shapes (then cached) instead of DINOv2 (whose features know
nothing of these shapes), and a metric that needs no Inception network.
"""
import argparse
import io
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import encoders
from plumbing import UsageError, run_script, write_atomic


# ---------------------------------------------------------------------------------------------------------------
# The dataset (offline, pixel space)
# ---------------------------------------------------------------------------------------------------------------

TOY_SHAPES = ('square', 'disk', 'triangle', 'plus')
TOY_COLORS = {'red': (0.86, 0.14, 0.12), 'green': (0.12, 0.74, 0.22), 'blue': (0.16, 0.28, 0.92)}
TOY_NUM_CLASSES = len(TOY_SHAPES) * len(TOY_COLORS)  # class = shape_index * 3 + color_index
TOY_RESOLUTION = 32  # what --data-dir toy renders unless --resolution says otherwise
MAX_TOY_RESOLUTION = 64  # larger toy images make a CPU step take minutes (pixel space): train.py warns
# How toy images are drawn (toy_images). The toy set trains on TOY_STYLE, the style the toy target encoder is
# trained on; the others stay reachable for the pilots of experiments/toy/pilots.md.
#   size: half-size range as a fraction of R; snap: shape boxes start on this pixel grid (0: anywhere; a grid
#   coarser than the free room leaves one, centred position); bright / bg: colour and grey background levels;
#   noise: std of the grey pixel noise.
TOY_STYLES = {
    # one size, centred, flat background: 12 distinct images that a SiT-T learns to draw within the smoke budget
    "centred": dict(size=(0.3, 0.3), snap=64, bright=(1.0, 1.0), bg=(0.2, 0.2), noise=0.0),
    # the toy set up to this version: random size, position, brightness, background level and pixel noise
    "varied": dict(size=(0.22, 0.34), snap=0, bright=(0.8, 1.1), bg=(0.05, 0.35), noise=0.03),
    # 8 px shapes (at 16 px) on the 4 px patch grid (3 x 3 positions) / on the 8 px grid (2 x 2), flat background
    "grid": dict(size=(0.25, 0.25), snap=4, bright=(1.0, 1.0), bg=(0.2, 0.2), noise=0.0),
    "grid8": dict(size=(0.25, 0.25), snap=8, bright=(1.0, 1.0), bg=(0.2, 0.2), noise=0.0),
}
TOY_STYLE = encoders.TOY_TRAIN["style"]
PROTOTYPE_STYLE = "varied"  # the metric's class prototypes: one fixed metric, whatever style a model was trained on


def toy_class_name(label):
    return f'{list(TOY_COLORS)[label % len(TOY_COLORS)]} {TOY_SHAPES[label // len(TOY_COLORS)]}'


def toy_images(indices, resolution=32, seed=0, style=TOY_STYLE):
    """Render toy items: (uint8 [N, 3, R, R], labels int64 [N]). Deterministic in (seed, index, style).

    Item i has class i % TOY_NUM_CLASSES: a coloured shape (square, disk, triangle, plus x red, green, blue),
    anti-aliased (4x4 supersampling), on a grey background (grey keeps the shape the only saturated region). Its
    size, position, brightness, background level and pixel noise are drawn as TOY_STYLES[style] says: 'centred'
    (the toy set's) fixes all of them, 'varied' draws them at random.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n, R, ss = len(indices), resolution, 4
    labels = indices % TOY_NUM_CLASSES
    st = TOY_STYLES[style]
    params = np.empty((n, 5))
    for k, i in enumerate(indices):  # a few scalars per item from its own stream: (seed, index) -> item
        r = np.random.default_rng([seed, int(i)])
        half = r.uniform(*st["size"]) * R
        if st["snap"]:
            slots = int((R - 2 * half) // st["snap"]) + 1
            cx, cy = (half + st["snap"] * r.integers(0, slots, 2)) if slots > 1 else (R / 2, R / 2)
        else:
            cx, cy = r.uniform(half + 0.5, R - half - 0.5), r.uniform(half + 0.5, R - half - 0.5)
        params[k] = [half, cx, cy, r.uniform(*st["bright"]), r.uniform(*st["bg"])]
    half, cx, cy, bright, bg = (params[:, j, None, None] for j in range(5))
    g = (np.arange(R * ss) + 0.5) / ss  # supersampled pixel centres
    u = (g[None, None, :] - cx) / half  # [N, 1, R*ss], x to the right
    v = (g[None, :, None] - cy) / half  # [N, R*ss, 1], y downwards
    shape = (labels // len(TOY_COLORS))[:, None, None]
    au, av = np.abs(u), np.abs(v)
    inside = np.where(shape == 0, np.maximum(au, av) <= 1,
             np.where(shape == 1, u * u + v * v <= 1,
             np.where(shape == 2, (av <= 1) & (au <= (v + 1) / 2),  # apex up
                      ((au <= 0.3) & (av <= 1)) | ((av <= 0.3) & (au <= 1)))))
    cover = inside.reshape(n, R, ss, R, ss).mean(axis=(2, 4))[:, None]  # [N, 1, R, R] coverage in [0, 1]
    color = np.array(list(TOY_COLORS.values()))[labels % len(TOY_COLORS)] * bright[:, :, 0]  # [N, 3]
    noise = np.stack([np.random.default_rng([seed, int(i), 1]).normal(0, st['noise'], (R, R)) for i in indices])
    backdrop = bg[:, :, :, None] + noise[:, None]  # same noise in all channels: grey
    img = backdrop * (1 - cover) + color[:, :, None, None] * cover
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8), labels


class ToyDataset(torch.utils.data.Dataset):
    """Procedural class-conditional toy images (TOY_NUM_CLASSES coloured shapes), no files, trained in pixel space.

    Same item format as ImageLatentDataset: (uint8 image [3, R, R], moments [6, R, R], label) with
    moments = [image * 2 / 255 - 1, zeros], so z = mean + 0 * eps is the image itself in [-1, 1] (latent_scale 1).
    """
    latent_scale = 1.0
    pixel_space = True
    num_classes = TOY_NUM_CLASSES
    latent_channels = 3

    def __init__(self, num_samples=10000, resolution=TOY_RESOLUTION, seed=0, style=TOY_STYLE):
        if num_samples < 1 or resolution < 8:
            raise UsageError(f'ToyDataset needs num_samples >= 1 and resolution >= 8, got {num_samples}, {resolution}')
        self.num_samples, self.resolution, self.latent_size, self.seed = num_samples, resolution, resolution, seed
        self.style = style
        self.labels = np.arange(num_samples) % TOY_NUM_CLASSES

    def __len__(self):
        return self.num_samples

    def __getitem__(self, idx):
        img, label = toy_images([idx], self.resolution, self.seed, self.style)
        image = torch.from_numpy(img[0])
        x = image.float() * (2 / 255) - 1
        return image, torch.cat([x, torch.zeros_like(x)]), int(label[0])


def _toy_features(images):
    """Shape/colour descriptor of toy-like images: (chromaticity of the saturated region [N, 3],
    its mask resampled from its bounding box to 8x8 [N, 64]). Translation and scale invariant."""
    x = torch.as_tensor(images).float() / 255  # [N, 3, H, W]
    N, _, H, W = x.shape
    # 3x3 smoothing first, so that pixel noise (e.g. of a half-trained model) does not look like colour.
    xs = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), 3, stride=1)
    chroma = xs.amax(1) - xs.amin(1)  # grey background ~0, shapes > 0.5
    mask = ((chroma - 0.1) / 0.3).clamp(0, 1)  # soft foreground mask [N, H, W]
    msum = mask.sum((1, 2)).clamp_min(1e-6)
    col = (x * mask[:, None]).sum((2, 3)) / msum[:, None]
    col = col / col.sum(1, keepdim=True).clamp_min(1e-6)  # chromaticity: brightness invariant
    # Robust bounding box: rows/columns holding at least 15% of the fullest row's/column's mass.
    rows, cols = mask.sum(2), mask.sum(1)  # [N, H], [N, W]
    rin = rows >= 0.15 * rows.amax(1, keepdim=True).clamp_min(1e-6)
    cin = cols >= 0.15 * cols.amax(1, keepdim=True).clamp_min(1e-6)
    ar_h, ar_w = torch.arange(H).float(), torch.arange(W).float()
    y0 = torch.where(rin, ar_h, float(H)).amin(1)
    y1 = torch.where(rin, ar_h, -1.0).amax(1) + 1
    x0 = torch.where(cin, ar_w, float(W)).amin(1)
    x1 = torch.where(cin, ar_w, -1.0).amax(1) + 1
    y1, x1 = torch.maximum(y1, y0 + 1), torch.maximum(x1, x0 + 1)  # empty mask -> 1-pixel box
    # Resample the box to 16x16 with bilinear grid_sample (normalized coords, align_corners=False), pool to 8x8.
    t = (torch.arange(16).float() + 0.5) / 16
    gx = (x0[:, None] + t[None] * (x1 - x0)[:, None]) / W * 2 - 1  # [N, 16]
    gy = (y0[:, None] + t[None] * (y1 - y0)[:, None]) / H * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(N, 16, 16), gy[:, :, None].expand(N, 16, 16)], dim=-1)
    shape = F.avg_pool2d(F.grid_sample(mask[:, None], grid, align_corners=False), 2).flatten(1)
    return col, shape


_TOY_PROTOTYPES = {}


def _toy_prototypes(resolution):
    """Class means of the descriptor over 48 real toy images per class (held-out seed), cached per resolution."""
    if resolution not in _TOY_PROTOTYPES:
        imgs, labels = toy_images(np.arange(48 * TOY_NUM_CLASSES), resolution, seed=1234567, style=PROTOTYPE_STYLE)
        col, shape = _toy_features(imgs)
        onehot = F.one_hot(torch.as_tensor(labels), TOY_NUM_CLASSES).float()
        cnt = onehot.sum(0)[:, None]
        _TOY_PROTOTYPES[resolution] = (onehot.T @ col / cnt, onehot.T @ shape / cnt)
    return _TOY_PROTOTYPES[resolution]


def _toy_batch(images, labels, who):
    """(uint8 images [N, 3, H, W], N long labels) as tensors, or a UsageError naming the metric `who`."""
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels).long().reshape(-1)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != labels.numel():
        raise UsageError(f'{who} expects uint8 images [N, 3, H, W] and N labels, got {tuple(images.shape)} '
                        f'{images.dtype} and {labels.numel()} labels')
    return images, labels


def toy_quality(images, labels):
    """Fraction of images that a nearest-prototype rule assigns to their conditioning class (CPU, in [0, 1]).

    Descriptor = (chromaticity of the saturated region, its 8x8 bounding-box mask); prototypes = class means
    over real toy images; distance = 4 * ||colour - colour_c||^2 + ||mask - mask_c||^2 / 64 (both terms ~1 between
    neighbouring classes). Real toy images score ~1.0; images unrelated to their labels score ~1/TOY_NUM_CLASSES.
    """
    images, labels = _toy_batch(images, labels, 'toy_quality')
    if images.shape[0] == 0:
        return float('nan')
    pcol, pshape = _toy_prototypes(images.shape[-1])
    col, shape = _toy_features(images.cpu())
    d = 4 * torch.cdist(col, pcol) ** 2 + torch.cdist(shape, pshape) ** 2 / 64
    return (d.argmin(1) == labels.cpu()).float().mean().item()


def toy_class_examples(labels, resolution=32, seed=0):
    """Real toy images of the given classes (uint8 [N, 3, R, R]), item label + 12 k for the k-th use of a label,
    to show next to a sample grid with these labels."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    onehot = labels[:, None] == np.arange(TOY_NUM_CLASSES)
    k = (np.cumsum(onehot, 0) - onehot)[np.arange(len(labels)), labels]  # earlier uses of the same label
    return toy_images(labels + TOY_NUM_CLASSES * k, resolution, seed)[0]


def toy_accuracy(images, labels):
    """Colour, shape and joint accuracy of toy-like images against their conditioning labels (CPU, each in [0, 1]).

    Two separate nearest-prototype decisions on the descriptor of `_toy_features`:
        colour = argmin_c ||chromaticity - colour_c||      over the 3 colour prototypes
        shape  = argmin_s ||8x8 box mask - mask_s||        over the 4 shape prototypes
    (prototypes: means over real toy images of that colour / shape). 'joint' counts images where both are right;
    it is the headline number, since a sample with the right colour and the wrong shape is wrong. Chance is 1/3,
    1/4 and 1/12; real toy images score ~1.0 on all three.
    Returns {'colour': float, 'shape': float, 'joint': float} (nan for an empty batch).
    """
    images, labels = _toy_batch(images, labels, 'toy_accuracy')
    if images.shape[0] == 0:
        return {'colour': float('nan'), 'shape': float('nan'), 'joint': float('nan')}
    n_col = len(TOY_COLORS)
    pcol, pshape = _toy_prototypes(images.shape[-1])  # per class, class = shape * n_col + colour
    colour_protos = pcol.view(len(TOY_SHAPES), n_col, -1).mean(0)  # [3, 3]
    shape_protos = pshape.view(len(TOY_SHAPES), n_col, -1).mean(1)  # [4, 64]
    col, shape = _toy_features(images.cpu())
    labels = labels.cpu()
    colour_ok = torch.cdist(col, colour_protos).argmin(1) == labels % n_col
    shape_ok = torch.cdist(shape, shape_protos).argmin(1) == labels // n_col
    return {'colour': colour_ok.float().mean().item(), 'shape': shape_ok.float().mean().item(),
            'joint': (colour_ok & shape_ok).float().mean().item()}


def train_toy_encoder(grid_size, path=None, steps=None, batch_size=None, log=print):
    """Train the `toy-vit` target encoder on the toy shapes and save it (timm keys, .safetensors, atomically).

    Supervised, on labels (shape x colour, 12 classes), with one linear head W shared by all tokens:
        L = CE(W cls, y) + 1/T sum_n CE(W f^[n], y)
    so that the class token *and every patch token* name the shape and colour of the image (the patch tokens of
    a plain classifier need not). Toy images of resolution grid_size * 4 (patch 4: one token per SiT-*/4 token),
    rendered with their own seed (not the training set's), normalized as TargetEncoder.preprocess does.
    AdamW, warm-up and cosine learning-rate decay, fp32 (300 steps for the 4x4 grid: 407 s single-threaded on a
    heavily loaded 2-core machine, 0.90 held-out accuracy). Returns the held-out class-token accuracy.
    """
    import timm
    from safetensors.torch import save
    from encoders import ENCODERS, TOY_TRAIN, TargetEncoder, vit_tokens
    cfg, t = ENCODERS["toy-vit"], TOY_TRAIN
    steps, batch_size = steps or t["steps"], batch_size or t["batch_size"]
    resolution = grid_size * cfg["kwargs"]["patch_size"]
    t0 = time.time()
    log(f"training the toy target encoder toy-vit ({grid_size}x{grid_size} tokens, {steps} steps of "
        f"{batch_size}) -> {path}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t["seed"])
        vit = timm.create_model(cfg["timm"], pretrained=False, num_classes=0, img_size=resolution, **cfg["kwargs"])
        head = torch.nn.Linear(vit.embed_dim, TOY_NUM_CLASSES)
        images, labels = toy_images(np.arange(t["num_images"] + 1200), resolution, seed=t["data_seed"],
                                    style=t["style"])
        images, labels = torch.from_numpy(images), torch.from_numpy(labels)
        prep = TargetEncoder("toy-vit", vit, grid_size).preprocess  # the normalization the frozen encoder uses
        vit.requires_grad_(True)  # TargetEncoder froze it
        params = list(vit.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(
            math.pi * s / steps)))
        order = torch.randperm(t["num_images"])
        vit.train()
        for s in range(steps):
            i = order[(s * batch_size + torch.arange(batch_size)) % t["num_images"]]
            cls, patches = vit_tokens(vit, prep(images[i]))
            y = labels[i]
            loss = F.cross_entropy(head(cls), y) + F.cross_entropy(head(patches).flatten(0, 1),
                                                                   y.repeat_interleave(patches.shape[1]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if (s + 1) % 100 == 0:
                log(f"  step {s + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
        vit.eval()
        with torch.no_grad():  # held-out items (the last 1200)
            cls, _ = vit_tokens(vit, prep(images[t["num_images"]:]))
            acc = (head(cls).argmax(1) == labels[t["num_images"]:]).float().mean().item()
    if path is None:
        return acc
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"enc_type": "toy-vit", "grid_size": str(grid_size), "held_out_accuracy": f"{acc:.4f}",
            **{k: str(v) for k, v in t.items()}, "steps": str(steps), "batch_size": str(batch_size)}
    write_atomic(path, save({k: v.contiguous() for k, v in vit.state_dict().items()}, metadata=meta))
    log(f"toy-vit trained in {time.time() - t0:.0f} s: held-out class-token accuracy {acc:.3f}; saved {path}")
    return acc


def ensure_toy_encoder(enc_type, grid_size, log=print):
    """Make the cached `toy-vit` target encoder for this token grid if --enc-type names it and it is not cached
    yet (train_toy_encoder), so that encoders.load_encoders reads it through its normal path."""
    names = [encoders.canonical_name(n) for n in enc_type.split(",") if n.strip() and n.strip().lower() != "none"]
    path = encoders.toy_encoder_path(grid_size)
    if "toy-vit" in names and not os.path.isfile(path):
        train_toy_encoder(grid_size, path, log=log)


# ------------------------------------------------------------------------------------------------------------------
# Line plots with PIL (no plotting dependency)
# ------------------------------------------------------------------------------------------------------------------

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    span = max(hi - lo, 1e-12)
    raw = span / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(span / s - n))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def plot_lines(path, series, title="", xlabel="", ylabel="", ylim=None, size=(720, 440)):
    """Write a PNG line plot. series: list of dicts {label, x, y[, lo, hi]}: a line with markers and, when lo/hi
    are given, a light band between them (e.g. min..max over seeds). Written atomically (write_atomic)."""
    W, H = size
    left, right, top, bottom = 70, 170, 40, 55
    xs = [v for s in series for v in s["x"]]
    ys = [v for s in series for key in ("y", "lo", "hi") for v in s.get(key, []) if v == v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = ylim or (min(ys), max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img, "RGBA")
    for t in _ticks(y0, y1):
        d.line([(left, py(t)), (W - right, py(t))], fill=(225, 225, 225))
        d.text((left - 8, py(t)), f"{t:g}", fill="black", anchor="rm")
    for t in _ticks(x0, x1, 6):
        d.line([(px(t), H - bottom), (px(t), H - bottom + 5)], fill="black")
        d.text((px(t), H - bottom + 8), f"{t:g}", fill="black", anchor="mt")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text(((left + W - right) / 2, 14), title, fill="black", anchor="mt")
    d.text(((left + W - right) / 2, H - 20), xlabel, fill="black", anchor="mt")
    d.text((8, top - 24), ylabel, fill="black", anchor="la")
    for k, s in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        if s.get("lo") is not None and s.get("hi") is not None:
            band = [(px(x), py(v)) for x, v in zip(s["x"], s["hi"])] + \
                   [(px(x), py(v)) for x, v in reversed(list(zip(s["x"], s["lo"])))]
            d.polygon(band, fill=colour + (45,))
        pts = [(px(x), py(v)) for x, v in zip(s["x"], s["y"])]
        d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 10 + 20 * k
        d.line([(W - right + 12, ly), (W - right + 36, ly)], fill=colour, width=3)
        d.text((W - right + 42, ly), s["label"], fill="black", anchor="lm")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------------------------
# The toy experiment: SiT vs REPA vs REG
# ------------------------------------------------------------------------------------------------------------------

METHODS = ("sit", "repa", "reg")


def read_curve(exp_dir, key="toy_joint"):
    """[(step, value)] of one metric from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(exp_dir, "metrics.jsonl")) if line.strip()]
    return [(r["step"], r[key]) for r in rows if key in r]


def steps_to_reach(curve, level):
    """First evaluated step whose value is >= level (None if never)."""
    return next((s for s, v in curve if v >= level - 1e-9), None)


TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def run_training(flags):
    """One training run as its own process, `python train.py FLAGS` (what a user would type; memory is freed
    between runs). A run that fails stops the experiment; its own message is printed above."""
    rc = subprocess.run([sys.executable, TRAIN_PY, *flags]).returncode
    if rc != 0:
        raise UsageError(f"`python train.py {' '.join(flags)}` exited with status {rc} (its message is above); "
                         f"rerun the same command to continue: finished runs are kept")


def flag_values(flags):
    """train.py flags as {name: value}: `--name value` and `--name=value`; a bare flag is True."""
    out, name = {}, None
    for f in flags:
        if f.startswith("--"):
            name, _, value = f.partition("=")
            out[name] = value or True
        elif name is not None:
            out[name] = f
    return out


def check_finished_run(done, flags):
    """A finished run is reused only if it was trained with the same train.py flags; another configuration is
    refused, naming the flags that differ (its results would be mixed into this table). Where the folder is
    reached from (--output-dir) is no setting."""
    with open(done) as f:
        old = json.load(f).get("flags")
    if old is None or old == flags:
        return
    a, b = flag_values(old), flag_values(flags)
    diff = [f"{k}: {a.get(k)!r} (finished run) vs {b.get(k)!r} (now)" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k != "--output-dir"]
    if diff:
        raise UsageError(f"{os.path.dirname(done)} holds a finished run of another configuration ({'; '.join(diff)}); "
                         f"pass the same flags, another --output-dir, or delete that run to retrain it")


def experiment_main(argv=None):
    p = argparse.ArgumentParser(
        prog="toy.py experiment", allow_abbrev=False,
        description="Train SiT, REPA and REG on the toy set with the smoke preset (same seed, batch and steps "
                    "for the three), several seeds; write a table and a PNG plot of joint toy accuracy against "
                    "the training step. Finished runs are reused, so a killed experiment continues. Other flags "
                    "go to train.py.")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--output-dir", default="experiments/toy",
                   help="one folder per run; metrics, args, logs and grids are small and meant to be committed")
    p.add_argument("--eval-every", type=int, default=100, help="training steps between evaluations (the smoke "
                                                               "preset's own --sample-every is 200)")
    a, extra = p.parse_known_args(argv)
    curves = {}
    t0 = time.time()
    for method in a.methods:
        for seed in a.seeds:
            name = f"{method}-seed{seed}"
            exp_dir = os.path.join(a.output_dir, name)
            flags = [f"--smoke={method}", "--seed", str(seed), "--output-dir", a.output_dir, "--exp-name", name,
                     *(["--sample-every", str(a.eval_every)] if a.eval_every else []), *extra]
            done = os.path.join(exp_dir, "done.json")
            if os.path.isfile(done):
                check_finished_run(done, flags)
            else:
                print(f"=== {name}: python train.py {' '.join(flags)}", flush=True)
                run_training(flags)
                write_atomic(done, json.dumps({"flags": flags}, indent=1).encode())
            curves[(method, seed)] = read_curve(exp_dir)
    print(f"experiment finished in {time.time() - t0:.0f} s", flush=True)
    return summarize(curves, a.methods, a.seeds, a.output_dir)


def summarize(curves, methods, seeds, out_dir):
    """Table (markdown, printed and written) and plot of mean joint accuracy +- spread (min..max over seeds)."""
    steps = sorted({s for c in curves.values() for s, _ in c})
    lines = ["| method | " + " | ".join(f"step {s}" for s in steps) + " | steps to SiT's final (per seed) |",
             "|---|" + "---|" * (len(steps) + 1)]
    mean_final_sit = None
    if "sit" in methods:
        mean_final_sit = float(np.mean([curves[("sit", s)][-1][1] for s in seeds]))
    series = []
    for m in methods:
        table = np.array([[dict(curves[(m, s)]).get(st, np.nan) for st in steps] for s in seeds])
        mean, lo, hi = np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)
        cells = [f"{mu:.3f} ± {(h - l) / 2:.3f}" for mu, l, h in zip(mean, lo, hi)]
        reach = "–"
        if mean_final_sit is not None:
            reach = ", ".join(str(steps_to_reach(curves[(m, s)], mean_final_sit) or "never") for s in seeds)
        lines.append(f"| {m.upper() if m != 'sit' else 'SiT'} | " + " | ".join(cells) + f" | {reach} |")
        series.append({"label": m.upper() if m != "sit" else "SiT", "x": steps, "y": mean.tolist(),
                       "lo": lo.tolist(), "hi": hi.tolist()})
    note = (f"mean ± half the min-max spread over seeds {', '.join(map(str, seeds))}; joint toy accuracy (shape and "
            f"colour right) of 64 EMA samples per evaluation" +
            (f"; SiT's final mean joint accuracy: {mean_final_sit:.3f}" if mean_final_sit is not None else ""))
    text = "\n".join(lines) + "\n\n" + note + "\n"
    if mean_final_sit is not None:
        text += "\n" + speedup_table(curves, methods, seeds, [0.3, 0.5, 0.7, 0.9, mean_final_sit]) + "\n"
    print(text, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "table.md"), text.encode())
    write_atomic(os.path.join(out_dir, "curves.json"), json.dumps(
        {f"{m}-seed{s}": curves[(m, s)] for m in methods for s in seeds}).encode())
    plot_lines(os.path.join(out_dir, "joint_accuracy.png"), series, title="toy set: joint accuracy of EMA samples "
               "(band: min..max over seeds)", xlabel="training step", ylabel="joint accuracy", ylim=(0, 1))
    samples_figure(out_dir, methods, seeds[0], steps)
    print(f"wrote {os.path.join(out_dir, 'table.md')}, {os.path.join(out_dir, 'joint_accuracy.png')} and "
          f"{os.path.join(out_dir, 'samples.png')}")
    return text


def speedup_table(curves, methods, seeds, levels):
    """The papers' form of the claim: per quality level, the step at which each method first reaches it (mean ±
    half the min-max spread over the seeds that reach it) and SiT's mean steps divided by the method's."""
    name = {m: m.upper() if m != "sit" else "SiT" for m in methods}
    lines = ["| joint accuracy reached | " + " | ".join(f"{name[m]}: step" for m in methods)
             + "".join(f" | speed-up of {name[m]}" for m in methods if m != "sit") + " |",
             "|---|" + "---|" * (len(methods) + sum(m != "sit" for m in methods))]
    for level in levels:
        mean = {}
        cells = []
        for m in methods:
            reached = [st for s in seeds if (st := steps_to_reach(curves[(m, s)], level)) is not None]
            if len(reached) == len(seeds):
                mean[m] = float(np.mean(reached))
                cells.append(f"{mean[m]:.0f} ± {(max(reached) - min(reached)) / 2:.0f}")
            else:
                cells.append(f"never in {len(seeds) - len(reached)} of {len(seeds)} seeds")
        ups = [f"{mean['sit'] / mean[m]:.2f}x" if "sit" in mean and m in mean else "–" for m in methods if m != "sit"]
        lines.append(f"| {level:.3f} | " + " | ".join(cells + ups) + " |")
    return "\n".join(lines)


def samples_figure(out_dir, methods, seed, steps):
    """samples.png: the first row of each run's EMA grid (same noise and labels for every method of one seed),
    one row per method, one column per evaluated step, like REPA's Fig. 4. Skipped where a grid is missing."""
    tiles = {}
    for m in methods:
        run = os.path.join(out_dir, f"{m}-seed{seed}")
        for st in steps:
            path = os.path.join(run, "samples", f"{st:07d}.png")
            if os.path.isfile(path):
                with open(os.path.join(run, "args.json")) as f:
                    res = int(json.load(f)["resolution"])
                with Image.open(path) as im:  # the grid's first row: 2 px of padding, the images, 2 px below
                    tiles[(m, st)] = im.convert("RGB").crop((0, 0, im.width, res + 4))
    if not tiles:
        return
    tw, th = next(iter(tiles.values())).size
    scale, left, top = 3, 60, 22
    fig = Image.new("RGB", (left + len(steps) * (tw * scale + 8), top + len(methods) * (th * scale + 8)), "white")
    d = ImageDraw.Draw(fig)
    for j, st in enumerate(steps):
        d.text((left + j * (tw * scale + 8) + tw * scale // 2, 6), f"step {st}", fill="black", anchor="mt")
    for i, m in enumerate(methods):
        y = top + i * (th * scale + 8)
        d.text((6, y + th * scale // 2), m.upper() if m != "sit" else "SiT", fill="black", anchor="lm")
        for j, st in enumerate(steps):
            if (m, st) in tiles:
                fig.paste(tiles[(m, st)].resize((tw * scale, th * scale), Image.NEAREST),
                          (left + j * (tw * scale + 8), y))
    buf = io.BytesIO()
    fig.save(buf, format="PNG")
    write_atomic(os.path.join(out_dir, "samples.png"), buf.getvalue())


def main(argv=None):
    """`toy.py experiment ...` (the only command); returns 0 for the shell."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "experiment":
        raise UsageError("usage: python toy.py experiment [--methods sit repa reg] [--seeds 0 1 2] [train.py flags]")
    experiment_main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(run_script("toy.py", main))
