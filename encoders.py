"""The frozen pretrained networks: target representation encoders (REPA / REG) and the SD-VAE (KL-f8).

    load_encoders   uint8 image -> (class token, patch tokens) of DINOv2 & co., grid = SiT token grid  (REPA §3)
    load_vae        image in [-1, 1] <-> posterior moments (mean, std) of the Stable-Diffusion VAE     (LDM; SiT)
    VAE_SCALE       z = 0.18215 * latent, the scale SiT is trained on

Target encoders come from timm (weights: timm's Hugging Face copies of the official checkpoints, or a local file,
or random for tests). `toy-vit` is trained on the toy shapes by toy_world.train_toy_encoder and only read here, from its
cache file (toy_encoder_path). The VAE is written here in plain torch, module for module like diffusers'
AutoencoderKL, so its public weight files (`stabilityai/sd-vae-ft-ema`, `-mse`) load without diffusers.
"""
import json
import os
import re
import socket
import urllib.parse
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import MissingFileError, UsageError, load_torch_file, show_some, state_dict_mismatch

VAE_SCALE = 0.18215

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TOY_DIM = 96  # width of the toy target encoder (REG's class token and REPA's target have this size)

# ------------------------------------------------------------------------------------------------------------------
# Target encoders
# ------------------------------------------------------------------------------------------------------------------



