"""The offline toy world: a procedural class-conditional dataset of coloured shapes, its colour / shape / joint
metric and Frechet distance, and the toy target encoders the project trains (`toy-vit`, `toy-vit-dense`,
`toy-vit-mae`). The toy experiment that uses it is toy_experiment.py (`python toy.py experiment`).

    toy_images / ToyDataset      12 classes (square, disk, triangle, plus x red, green, blue), pixel space, no files
    toy_accuracy                 colour, shape and joint accuracy of generated images against their labels
    toy_fd                       Frechet distance to real toy images on hand-made shape features (no labels needed)
    train_toy_encoder            the toy target encoders (supervised, dense, masked-patch), cached on first use

The toy world stands in for ImageNet + DINOv2 on a CPU: pixel space instead of SD-VAE latents (the VAE would cost
more than the tiny SiT), a small target encoder trained once on the toy shapes (then cached) instead of DINOv2
(whose features know nothing of these shapes), and metrics that need no Inception network.
"""
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import encoders
from frechet import frechet_distance, gaussian_statistics
from plumbing import UsageError, write_atomic


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
    # centred, flat background, any size from 0.2 to 0.4 of R: within-class variation that the label does not say
    "sizes": dict(size=(0.2, 0.4), snap=64, bright=(1.0, 1.0), bg=(0.2, 0.2), noise=0.0),
    # the toy set up to this version: random size, position, brightness, background level and pixel noise
    "varied": dict(size=(0.22, 0.34), snap=0, bright=(0.8, 1.1), bg=(0.05, 0.35), noise=0.03),
    # 8 px shapes (at 16 px) on the 4 px patch grid (3 x 3 positions) / on the 8 px grid (2 x 2), flat background
    "grid": dict(size=(0.25, 0.25), snap=4, bright=(1.0, 1.0), bg=(0.2, 0.2), noise=0.0),
    "grid8": dict(size=(0.25, 0.25), snap=8, bright=(1.0, 1.0), bg=(0.2, 0.2), noise=0.0),
}
TOY_STYLE = encoders.TOY_TRAIN["style"]
EXPERIMENT_STYLE = "sizes"  # python toy.py experiment: a set where the target knows more than the label
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
    img, labels, _, _ = _render(indices, resolution, seed, style)
    return img, labels


def toy_patch_geometry(indices, resolution=32, seed=0, style=TOY_STYLE, patch=4):
    """What each patch of toy item i sees, from the renderer: float32 [N, T, 3], T = (R / patch)^2 in row-major
    token order, holding (dx, dy, coverage): the offset of the patch centre from the shape's centre in units of
    the shape's half-size (x right, y down), and the fraction of the patch the shape covers (in [0, 1])."""
    return toy_images_with_geometry(indices, resolution, seed, style, patch)[2]


def toy_images_with_geometry(indices, resolution=32, seed=0, style=TOY_STYLE, patch=4):
    """(toy_images' images and labels, toy_patch_geometry's geometry) from one rendering."""
    img, labels, params, cover = _render(indices, resolution, seed, style)
    n, R = len(params), resolution
    g = R // patch
    centre = (np.arange(g) + 0.5) * patch
    half, cx, cy = params[:, 0, None, None], params[:, 1, None, None], params[:, 2, None, None]
    dx = np.broadcast_to((centre[None, None, :] - cx) / half, (n, g, g))
    dy = np.broadcast_to((centre[None, :, None] - cy) / half, (n, g, g))
    cov = cover[:, 0].reshape(n, g, patch, g, patch).mean(axis=(2, 4))
    return img, labels, np.stack([dx, dy, cov], -1).reshape(n, g * g, 3).astype(np.float32)


def _render(indices, resolution, seed, style):
    """toy_images' work: (uint8 images, labels, per-item [half, cx, cy, brightness, background] [N, 5] in pixels,
    shape coverage of each pixel [N, 1, R, R])."""
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
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8), labels, params, cover


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
    col, shape, _ = _toy_descriptor(images)
    return col, shape


