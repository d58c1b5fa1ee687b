"""SiT (Scalable Interpolant Transformer) with the REPA projector and the REG class token.

    x [N,C,H,W] --patchify--> tokens + 2-D sin-cos position --> `depth` adaLN-Zero blocks, conditioned on
    c = t_emb + y_emb --> final adaLN layer --> linear --> unpatchify --> velocity v [N,C,H,W]

REPA: after block `encoder_depth` the hidden tokens h_t go through a projector MLP h_phi per target encoder
(zs = h_phi(h_t), aligned to the encoder's features in losses.repa_loss).
REG: the noisy class token cls_t of the target encoder enters as an extra first token
LayerNorm(Linear(cls_t)) and leaves through its own output Linear as the class-token velocity.

State-dict names equal the authors' released code, so the released REPA / REG checkpoints load strictly
(see `load_released_state_dict`).
"""
import argparse
import math
import os
import pickle
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from plumbing import MissingFileError, UsageError, load_torch_file, state_dict_mismatch, strip_prefixes


def modulate(x, shift, scale):
    """adaLN modulation: x * (1 + scale) + shift, with (shift, scale) per sample broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """t -> MLP(freq(t)): 256 sinusoidal frequencies, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """freq(t) = [cos(t w_0..w_{d/2-1}), sin(t w_0..w_{d/2-1})],  w_i = max_period^(-i/(d/2)).
        The model sees t in [0, 1] itself, not 1000 t (as the released SiT/REPA code)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """y -> table[y]; row `num_classes` is the null label used for classifier-free guidance.
    During training each label is replaced by the null label with probability `dropout_prob`."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # always keep the null row
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> hidden_size tokens (a conv with kernel = stride = p)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, T, D], row-major over the patch grid


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2-D sin-cos position embedding [grid*grid, D] (MAE / DiT convention), tokens in row-major order:
    the first D/2 channels encode the column index, the last D/2 the row index, each half as
    [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (D/4)), k = 0..D/4-1."""
    def one_dim(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([one_dim(embed_dim // 2, grid_w), one_dim(embed_dim // 2, grid_h)], axis=1)


# --------------------------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias), through PyTorch SDPA
    (flash / memory-efficient kernels on GPU). Same parameters and math as timm's Attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (hidden = mlp_ratio * dim)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """adaLN-Zero block:
        (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c))
        x = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)
        x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)
    LN has no affine parameters (eps 1e-6); the modulation Linear is zero-initialized, so each block starts as
    the identity."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """x = Linear(LN(x) * (1 + scale) + shift), (shift, scale) = Linear(SiLU(c)).
    With REG, token 0 (the class token) goes through its own `linear_cls` to a cls_dim velocity."""

    def __init__(self, hidden_size, patch_size, out_channels, cls_dim=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if cls_dim is not None:
            self.linear_cls = nn.Linear(hidden_size, cls_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c, has_cls=False):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        if not has_cls:
            return self.linear(x), None
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


PROJECTORS = ("mlp", "conv")  # REPA's per-token MLP (the recipe) | iREPA's 3x3 convolution over the token grid


def build_mlp(hidden_size, projector_dim, z_dim):
    """REPA projector h_phi: Linear(hidden, P) - SiLU - Linear(P, P) - SiLU - Linear(P, z_dim)."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


class ConvProjector(nn.Module):
    """iREPA's projector h_phi (Singh et al. 2025, arXiv 2512.10794, §5): one 3x3 convolution over the token grid
    instead of the per-token MLP, so that each projected token also sees its neighbours:

        h_phi(h)[i, j] = sum_{|di|, |dj| <= 1} W_{di,dj} h[i + di, j + dj] + b      (zero padding at the border)

    With REG the class token (position 0) has no grid position: it goes through its own Linear(hidden, z_dim)."""

    def __init__(self, hidden_size, z_dim, grid_size, has_cls=False):
        super().__init__()
        self.grid_size = grid_size
        self.conv = nn.Conv2d(hidden_size, z_dim, kernel_size=3, padding=1)
        self.cls = nn.Linear(hidden_size, z_dim) if has_cls else None

    def forward(self, h):
        cls, h = (h[:, :1], h[:, 1:]) if self.cls is not None else (None, h)
        n, T, D = h.shape
        grid = h.transpose(1, 2).reshape(n, D, self.grid_size, self.grid_size)  # row-major tokens -> [N, D, g, g]
        z = self.conv(grid).flatten(2).transpose(1, 2)
        return z if cls is None else torch.cat([self.cls(cls), z], dim=1)