class ConvStemPatchEmbed(nn.Module):
    """timm's PatchEmbed interface with a small convolutional stem instead of one patchifying conv (early
    convolutions make ViTs train much faster from scratch: Xiao et al. 2021, "Early Convolutions Help Transformers
    See Better"). x [N,3,H,W] -> conv3x3 (3->D/2) - GELU - conv3x3 (D/2->D/2) - GELU - conv pxp stride p (D/2->D)
    -> tokens [N, (H/p)(W/p), D]. Used by the toy target encoder, which toy_world.train_toy_encoder trains from scratch."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, **unused):
        super().__init__()
        from timm.layers import to_2tuple
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dynamic_img_pad, self.flatten = False, True
        h = embed_dim // 2
        self.proj = nn.Sequential(nn.Conv2d(in_chans, h, 3, padding=1), nn.GELU(), nn.Conv2d(h, h, 3, padding=1),
                                  nn.GELU(), nn.Conv2d(h, embed_dim, patch_size, stride=patch_size, bias=bias))

    def feat_ratio(self, as_scalar=True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


# patch 4: a 16 px toy image gives the 4x4 token grid of SiT-*/4 (the smoke model)
_TOY = dict(patch_size=4, embed_dim=TOY_DIM, depth=4, num_heads=3, embed_layer=ConvStemPatchEmbed)

# Names as in the released REPA code (`--enc-type`), each mapped to its timm model. Fields:
#   timm        timm model name (the tag after '.' names the pretrained weights on the HF hub, None = no hub copy)
#   kwargs      architecture overrides for timm
#   mean, std   input normalization; CLIP uses its own statistics, everything else ImageNet's (released code)
#   resize_first  CLIP: resize, then normalize; the others: normalize, then resize (released `preprocess_raw_image`)
#   final_norm  apply the encoder's last LayerNorm. The released code feeds CLIP and MAE tokens *without* it
#               (its CLIP wrapper stops before ln_post, its MAE forward_features before norm); we follow it.
_TINY = dict(patch_size=4, embed_dim=192, depth=4, num_heads=3)
ENCODERS = {
    "dinov2-vit-s": dict(timm="vit_small_patch14_dinov2.lvd142m"),
    "dinov2-vit-b": dict(timm="vit_base_patch14_dinov2.lvd142m"),
    "dinov2-vit-l": dict(timm="vit_large_patch14_dinov2.lvd142m"),
    "dinov2-vit-g": dict(timm="vit_giant_patch14_dinov2.lvd142m"),
    "dinov2-vit-s-reg": dict(timm="vit_small_patch14_reg4_dinov2.lvd142m"),
    "dinov2-vit-b-reg": dict(timm="vit_base_patch14_reg4_dinov2.lvd142m"),
    "dinov2-vit-l-reg": dict(timm="vit_large_patch14_reg4_dinov2.lvd142m"),
    "dinov2-vit-g-reg": dict(timm="vit_giant_patch14_reg4_dinov2.lvd142m"),
    "dinov1-vit-b": dict(timm="vit_base_patch16_224.dino"),
    # MoCo v3 ViTs are plain timm ViTs (fixed sin-cos position embedding stored in the checkpoint) with no copy on
    # the hub: pass the released checkpoint (e.g. RCG's mocov3_vitb.pth) with --enc-path. ViT-S uses 12 heads.
    "mocov3-vit-s": dict(timm="vit_small_patch16_224", kwargs=dict(num_heads=12), hub=False),
    "mocov3-vit-b": dict(timm="vit_base_patch16_224", hub=False),
    "mocov3-vit-l": dict(timm="vit_large_patch16_224", hub=False),
    # OpenAI CLIP was trained with QuickGELU: timm's *_quickgelu_* model is the exact network.
    "clip-vit-L": dict(timm="vit_large_patch14_clip_quickgelu_224.openai", mean=CLIP_MEAN, std=CLIP_STD,
                       resize_first=True, final_norm=False),
    "mae-vit-l": dict(timm="vit_large_patch16_224.mae", final_norm=False),
    # I-JEPA has no class token; its "class token" here is the mean of its (normalized) patch tokens.
    "jepa-vit-h": dict(timm="vit_huge_patch14_gap_224.in1k_ijepa"),
    # Small random ViT for tests and benchmarks; never pretrained.
    "tiny-vit": dict(timm="vit_tiny_patch16_224", kwargs=_TINY, hub=False, random_only=True),
    # Small ViT trained by this project on the toy shapes (toy_world.train_toy_encoder), cached on first use; toy data only.
    "toy-vit": dict(timm="vit_tiny_patch16_224", kwargs=_TOY, hub=False, toy="class"),
    # The same, trained to say also where in the shape each patch is (toy_world.train_toy_encoder, objective "dense").
    "toy-vit-dense": dict(timm="vit_tiny_patch16_224", kwargs=_TOY, hub=False, toy="dense"),
    # The same network trained WITHOUT labels: masked-patch reconstruction (toy_world.train_toy_encoder, objective "mae").
    "toy-vit-mae": dict(timm="vit_tiny_patch16_224", kwargs=_TOY, hub=False, toy="mae"),
    # No network: each patch's geometry read off the clean toy image (ToyOracle); the upper bound of a target that
    # knows the layout. Toy data only.
    "toy-oracle": dict(oracle=True, hub=False),
}
_BY_LOWER = {k.lower(): k for k in ENCODERS}
# The released code spells DINOv2 with registers `dinov2reg-vit-b` (its loader reads the type from the first word).
_BY_LOWER.update({f"dinov2reg-vit-{s}": f"dinov2-vit-{s}-reg" for s in "sblg"})


def canonical_name(name):
    """Our name of an encoder given in any accepted spelling (case-insensitive, released spellings included)."""
    key = _BY_LOWER.get(name.strip().lower())
    if key is None:
        raise UsageError(f"unknown encoder {name!r}; valid --enc-type names (comma-separate several): "
                         f"{', '.join(ENCODERS)}")
    return key


class TargetEncoder(nn.Module):
    """A frozen ViT whose patch grid equals the diffusion model's token grid.

    forward(images uint8 [N,3,H,W]) -> (cls [N,D], patches [N, grid_size**2, D]):
        x = images / 255 -> normalize(mean, std) -> bicubic resize to (grid_size * patch_size)^2
            (CLIP: resize, then normalize)                                   [REPA §3; released preprocess_raw_image]
        tokens = final_norm(blocks(norm_pre([cls, registers, patch_embed(x)] + pos_embed)))
        cls = tokens[:, 0]; patches = tokens[:, num_prefix_tokens:]   (register tokens are dropped)
    Always in eval mode (train() is a no-op), parameters frozen, computed without grad.
    """

    def __init__(self, name, vit, grid_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_first=False,
                 final_norm=True):
        super().__init__()
        self.name, self.vit, self.grid_size = name, vit, grid_size
        self.embed_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.image_size = grid_size * self.patch_size  # e.g. 16 * 14 = 224 for DINOv2 under SiT-*/2 at 256 px
        self.num_prefix_tokens = vit.num_prefix_tokens  # class token + register tokens
        self.resize_first, self.final_norm = resize_first, final_norm
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode=True):
        # A frozen target: a parent's model.train() must not switch it (dropout, drop-path) to training mode.
        return super().train(False)

    def preprocess(self, images):
        """uint8 [N,3,H,W] -> normalized float [N,3,S,S], S = grid_size * patch_size (REPA §3)."""
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
                and images.shape[1] == 3):
            got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) \
                else type(images).__name__
            raise ValueError(f"encoder {self.name}: expected a uint8 image batch [N, 3, H, W] with values 0..255, "
                             f"got a {got}. (Images in [-1, 1]? use ((x + 1) * 127.5).round().clamp(0, 255)"
                             f".to(torch.uint8); channels last? use x.permute(0, 3, 1, 2).)")
        x = images.to(self.mean.device).float() / 255.0
        size = (self.image_size, self.image_size)
        if self.resize_first:
            x = F.interpolate(x, size=size, mode="bicubic") if x.shape[-2:] != size else x
            return (x - self.mean) / self.std
        x = (x - self.mean) / self.std
        # bicubic without antialias, as the released code (a no-op when the size already matches, e.g. ViT/16 at 256)
        return F.interpolate(x, size=size, mode="bicubic") if x.shape[-2:] != size else x

    @torch.no_grad()
    def forward(self, images):
        return vit_tokens(self.vit, self.preprocess(images), self.final_norm)


def vit_tokens(vit, x, final_norm=True):
    """(class token [N, D], patch tokens [N, T, D]) of a timm ViT for a preprocessed batch x (register tokens dropped;
    without a class token, e.g. I-JEPA, the mean patch token stands in for it)."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # prepends class / register tokens, adds position embedding
    x = vit.blocks(x)
    if final_norm:
        x = vit.norm(x)
    patches = x[:, vit.num_prefix_tokens:]
    cls = x[:, 0] if vit.cls_token is not None else patches.mean(dim=1)
    return cls, patches