def _toy_descriptor(images):
    """_toy_features' (chromaticity, 8x8 box mask) and the region's geometry [N, 5]: area, centroid (y, x) and
    bounding-box size (h, w), each as a fraction of the image (what the scale-invariant mask does not say)."""
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
    cy = (mask * (ar_h[:, None] + 0.5)).sum((1, 2)) / msum / H
    cx = (mask * (ar_w[None, :] + 0.5)).sum((1, 2)) / msum / W
    geo = torch.stack([msum / (H * W), cy, cx, (y1 - y0) / H, (x1 - x0) / W], dim=1)
    return col, shape, geo


# The toy Frechet distance: FID's formula on the hand-made descriptor above, which no target encoder shares.
FD_REAL_IMAGES, FD_REAL_SEED = 4096, 424242  # real images the reference statistics come from (a held-out seed)
_FD_REFERENCE = {}


def toy_fd_features(images):
    """[N, 72] features of toy-like uint8 images for toy_fd: the chromaticity (3), the 8x8 box mask (64) and the
    geometry (5: area, centroid, box size) of _toy_descriptor, each block scaled by a fixed weight so that its
    total variance over real `varied` toy images is about 1 (so the 64 mask numbers do not drown colour and size)."""
    col, shape, geo = _toy_descriptor(images)
    return torch.cat([col * FD_BLOCK_WEIGHTS[0], shape * FD_BLOCK_WEIGHTS[1], geo * FD_BLOCK_WEIGHTS[2]], 1).double()


# 1 / sqrt(total variance) of each block over 4096 real `varied` 16 px toy images (rounded); fixed
# numbers, so that the distance does not depend on the style a model is trained on.
FD_BLOCK_WEIGHTS = (2.40, 0.667, 4.41)


def _fd_reference(resolution, style):
    key = (resolution, style)
    if key not in _FD_REFERENCE:
        imgs, _ = toy_images(np.arange(FD_REAL_IMAGES), resolution, seed=FD_REAL_SEED, style=style)
        _FD_REFERENCE[key] = gaussian_statistics(toy_fd_features(torch.from_numpy(imgs)).numpy())
    return _FD_REFERENCE[key]


def toy_fd(images, resolution, style=TOY_STYLE):
    """Toy Frechet distance: FID's formula between Gaussians fitted to toy_fd_features of the generated images and
    of FD_REAL_IMAGES real toy images of `style` (held-out seed), lower is better, 0 for a perfect match:

        FD = |mu_g - mu_r|^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^(1/2))

    Unlike the accuracy it needs no labels (unconditional samples too) and it sees size and diversity: a model
    that draws every shape at one size, or only some classes, is far from the real set even if each image is
    right. Like FID it is biased upwards for few samples: compare runs at the same number of images (>= 256)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 2:
        raise UsageError(f'toy_fd expects uint8 images [N >= 2, 3, H, W], got {tuple(images.shape)} {images.dtype}')
    mu_g, sigma_g = gaussian_statistics(toy_fd_features(images.cpu()).numpy())
    return frechet_distance(mu_g, sigma_g, *_fd_reference(resolution, style))


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


def toy_class_examples(labels, resolution=32, seed=0, style=TOY_STYLE):
    """Real toy images of the given classes (uint8 [N, 3, R, R]), item label + 12 k for the k-th use of a label,
    to show next to a sample grid with these labels."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    onehot = labels[:, None] == np.arange(TOY_NUM_CLASSES)
    k = (np.cumsum(onehot, 0) - onehot)[np.arange(len(labels)), labels]  # earlier uses of the same label
    return toy_images(labels + TOY_NUM_CLASSES * k, resolution, seed, style)[0]


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