class SiT(nn.Module):
    """SiT backbone + REPA projectors (one per entry of z_dims) + optional REG class token (cls_dim)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, encoder_depth=8, z_dims=(768,),
                 projector_dim=2048, cls_dim=None, projector="mlp"):
        super().__init__()
        z_dims = list(z_dims or [])
        # The first two are reachable from flags (train.py --model / --resolution, --encoder-depth): bad input.
        if input_size % patch_size:
            raise UsageError(f"input_size={input_size} (latent size) must be divisible by patch_size={patch_size}; "
                             f"allowed input sizes are multiples of {patch_size}")
        if z_dims and not 1 <= encoder_depth <= depth:
            raise UsageError(f"encoder_depth={encoder_depth} must be in 1..{depth} (the model's depth)")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes, self.encoder_depth, self.z_dims, self.projector_dim = num_classes, encoder_depth, z_dims, projector_dim
        self.cls_dim = cls_dim
        self.grid_size = input_size // patch_size
        self.grad_checkpointing = False  # activation checkpointing per block (train.py --grad-checkpointing)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos embedding, stored as a frozen parameter like the released code (it is in the state dict
        # and in the released parameter count). REG prepends a zero row for the class token [code].
        num_tokens = self.grid_size ** 2 + (cls_dim is not None)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        if projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {projector!r}")
        self.projector = projector
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) if projector == "mlp" else
                                         ConvProjector(hidden_size, z, self.grid_size, cls_dim is not None)
                                         for z in z_dims])
        if cls_dim is not None:
            # REG class-token input: cls_t' = LayerNorm(Linear(cls_t)), affine LayerNorm, eps 1e-6 [code].
            self.cls_projectors2 = nn.Linear(cls_dim, hidden_size)
            self.wg_norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, cls_dim)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT/SiT init: xavier-uniform Linear weights and zero biases; patch embedding like a Linear;
        N(0, 0.02) label table and time-MLP weights; zero adaLN modulations and zero output layer(s), so the
        initial model outputs v = 0 for any input (adaLN-Zero)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        pos = torch.from_numpy(get_2d_sincos_pos_embed(self.hidden_size, self.grid_size)).float()
        self.pos_embed.data[0, -pos.shape[0]:].copy_(pos)  # row 0 stays zero for the REG class token

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        final = self.final_layer
        for layer in [final.adaLN_modulation[-1], final.linear] + ([final.linear_cls] if self.cls_dim else []):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """[N, T, p*p*C] -> [N, C, H, W]."""
        p, c, g = self.patch_size, self.in_channels, self.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, y, cls=None):
        """v_theta(x_t, t, y[, cls_t]) -> (v, zs, cls_v).

        x: [N, C, H, W] noisy latents, t: [N] times in [0, 1], y: [N] labels (num_classes = null),
        cls: [N, cls_dim] noisy class token (REG only). zs: projected tokens after block `encoder_depth`
        (one [N, T, z_dim] tensor per target encoder; T includes the class token with REG). cls_v: REG's
        class-token velocity or None."""
        if self.cls_dim is not None and cls is None:
            raise ValueError("this is a REG model (cls_dim is set): pass the noisy class token as "
                             f"cls=[N, {self.cls_dim}] (pure noise at t=1 when sampling)")
        if self.cls_dim is None and cls is not None:
            raise ValueError("cls was given but the model has no class-token layers (build it with cls_dim=... for REG)")
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"x has spatial size {tuple(x.shape[-2:])}, the model expects "
                             f"{self.input_size}x{self.input_size} (input_size)")
        h = self.x_embedder(x)
        if cls is not None:
            h = torch.cat([self.wg_norm(self.cls_projectors2(cls)).unsqueeze(1), h], dim=1)
        h = h + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        zs = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
            if i + 1 == self.encoder_depth:
                zs = [projector(h) for projector in self.projectors]
        h, cls_v = self.final_layer(h, c, has_cls=cls is not None)
        return self.unpatchify(h), zs, cls_v

    def forward_flops(self):
        """Matmul FLOPs (2 per multiply-add) of one forward pass for one sample; training costs about 3x."""
        D, T, P = self.hidden_size, self.grid_size ** 2 + (self.cls_dim is not None), self.patch_size
        out = P * P * self.in_channels
        per_block = 2 * D * 6 * D + 2 * T * D * (3 * D + D + 2 * 4 * D) + 2 * 2 * T * T * D
        flops = 2 * T * out * D + 2 * (256 * D + D * D) + self.depth * per_block + 2 * D * 2 * D + 2 * T * D * out
        for z in self.z_dims:
            if self.projector == "conv":
                flops += 2 * T * 9 * D * z
            else:
                flops += 2 * T * (D * self.projector_dim + self.projector_dim ** 2 + self.projector_dim * z)
        if self.cls_dim is not None:
            flops += 2 * 2 * self.cls_dim * D
        return flops


# --------------------------------------------------------------------------------------------------------------
# Released checkpoints
# --------------------------------------------------------------------------------------------------------------

def load_released_state_dict(model, checkpoint):
    """Load an authors' release into `model` strictly.

    The REPA release holds the EMA state dict itself; the REG release holds {'ema': state_dict, ...}; our own
    checkpoints hold {'model', 'ema', ...}. Key names are the same as ours, so the conversion is only the
    unwrapping (and stripping a `module.` / `_orig_mod.` prefix left by DDP / torch.compile). Raises a UsageError
    that names the missing / unexpected / mis-shaped keys when the checkpoint is for another model."""
    sd = checkpoint.get("ema", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    sd = strip_prefixes(sd)
    own = model.state_dict()
    missing, unexpected, wrong = state_dict_mismatch(own, sd)
    missing, unexpected = sorted(missing), sorted(unexpected)
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]
    if missing or unexpected or shapes:
        hint = []
        if any(k.startswith(("cls_projectors2", "wg_norm")) for k in unexpected):
            hint.append("the checkpoint is a REG model: build with cls_dim=768 (--reg)")
        if any(k.startswith(("cls_projectors2", "wg_norm")) for k in missing):
            hint.append("the checkpoint has no REG class-token layers: build without cls_dim")
        raise UsageError("checkpoint does not match the model: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                         f"shape mismatches {shapes[:4]}" + ("; " + "; ".join(hint) if hint else ""))
    model.load_state_dict(sd, strict=True)
    return model


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: our training files and the authors' releases -> a SiT ready to sample
# --------------------------------------------------------------------------------------------------------------

def _torch_load(path, trust=False):
    """plumbing.load_torch_file (CPU, memory-mapped where the file allows it, weights_only unless the user trusts
    the file), with what went wrong said for a --ckpt file: torn, not a torch file, or refused by weights_only."""
    try:
        return load_torch_file(path, trust)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):
            raise UsageError(f"{path} is not a readable PyTorch checkpoint (not a torch.save file); is the file "
                             "complete?") from None
        raise UsageError(f"could not read {path} safely (torch.load weights_only=True): {str(e).splitlines()[0]}. "
                         "If this is a checkpoint you trust, rerun with --trust-checkpoint.") from None
    except (RuntimeError, EOFError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]  # an empty file: an EOFError without a message
        raise UsageError(f"{path} is not a readable PyTorch checkpoint ({why}); is the file complete?") from None


def load_checkpoint(path, use_model_weights=False, trust=False):
    """-> (state_dict, args dict or None).

    Our checkpoints {'model', 'ema', 'opt', 'args', 'steps'}: the EMA weights (the raw ones with
    use_model_weights). The released REG file {'ema': state_dict}; the released REPA file: the EMA state dict
    itself. `module.` / `_orig_mod.` prefixes (DDP, torch.compile) are stripped."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path!r} not found")
    ckpt = _torch_load(path, trust)
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict or a state dict")
    args = None
    if "ema" in ckpt or "model" in ckpt:
        key = "model" if use_model_weights else "ema"
        if key not in ckpt:
            raise UsageError(f"{path} has no {key!r} weights (it holds {sorted(ckpt)}); "
                             + ("drop --use-model-weights" if use_model_weights else "pass --use-model-weights"))
        sd, args = ckpt[key], ckpt.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else args
    elif use_model_weights:
        raise UsageError(f"{path} is a released EMA state dict: it has no raw training weights; drop "
                         "--use-model-weights")
    else:
        sd = ckpt
    if not all(torch.is_tensor(v) for v in sd.values()):
        raise UsageError(f"{path}: the weights are not a state dict of tensors")
    sd = strip_prefixes(sd)
    return sd, (dict(args) if args else None)