class ToyOracle(nn.Module):
    """`toy-oracle`: a target made of what each patch of a clean toy image shows, read off the pixels (no network,
    no parameters): the upper bound of "a representation that knows the layout" and nothing else.

        mask      = chroma / max_pixels chroma,  chroma = max_c x - min_c x     the share of each pixel the shape
                    covers (exact on a flat grey background, where chroma is the shape's colour times coverage)
        centre    = mask-weighted mean pixel position;  half = sqrt(mask area) / 2  (a square's half-size)
        f^[n]     = (dx_n, dy_n, cover_n, cover of the patch's 4 quarters)   [7 numbers]
                    dx, dy: offset of the patch centre from the region's centre in half-sizes (x right, y down)
        cls       = mean_n f^[n]  (REG's class token: a summary, since the oracle knows no class)

    On the flat-background toy styles this equals the renderer's toy_world.toy_patch_geometry (up to the pixel grid)."""

    embed_dim = 7

    def __init__(self, grid_size):
        super().__init__()
        self.name, self.grid_size = "toy-oracle", grid_size

    @torch.no_grad()
    def forward(self, images):
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4):
            raise ValueError(f"toy-oracle expects uint8 images [N, 3, H, W], got {getattr(images, 'shape', images)}")
        x = images.float() / 255
        N, _, H, W = x.shape
        g = self.grid_size
        if H % (2 * g) or W % (2 * g):
            raise ValueError(f"toy-oracle: a {H}x{W} image does not split into {g}x{g} patches of even size")
        chroma = x.amax(1) - x.amin(1)  # [N, H, W]
        mask = chroma / chroma.amax((1, 2), keepdim=True).clamp_min(0.05)
        area = mask.sum((1, 2)).clamp_min(1e-6)
        ys, xs = torch.arange(H, device=x.device) + 0.5, torch.arange(W, device=x.device) + 0.5
        cy, cx = (mask * ys[:, None]).sum((1, 2)) / area, (mask * xs[None, :]).sum((1, 2)) / area
        half = area.sqrt() / 2
        centres_y = (torch.arange(g, device=x.device) + 0.5) * H / g
        centres_x = (torch.arange(g, device=x.device) + 0.5) * W / g
        dy = ((centres_y[None, :] - cy[:, None]) / half[:, None])[:, :, None].expand(N, g, g)
        dx = ((centres_x[None, :] - cx[:, None]) / half[:, None])[:, None, :].expand(N, g, g)
        quarters = F.avg_pool2d(mask[:, None], (H // (2 * g), W // (2 * g)))[:, 0]  # [N, 2g, 2g]
        q = quarters.reshape(N, g, 2, g, 2).permute(0, 1, 3, 2, 4).reshape(N, g, g, 4)
        patches = torch.cat([dx[..., None], dy[..., None], q.mean(-1, keepdim=True), q], -1).reshape(N, g * g, 7)
        return patches.mean(1), patches


def _read_weight_file(path):
    """A state dict from .safetensors, a torch pickle (.pth/.bin/.pt) or a TorchScript archive (OpenAI CLIP .pt).
    Torch pickles go through plumbing.load_torch_file; one it refuses (objects other than tensors, e.g. a training
    checkpoint's extras) is loaded as a full pickle, with a warning."""
    if not os.path.isfile(path):
        raise MissingFileError(f"weight file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        return load_torch_file(path)
    except RuntimeError as e:  # TorchScript archive (OpenAI's ViT-L-14.pt)
        if "TorchScript" not in str(e) and "constants.pkl" not in str(e):
            raise
        return torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # pickle with non-tensor objects
        warnings.warn(f"{path}: not loadable with weights_only=True ({type(e).__name__}); loading the full pickle. "
                      f"Only do this with files you trust.")
        return load_torch_file(path, trust=True)


def load_strict(module, state_dict, what):
    """module.load_state_dict(state_dict) with one readable error naming missing / unexpected / mis-shaped keys."""
    own = module.state_dict()
    missing, unexpected, wrong = state_dict_mismatch(own, state_dict)
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]
    if missing or unexpected or shapes:
        lines = [f"weights for {what} do not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {show_some(missing, 12)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {show_some(unexpected, 12)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {show_some(shapes, 12)}")
        raise UsageError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


def _mocov3_to_timm(sd):
    """MoCo v3 training checkpoint (module.base_encoder.*, with its norm13/fc13 naming slip) -> timm ViT keys."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("module.base_encoder."):
            continue
        k = k[len("module.base_encoder."):]
        k = k.replace("blocks.13.norm13", "blocks.13.norm1").replace("blocks.13.mlp.fc13", "blocks.13.mlp.fc1")
        k = k.replace("blocks.14.norm14", "blocks.14.norm2").replace("blocks.14.mlp.fc14", "blocks.14.mlp.fc2")
        out[k] = v
    return out


def _timm_state_dict(raw, vit):
    """Any supported checkpoint layout -> timm keys for `vit`, position embedding resampled to its grid.

    timm's own checkpoint filter converts the original layouts (torch.hub DINOv2 incl. registers and SwiGLU,
    OpenAI CLIP, I-JEPA 'encoder', MAE/DINO 'model') and resamples pos_embed (bicubic, antialias) exactly like
    the released code's resample_abs_pos_embed call.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn
    sd = dict(raw)
    for wrapper in ("model", "state_dict"):  # MAE and MoCo v3 checkpoints nest the weights
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = dict(sd[wrapper])
    if any(k.startswith("module.base_encoder.") for k in sd):
        sd = _mocov3_to_timm(sd)
    sd = checkpoint_filter_fn(sd, vit)
    own = vit.state_dict()
    # Classification / projection heads are not part of the representation (we build with num_classes=0).
    return {k: v for k, v in sd.items() if not (k.startswith("head.") and k not in own)}


def hub_unreachable():
    """Why the Hugging Face hub cannot be reached (no TCP connection to it within 3 s), or None. Checked before
    a download, because huggingface_hub retries for about a minute before it gives up on an offline machine. Not
    checked with HF_HUB_OFFLINE set (the hub library then answers from its cache at once) or behind a proxy."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return None
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        return f"no connection to {url.hostname}: {e.strerror or e}"
    return None


def _first_line(e):
    """An exception's first line: the hub client's messages go on for paragraphs; ours stay one line."""
    return (str(e).strip().splitlines() or [""])[0].rstrip(".")


def cached_hub_file(repo_id, filenames, subfolder=None):
    """Path of the first of `filenames` of a hub repo in the local Hugging Face cache (HF_HOME), or None."""
    from huggingface_hub import try_to_load_from_cache
    for name in filenames:
        path = try_to_load_from_cache(repo_id, f"{subfolder}/{name}" if subfolder else name)
        if isinstance(path, str):
            return path
    return None


def build_encoder(name, grid_size, enc_path=None, random_init=False, seed=0, toy_style=None, **timm_kwargs):
    """One target encoder by its REPA name; weights from the hub (timm), `enc_path`, or random (seeded).
    toy_style: for the toy encoders, the toy style whose cached file to read (default TOY_TRAIN's)."""
    import timm
    key = canonical_name(name)
    cfg = ENCODERS[key]
    if cfg.get("oracle"):
        if enc_path:
            raise UsageError(f"{key} has no weights (it computes its features from the image): drop --enc-path")
        return ToyOracle(grid_size)
    kwargs = {**cfg.get("kwargs", {}), **timm_kwargs}
    patch = kwargs.get("patch_size") or int(re.search(r"patch(\d+)", cfg["timm"]).group(1))
    kwargs.update(num_classes=0, img_size=grid_size * patch)  # pos_embed built for (and resampled to) this grid
    random_init = random_init or cfg.get("random_only", False)
    if cfg.get("toy") and not random_init and not enc_path:
        enc_path = toy_encoder_path(grid_size, cfg["toy"], toy_style)
        if not os.path.isfile(enc_path):
            raise MissingFileError(f"the toy target encoder is not trained yet ({enc_path}); train.py and "
                                   f"evaluate.py make it on first use (toy_world.ensure_toy_encoder)")
    if not random_init and not enc_path and cfg.get("hub", True) and (offline := hub_unreachable()):
        hub_id = timm.models.get_pretrained_cfg(cfg["timm"]).hf_hub_id
        enc_path = cached_hub_file(hub_id, ("model.safetensors", "pytorch_model.bin")) if hub_id else None
        if enc_path is None:
            raise OSError(f"encoder {key}: the Hugging Face hub is out of reach ({offline}) and {hub_id or cfg['timm']} "
                          f"is not in the local cache: pass the weights with --enc-path FILE, or copy a Hugging Face "
                          f"cache filled on a machine with internet to HF_HOME (~/.cache/huggingface)")
    if random_init:
        if enc_path:
            raise UsageError(f"{key}: enc_path and random_init are mutually exclusive")
        warnings.warn(f"\n{'!' * 80}\nENCODER {key} HAS RANDOM WEIGHTS (seed {seed}): REPA/REG targets are "
                      f"meaningless; use this only for smoke runs and tests.\n{'!' * 80}", stacklevel=2)
        with torch.random.fork_rng(devices=[]):  # same weights on every rank and after a resume
            torch.manual_seed(seed)
            vit = timm.create_model(cfg["timm"], pretrained=False, **kwargs)
    elif enc_path:
        with torch.device("meta"):  # skip initializing weights that the file overwrites (seconds for ViT-g)
            vit = timm.create_model(cfg["timm"], pretrained=False, **kwargs)
        if any(True for _ in vit.buffers()):  # buffers are not in the file: build them for real
            vit = timm.create_model(cfg["timm"], pretrained=False, **kwargs)
        vit = vit.to_empty(device="cpu") if next(vit.parameters()).is_meta else vit
        load_strict(vit, _timm_state_dict(_read_weight_file(enc_path), vit), f"encoder {key} from {enc_path}")
    else:
        if not cfg.get("hub", True):
            raise UsageError(f"encoder {key} has no public timm/Hugging Face weights: pass the checkpoint file with "
                             f"--enc-path (or random_init for a smoke run)")
        try:
            vit = timm.create_model(cfg["timm"], pretrained=True, **kwargs)
        except Exception as e:
            raise RuntimeError(
                f"could not get pretrained weights for encoder {key} (timm model {cfg['timm']}, Hugging Face repo "
                f"timm/{cfg['timm']}): {type(e).__name__}: {_first_line(e)}. Offline? Download them once on a machine with "
                f"internet (they are cached under ~/.cache/huggingface, HF_HOME), or pass a local weight file with "
                f"--enc-path (timm .safetensors, or the original .pth).") from e
    return TargetEncoder(key, vit.eval(), grid_size, mean=cfg.get("mean", IMAGENET_MEAN),
                         std=cfg.get("std", IMAGENET_STD), resize_first=cfg.get("resize_first", False),
                         final_norm=cfg.get("final_norm", True))


def load_encoders(enc_type, device, resolution=256, grid_size=None, enc_path=None, random_init=False,
                  toy_style=None):
    """Frozen target encoders for REPA / REG, one per comma-separated name in `enc_type`.

    grid_size: the SiT token grid (model.grid_size); default resolution // 16 (SiT-*/2 on 8x-downsampled latents).
    enc_path: local weight file, or comma-separated files in the order of the names (an empty entry = hub).
    toy_style: the toy style the toy encoders (toy-vit, toy-vit-dense) were trained on (default TOY_TRAIN's).
    Returns a list of TargetEncoder; enc(images uint8 [N,3,H,W]) -> (cls [N,D], patches [N, grid_size**2, D]).
    """
    names = [n for n in enc_type.split(",") if n.strip()]
    if not names:
        raise UsageError(f"enc_type {enc_type!r} names no encoder; valid names: {', '.join(ENCODERS)}")
    grid_size = grid_size or resolution // 16
    paths = enc_path.split(",") if enc_path else [""] * len(names)
    if len(paths) != len(names):
        raise UsageError(f"enc_path lists {len(paths)} files for {len(names)} encoders ({enc_type}); give one per "
                         f"encoder, comma-separated, leaving an entry empty to use the hub weights")
    return [build_encoder(n, grid_size, enc_path=p.strip() or None, random_init=random_init,
                          toy_style=toy_style).to(device)
            for n, p in zip(names, paths)]


# ------------------------------------------------------------------------------------------------------------------
# The toy target encoder: a small ViT that toy_world.train_toy_encoder trains on CPU on the toy shapes (toy_world.toy_images);
# only its cache file is named and read here
# ------------------------------------------------------------------------------------------------------------------

TOY_TRAIN = dict(steps=150, batch_size=128, lr=2e-3, weight_decay=0.05, num_images=24000, data_seed=1001, seed=0,
                 style="centred")  # style: the toy set's default style (toy_world.TOY_STYLES); train.py --toy-style picks
# another, and each style gets its own encoder file (trained on that style)


TOY_OBJECTIVES = {"class": "toy-vit", "dense": "toy-vit-dense", "mae": "toy-vit-mae"}  # train_toy_encoder's
TOY_ENCODERS = (*TOY_OBJECTIVES.values(), "toy-oracle")  # the target encoders that fit only the toy set


def toy_encoder_path(grid_size, objective="class", style=None):
    """Cache file of a toy encoder for a token grid: $REPA_REG_CACHE, else $XDG_CACHE_HOME/repa-reg, else
    ~/.cache/repa-reg; the name carries the objective, the grid and the training settings, so a change trains a
    new file."""
    root = os.environ.get("REPA_REG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "repa-reg")
    t = TOY_TRAIN
    # v2: the data order since toy-vit-dense (whose head is initialized, for both objectives, before the order)
    return os.path.join(root, f"{TOY_OBJECTIVES[objective]}-{style or t['style']}-grid{grid_size}-d{TOY_DIM}-"
                              f"s{t['steps']}-b{t['batch_size']}-seed{t['seed']}-v2.safetensors")


# ------------------------------------------------------------------------------------------------------------------
# SD-VAE (KL-f8), the network of diffusers' AutoencoderKL; module and parameter names are diffusers' own.
# ------------------------------------------------------------------------------------------------------------------

SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                     latent_channels=4, norm_num_groups=32)
VAE_HUB = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def _norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock2D(nn.Module):
    """h = conv2(silu(norm2(conv1(silu(norm1(x)))))); out = shortcut(x) + h  (1x1 conv shortcut when C changes)."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions: x + to_out(softmax(q k^T / sqrt(C)) v), q,k,v of GN(x)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.group_norm(x).view(n, c, h * w).transpose(1, 2)  # [N, HW, C]
        q, k, v = (proj(y).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # one head of width C
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        y = self.to_out[0](y).transpose(1, 2).reshape(n, c, h, w)
        return x + y


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after zero-padding one row/column at the bottom/right only (pad (0,1,0,1))."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        dtype = x.dtype  # nearest upsampling has no bf16 kernel on some backends; it is exact in float32
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(dtype))


class DownEncoderBlock2D(nn.Module):
    """`layers` resnet blocks, then an optional 2x resampler (the encoder's downsampler)."""
    resampler, resampler_name = Downsample2D, "downsamplers"  # the module name fixes the weight-file keys

    def __init__(self, cin, cout, layers, groups, add_resampler):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        setattr(self, self.resampler_name, nn.ModuleList([self.resampler(cout)]) if add_resampler else None)

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        resample = getattr(self, self.resampler_name)
        return resample[0](x) if resample is not None else x


class UpDecoderBlock2D(DownEncoderBlock2D):
    """The decoder's block: the same, with a 2x upsampler."""
    resampler, resampler_name = Upsample2D, "upsamplers"


class UNetMidBlock2D(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels, groups):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)])  # registered first: diffusers' key order
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        chs = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(chs[max(i - 1, 0)], c, layers_per_block, groups, add_resampler=i < len(chs) - 1)
            for i, c in enumerate(chs)])
        self.mid_block = UNetMidBlock2D(chs[-1], groups)
        self.conv_norm_out = _norm(chs[-1], groups)
        self.conv_out = nn.Conv2d(chs[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, out_channels, latent_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        chs = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, chs[0], 3, padding=1)
        self.up_blocks = nn.ModuleList([  # registered before mid_block: diffusers' key order
            UpDecoderBlock2D(chs[max(i - 1, 0)], c, layers_per_block + 1, groups, add_resampler=i < len(chs) - 1)
            for i, c in enumerate(chs)])
        self.mid_block = UNetMidBlock2D(chs[0], groups)
        self.conv_norm_out = _norm(chs[-1], groups)
        self.conv_out = nn.Conv2d(chs[-1], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The SD VAE (KL-f8): x [N,3,H,W] in [-1,1] <-> latent [N,4,H/8,W/8] (unscaled; SiT uses VAE_SCALE * latent).

    encode: moments = quant_conv(Encoder(x)); mean, logvar = moments.chunk(2); logvar <- clamp(logvar, -30, 20);
            std = exp(logvar / 2)
    decode: x = Decoder(post_quant_conv(z))   (not clamped)
    Both run in slices of `slice_size` images, without grad; the module is frozen and always in eval mode.
    """

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, slice_size=8):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels,
                           block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                           latent_channels=latent_channels, norm_num_groups=norm_num_groups)
        self.latent_channels, self.slice_size = latent_channels, slice_size
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.decoder = Decoder(out_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode=True):
        return super().train(False)  # frozen network: stays in eval mode

    def _sliced(self, fn, x, slice_size):
        n = slice_size or self.slice_size or len(x)
        return torch.cat([fn(chunk) for chunk in x.split(n)]) if len(x) > n else fn(x)

    def _moments(self, x):
        return self.quant_conv(self.encoder(x))

    @torch.no_grad()
    def encode(self, x, slice_size=None):
        """x float [N,3,H,W] in [-1,1] -> (mean, std), each [N, latent_channels, H/8, W/8]."""
        p = next(self.parameters())
        moments = self._sliced(self._moments, x.to(p.device, p.dtype), slice_size)
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return mean, torch.exp(0.5 * logvar)

    @torch.no_grad()
    def decode(self, z, slice_size=None):
        """z float [N,latent_channels,h,w] (unscaled: divide SiT latents by VAE_SCALE first) -> x [N,3,8h,8w]."""
        p = next(self.parameters())
        return self._sliced(lambda c: self.decoder(self.post_quant_conv(c)), z.to(p.device, p.dtype), slice_size)


_LEGACY_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def convert_vae_state_dict(sd):
    """Older diffusers files name the mid-block attention query/key/value/proj_attn (some as 1x1 conv weights);
    map them to to_q/to_k/to_v/to_out.0 Linear weights. Other keys pass through unchanged."""
    out = {}
    for k, v in sd.items():
        if ".attentions." in k:
            for old, new in _LEGACY_ATTENTION.items():
                if f".{old}" in k:
                    k = k.replace(f".{old}", f".{new}")
                    break
            if k.endswith(".weight") and v.ndim == 4 and "group_norm" not in k:
                v = v[:, :, 0, 0]  # conv 1x1 -> linear
        out[k] = v
    return out


def _vae_files(name_or_path):
    """(weight file, config dict or None) for a name: 'ema' | 'mse' | local dir | local file | hub repo id."""
    if os.path.isdir(name_or_path):
        for fname in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            f = os.path.join(name_or_path, fname)
            if os.path.isfile(f):
                cfg_file = os.path.join(name_or_path, "config.json")
                cfg = json.load(open(cfg_file)) if os.path.isfile(cfg_file) else None
                return f, cfg
        raise MissingFileError(f"{name_or_path}: no diffusion_pytorch_model.safetensors or .bin in this folder")
    if os.path.isfile(name_or_path):
        return name_or_path, None
    repo = VAE_HUB.get(name_or_path, name_or_path)
    if repo.count("/") not in (1, 2) or repo.startswith((".", "/")):
        raise UsageError(f"VAE {name_or_path!r} is not 'ema', 'mse', 'random', a local folder/file, or a Hugging "
                         f"Face repo id (owner/name[/subfolder])")
    from huggingface_hub import hf_hub_download
    parts = repo.split("/")
    repo_id, subfolder = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    offline = hub_unreachable()
    if offline:  # fail at once (or use the cache) instead of a minute of retries
        path = cached_hub_file(repo_id, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), subfolder)
        if path is None:
            raise OSError(f"VAE {name_or_path!r}: the Hugging Face hub is out of reach ({offline}) and {repo} is not in "
                          f"the local cache: pass a local folder or file with --vae PATH (diffusers layout, e.g. "
                          f"`hf download {repo_id}` on a machine with internet), or copy a filled cache to HF_HOME")
        cfg_file = os.path.join(os.path.dirname(path), "config.json")
        return path, (json.load(open(cfg_file)) if os.path.isfile(cfg_file) else None)
    errors = []
    for fname in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        try:
            f = hf_hub_download(repo_id, fname, subfolder=subfolder)
            try:
                cfg = json.load(open(hf_hub_download(repo_id, "config.json", subfolder=subfolder)))
            except Exception:
                cfg = None
            return f, cfg
        except Exception as e:
            errors.append(f"{fname}: {type(e).__name__}: {_first_line(e)}")
    raise RuntimeError(f"could not get the VAE weights from the Hugging Face hub repo {repo} (" + "; ".join(errors)
                       + f"). Offline? Download once with internet (`hf download {repo_id}`; cached "
                         f"under HF_HOME), or pass a local folder/file (diffusion_pytorch_model.safetensors or .bin).")


def load_vae(name_or_path, device, slice_size=8):
    """The frozen SD-VAE: 'ema' (stabilityai/sd-vae-ft-ema) | 'mse' (stabilityai/sd-vae-ft-mse) | hub repo id |
    local folder (diffusers layout, config.json honoured) or file (.safetensors/.bin) | 'random' (seeded, warns)."""
    if name_or_path == "random":
        warnings.warn(f"\n{'!' * 80}\nVAE HAS RANDOM WEIGHTS: latents and decoded images are meaningless; use this "
                      f"only for smoke runs and tests.\n{'!' * 80}", stacklevel=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = AutoencoderKL(**SD_VAE_CONFIG, slice_size=slice_size)
        return vae.to(device)
    path, cfg = _vae_files(name_or_path)
    config = dict(SD_VAE_CONFIG)
    if cfg is not None:
        for k in config:
            if k in cfg:
                config[k] = tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k]
        unsupported = (cfg.get("act_fn", "silu") != "silu"
                       or any(b != "DownEncoderBlock2D" for b in cfg.get("down_block_types", []))
                       or any(b != "UpDecoderBlock2D" for b in cfg.get("up_block_types", []))
                       or not all(cfg.get(k, True) for k in ("mid_block_add_attention", "use_quant_conv",
                                                             "use_post_quant_conv")))
        if unsupported:
            raise UsageError(f"{name_or_path}: config.json describes a VAE variant this KL-f8 implementation does not "
                             f"support (expected act_fn silu, DownEncoderBlock2D/UpDecoderBlock2D blocks, mid-block "
                             f"attention, quant_conv and post_quant_conv)")
    with torch.device("meta"):  # no point initializing weights that are overwritten next
        vae = AutoencoderKL(**config, slice_size=slice_size)
    sd = convert_vae_state_dict(_read_weight_file(path))
    vae = vae.to_empty(device="cpu")
    load_strict(vae, sd, f"VAE from {path}")
    return vae.to(device)