def train_toy_encoder(grid_size, path=None, steps=None, batch_size=None, objective="class", style=None, log=print):
    """Train a toy target encoder on the toy shapes and save it (timm keys, .safetensors, atomically).

    objective "class" (`toy-vit`): supervised on labels (shape x colour, 12 classes), one linear head W shared by
    all tokens, so that the class token *and every patch token* name the shape and colour of the image (the patch
    tokens of a plain classifier need not):
        L = CE(W cls, y) + 1/T sum_n CE(W f^[n], y)
    objective "dense" (`toy-vit-dense`): the same, plus a linear head G on every patch token regressing what the
    renderer says the patch sees (toy_patch_geometry: offset from the shape's centre in half-sizes, coverage):
        L = CE(W cls, y) + 1/T sum_n [ CE(W f^[n], y) + ||G f^[n] - (dx_n, dy_n, cover_n)||^2 ]
    so that patch tokens also say where in the shape they are, which the label does not (a stand-in for the
    layout DINOv2's patch tokens carry).
    objective "mae" (`toy-vit-mae`): no labels. Half of the patches of each image (at random) are blanked to 0 in
    the normalized input, and a linear head P on every patch token reconstructs the patch's normalized pixels;
    the loss is taken on the blanked patches, as in a masked autoencoder (He et al. 2022):
        L = 1/|M| sum_{n in M} ||P f^[n] - x^[n]||^2 / (3 p^2)
    so that the tokens carry what the image shows where, learnt from images alone (REPA Table 2: an MAE target
    already gives most of DINOv2's gain). Its class token gets no loss of its own. Toy images of resolution grid_size * 4 (patch 4: one token per SiT-*/4
    token), rendered with their own seed (not the training set's), normalized as TargetEncoder.preprocess does.
    AdamW, warm-up and cosine learning-rate decay, fp32. style: the toy style to train on (default TOY_TRAIN's).
    Returns the held-out class-token accuracy ("mae": the held-out reconstruction error of the blanked patches).
    """
    import timm
    from safetensors.torch import save
    from encoders import ENCODERS, TOY_OBJECTIVES, TOY_TRAIN, TargetEncoder, vit_tokens
    if objective not in TOY_OBJECTIVES:
        raise UsageError(f"toy encoder objective {objective!r}: choose one of {', '.join(TOY_OBJECTIVES)}")
    cfg, t = ENCODERS[TOY_OBJECTIVES[objective]], TOY_TRAIN
    steps, batch_size, style = steps or t["steps"], batch_size or t["batch_size"], style or t["style"]
    patch = cfg["kwargs"]["patch_size"]
    resolution = grid_size * patch
    t0 = time.time()
    log(f"training the toy target encoder {TOY_OBJECTIVES[objective]} on the {style!r} toy set ({grid_size}x"
        f"{grid_size} tokens, {steps} steps of {batch_size}) -> {path}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t["seed"])
        vit = timm.create_model(cfg["timm"], pretrained=False, num_classes=0, img_size=resolution, **cfg["kwargs"])
        head = torch.nn.Linear(vit.embed_dim, TOY_NUM_CLASSES)
        geo_head = torch.nn.Linear(vit.embed_dim, 3)  # made (and its random numbers drawn) for every objective
        pix_head = torch.nn.Linear(vit.embed_dim, 3 * patch * patch) if objective == "mae" else None
        items = np.arange(t["num_images"] + 1200)
        if objective == "dense":
            images, labels, geometry = map(torch.from_numpy, toy_images_with_geometry(items, resolution,
                                                                                      t["data_seed"], style, patch))
        else:
            images, labels = map(torch.from_numpy, toy_images(items, resolution, t["data_seed"], style))
        prep = TargetEncoder("toy-vit", vit, grid_size).preprocess  # the normalization the frozen encoder uses
        vit.requires_grad_(True)  # TargetEncoder froze it
        params = list(vit.parameters()) + list(head.parameters()) + list(geo_head.parameters())
        if pix_head is not None:
            params += list(pix_head.parameters())
            mask_gen = torch.Generator().manual_seed(t["seed"] + 1)
        opt = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(
            math.pi * s / steps)))
        order = torch.randperm(t["num_images"])
        vit.train()
        for s in range(steps):
            i = order[(s * batch_size + torch.arange(batch_size)) % t["num_images"]]
            if objective == "mae":
                loss = masked_patch_loss(vit, pix_head, prep(images[i]), patch, grid_size, mask_gen)
            else:
                cls, patches = vit_tokens(vit, prep(images[i]))
                y = labels[i]
                loss = F.cross_entropy(head(cls), y) + F.cross_entropy(head(patches).flatten(0, 1),
                                                                       y.repeat_interleave(patches.shape[1]))
            if objective == "dense":
                loss = loss + (geo_head(patches) - geometry[i]).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if (s + 1) % 100 == 0:
                log(f"  step {s + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
        vit.eval()
        with torch.no_grad():  # held-out items (the last 1200)
            if objective == "mae":
                acc = masked_patch_loss(vit, pix_head, prep(images[t["num_images"]:]), patch, grid_size,
                                        torch.Generator().manual_seed(0)).item()
            else:
                cls, _ = vit_tokens(vit, prep(images[t["num_images"]:]))
                acc = (head(cls).argmax(1) == labels[t["num_images"]:]).float().mean().item()
    if path is None:
        return acc
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    what = "held_out_mse" if objective == "mae" else "held_out_accuracy"
    meta = {"enc_type": TOY_OBJECTIVES[objective], "objective": objective, "grid_size": str(grid_size),
            what: f"{acc:.4f}", **{k: str(v) for k, v in t.items()}, "style": style,
            "steps": str(steps), "batch_size": str(batch_size)}
    write_atomic(path, save({k: v.contiguous() for k, v in vit.state_dict().items()}, metadata=meta))
    log(f"{TOY_OBJECTIVES[objective]} trained in {time.time() - t0:.0f} s: held-out "
        f"{'masked-patch MSE' if objective == 'mae' else 'class-token accuracy'} {acc:.3f}; saved {path}")
    return acc


def masked_patch_loss(vit, pix_head, x, patch, grid_size, generator, ratio=0.5):
    """train_toy_encoder's "mae" loss on a normalized batch x [N, 3, S, S]: blank a random half of the patches,
    reconstruct their pixels from the patch tokens through pix_head; mean squared error over the blanked ones."""
    from encoders import vit_tokens
    n, T = x.shape[0], grid_size * grid_size
    masked = torch.rand(n, T, generator=generator).argsort(1) < int(ratio * T)  # [N, T], exactly ratio*T each
    pixel_mask = masked.view(n, 1, grid_size, 1, grid_size, 1).float()
    xm = (x.view(n, 3, grid_size, patch, grid_size, patch) * (1 - pixel_mask)).view_as(x)
    target = x.view(n, 3, grid_size, patch, grid_size, patch).permute(0, 2, 4, 1, 3, 5).reshape(n, T, -1)
    _, tokens = vit_tokens(vit, xm)
    err = (pix_head(tokens) - target).pow(2).mean(-1)  # [N, T]
    return (err * masked).sum() / masked.sum()


def ensure_toy_encoder(enc_type, grid_size, log=print, style=None):
    """Make each cached toy target encoder (`toy-vit`, `toy-vit-dense`) for this token grid and toy style that
    --enc-type names and that is not cached yet (train_toy_encoder), so that encoders.load_encoders reads it by
    its normal path."""
    names = [encoders.canonical_name(n) for n in enc_type.split(",") if n.strip() and n.strip().lower() != "none"]
    for objective, name in encoders.TOY_OBJECTIVES.items():
        path = encoders.toy_encoder_path(grid_size, objective, style)
        if name in names and not os.path.isfile(path):
            train_toy_encoder(grid_size, path, objective=objective, style=style, log=log)