def rename_legacy_blocks(sd, encoder_depth):
    """Weights of the authors' early runs (the released generate.py --legacy) keep the blocks after the projector
    as `decoder_blocks.i`; they are `blocks.{encoder_depth + i}` of the same SiT."""
    def rename(k):
        if not k.startswith("decoder_blocks."):
            return k
        _, i, rest = k.split(".", 2)
        return f"blocks.{encoder_depth + int(i)}.{rest}"
    return {rename(k): v for k, v in sd.items()}


def detect_model_config(sd):
    """The SiT constructor inputs read from a state dict's key shapes:

        hidden, in_channels, patch  <- x_embedder.proj.weight [hidden, C, p, p]
        depth                       <- the number of blocks.*;  (depth, hidden) -> the size name in SIZES
        REG, cls_dim                <- cls_projectors2.weight [hidden, cls_dim]
        input_size                  <- pos_embed [1, grid^2 (+1 with REG), hidden]: grid * patch
        num_classes                 <- y_embedder.embedding_table.weight [num_classes + 1, hidden]
        z_dims, projector_dim       <- projectors.k.4.weight [z_dim, P], projectors.k.0.weight [P, hidden]
        iREPA's conv projector      <- projectors.k.conv.weight [z_dim, hidden, 3, 3]

    encoder_depth is not in the shapes (it only decides where the projector reads, which sampling never uses);
    it gets the released default for the size."""
    need = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight"]
    if any(k not in sd for k in need):
        raise UsageError(f"not a SiT state dict: it lacks {[k for k in need if k not in sd]}")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    size = next((s for s, (d, h, _) in SIZES.items() if (d, h) == (depth, hidden)), None)
    if size is None or patch not in (2, 4, 8):
        raise UsageError(f"the checkpoint's architecture (depth {depth}, hidden {hidden}, patch {patch}) is none "
                         f"of SiT-{{{','.join(SIZES)}}}/{{2,4,8}}")
    cls_dim = sd["cls_projectors2.weight"].shape[1] if "cls_projectors2.weight" in sd else None
    tokens = sd["pos_embed"].shape[1] - (cls_dim is not None)
    grid = math.isqrt(tokens)
    z_dims, k = [], 0
    projector = "conv" if "projectors.0.conv.weight" in sd else "mlp"  # iREPA's projector (train.py --projector)
    last = "conv.weight" if projector == "conv" else "4.weight"
    while f"projectors.{k}.{last}" in sd:
        z_dims.append(sd[f"projectors.{k}.{last}"].shape[0])
        k += 1
    name = f"SiT-{size}/{patch}"
    return dict(model=name, input_size=grid * patch, in_channels=in_channels,
                num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
                encoder_depth=default_encoder_depth(name), z_dims=z_dims,
                projector_dim=sd["projectors.0.0.weight"].shape[0] if z_dims and projector == "mlp" else 2048,
                cls_dim=cls_dim, projector=projector)


def describe_config(c):
    reg = f", REG class token {c['cls_dim']}" if c["cls_dim"] else ""
    size = f"{c['input_size']}x{c['input_size']}x{c['in_channels']}"
    return f"{c['model']} (input {size}, {c['num_classes']} classes{reg})"


def build_model(sd, ckpt_args=None, model=None, input_size=None, num_classes=None, encoder_depth=None, device="cpu"):
    """Rebuild the SiT a state dict belongs to: shapes decide the architecture (detect_model_config); a checkpoint's
    args give encoder_depth; the keyword arguments are what the user asked for and must agree with the weights."""
    config = detect_model_config(sd)
    if ckpt_args and ckpt_args.get("encoder_depth"):
        config["encoder_depth"] = int(ckpt_args["encoder_depth"])
    asked = {"model": model, "input_size": input_size, "num_classes": num_classes}
    wrong = {k: v for k, v in asked.items() if v is not None and v != config[k]}
    if wrong:
        raise UsageError(f"the checkpoint holds {describe_config(config)}, but "
                         + ", ".join(f"{k}={v!r}" for k, v in wrong.items())
                         + " was requested; drop those flags or pass the matching checkpoint")
    if encoder_depth is not None:
        config["encoder_depth"] = encoder_depth
    with torch.device(device):
        net = SiT_models[config["model"]](**{k: v for k, v in config.items() if k != "model"})
    load_released_state_dict(net, sd)
    return net.eval().requires_grad_(False), config


# --------------------------------------------------------------------------------------------------------------
# Registry: SiT-{S,B,L,XL}/{2,4,8} (SiT paper, Table 1) and a tiny CPU configuration SiT-T
# --------------------------------------------------------------------------------------------------------------

SIZES = {"T": (6, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


class _Registry(dict):
    """A plain dict of constructors that answers an unknown name with the list of valid ones."""

    def __missing__(self, name):
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(self)}")


def _constructor(depth, hidden_size, num_heads, patch_size):
    def make(**kwargs):
        return SiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)
    return make


SiT_models = _Registry({f"SiT-{size}/{p}": _constructor(*SIZES[size], p) for size in SIZES for p in (2, 4, 8)})


def default_encoder_depth(name):
    """The released recipes align after block 4 for SiT-B (and the tiny/small configs), 8 for SiT-L/XL."""
    return 8 if name.split("/")[0] in ("SiT-L", "SiT-XL") else 4
