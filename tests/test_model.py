import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import compute_loss
from model import SiT_models, default_encoder_depth, get_2d_sincos_pos_embed, load_released_state_dict
from plumbing import UsageError

REFERENCE = json.load(open(os.path.join(os.path.dirname(__file__), "data", "official_sit_state_dicts.json")))


def tiny(**kw):
    args = dict(input_size=8, in_channels=3, num_classes=10, encoder_depth=2, z_dims=[16], projector_dim=32)
    args.update(kw)
    return SiT_models["SiT-T/2"](**args)


def test_every_registry_entry_has_the_right_shapes():
    # The big configurations are built on the meta device: the forward computes shapes without memory or time.
    for name in SiT_models:
        device = "cpu" if name.startswith(("SiT-T", "SiT-S/8")) else "meta"
        with torch.device(device):
            for cls_dim in (None, 12):
                m = SiT_models[name](input_size=16, num_classes=10, encoder_depth=2, z_dims=[24, 8], cls_dim=cls_dim)
                x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 10])
                v, zs, cls_v = m(x, t, y, cls=None if cls_dim is None else torch.randn(2, cls_dim))
                tokens = (16 // m.patch_size) ** 2 + (cls_dim is not None)
                assert v.shape == x.shape, name
                assert [tuple(z.shape) for z in zs] == [(2, tokens, 24), (2, tokens, 8)], name
                assert (cls_v is None) if cls_dim is None else cls_v.shape == (2, cls_dim), name


def test_adaln_zero_init_outputs_zero_but_projections_do_not():
    torch.manual_seed(0)
    m = tiny(cls_dim=6)
    v, zs, cls_v = m(torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([1, 2, 10]), cls=torch.randn(3, 6))
    assert torch.count_nonzero(v) == 0 and torch.count_nonzero(cls_v) == 0
    assert zs[0].abs().sum() > 0  # the projector is not zero-initialized, alignment can start at once
    for block in m.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0


def test_pos_embed_matches_the_sincos_formula():
    g, d = 4, 16
    emb = get_2d_sincos_pos_embed(d, g)
    for row in range(g):
        for col in range(g):
            token = emb[row * g + col]
            for k in range(d // 4):
                w = 10000 ** (-k / (d // 4))
                assert token[k] == pytest.approx(math.sin(col * w), abs=1e-6)
                assert token[d // 4 + k] == pytest.approx(math.cos(col * w), abs=1e-6)
                assert token[d // 2 + k] == pytest.approx(math.sin(row * w), abs=1e-6)
                assert token[3 * d // 4 + k] == pytest.approx(math.cos(row * w), abs=1e-6)
    m = tiny(cls_dim=6)
    assert torch.count_nonzero(m.pos_embed[0, 0]) == 0  # REG's zero row for the class token
    torch.testing.assert_close(m.pos_embed[0, 1:], torch.from_numpy(get_2d_sincos_pos_embed(192, 4)).float())
    assert not m.pos_embed.requires_grad


def reference_forward(sd, x, t, y, p, heads, encoder_depth, cls=None):
    """An independent, functional transcription of the released SiT forward, reading the state dict by key."""
    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    n, c, hh, ww = x.shape
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2)
    if cls is not None:
        ct = lin(cls, "cls_projectors2")
        ct = F.layer_norm(ct, ct.shape[-1:], sd["wg_norm.weight"], sd["wg_norm.bias"], eps=1e-6)
        h = torch.cat([ct[:, None], h], 1)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    te = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    te = lin(F.silu(lin(te, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    cond = te + sd["y_embedder.embedding_table.weight"][y]
    d = h.shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    zs = None
    for i in range(depth):
        b = f"blocks.{i}."
        mod = lin(F.silu(cond), b + "adaLN_modulation.1")
        s1, sc1, g1, s2, sc2, g2 = [mod[:, j * d:(j + 1) * d, None].transpose(1, 2) for j in range(6)]
        a = ln(h) * (1 + sc1) + s1
        qkv = lin(a, b + "attn.qkv").reshape(n, -1, 3, heads, d // heads)
        q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        h = h + g1 * lin(att.transpose(1, 2).reshape(n, -1, d), b + "attn.proj")
        a = ln(h) * (1 + sc2) + s2
        h = h + g2 * lin(F.gelu(lin(a, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        if i + 1 == encoder_depth:
            zs = lin(F.silu(lin(F.silu(lin(h, "projectors.0.0")), "projectors.0.2")), "projectors.0.4")
    mod = lin(F.silu(cond), "final_layer.adaLN_modulation.1")
    shift, scale = mod[:, None, :d], mod[:, None, d:]
    h = ln(h) * (1 + scale) + shift
    cls_v = None
    if cls is not None:
        cls_v, h = lin(h[:, 0], "final_layer.linear_cls"), h[:, 1:]
    out = lin(h, "final_layer.linear")
    g = hh // p
    out = out.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, hh, ww)
    return out, zs, cls_v


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()}


@pytest.mark.parametrize("reg", [False, True])
def test_forward_equals_independent_transcription_of_the_released_math(reg):
    torch.manual_seed(0)
    m = tiny(cls_dim=6 if reg else None).eval()
    sd = randomize(m)
    m.load_state_dict(sd)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([3, 10])
    cls = torch.randn(2, 6) if reg else None
    v, zs, cls_v = m(x, t, y, cls=cls)
    rv, rzs, rcls = reference_forward(sd, x, t, y, p=2, heads=3, encoder_depth=2, cls=cls)
    torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(zs[0], rzs, atol=1e-5, rtol=1e-4)
    if reg:
        torch.testing.assert_close(cls_v, rcls, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("key", list(REFERENCE))
def test_released_layouts_load_strictly_with_equal_parameter_counts(key):
    kind, name = key.split()
    ref = REFERENCE[key]
    big = name.startswith("SiT-XL")  # XL (683M parameters) is checked on the meta device: keys and shapes only
    with torch.device("meta" if big else "cpu"):
        m = SiT_models[name](input_size=32, encoder_depth=ref["encoder_depth"], z_dims=ref["z_dims"],
                             cls_dim=768 if kind == "reg" else None)
    assert sum(p.numel() for p in m.parameters()) == ref["num_params"]
    assert default_encoder_depth(name) == ref["encoder_depth"]
    shapes = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert shapes == ref["state_dict"]
    if big:
        sd = {k: torch.empty(s, device="meta") for k, s in ref["state_dict"].items()}
        m.load_state_dict(sd, strict=True, assign=True)
        return
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in ref["state_dict"].items()}
    # REPA releases hold the EMA state dict itself, REG releases {'ema': ...}: both go through one function.
    load_released_state_dict(m, sd if kind == "repa" else {"ema": sd, "args": None})
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_loading_the_wrong_checkpoint_names_the_problem():
    repa, reg = tiny(), tiny(cls_dim=6)
    with pytest.raises(UsageError, match="REG"):
        load_released_state_dict(repa, reg.state_dict())
    with pytest.raises(UsageError, match="missing"):
        load_released_state_dict(reg, repa.state_dict())
    with pytest.raises(UsageError, match="shape"):
        load_released_state_dict(tiny(), tiny(num_classes=5).state_dict())


def test_bad_arguments_raise_clear_value_errors():
    with pytest.raises(UsageError, match="SiT-XL/2"):
        SiT_models["SiT-XXL/2"]
    with pytest.raises(UsageError, match="encoder_depth=7 must be in 1..6"):
        tiny(encoder_depth=7)
    with pytest.raises(UsageError, match="encoder_depth=0"):
        tiny(encoder_depth=0)
    with pytest.raises(UsageError, match="input_size=9.*patch_size=2"):
        tiny(input_size=9)
    reg = tiny(cls_dim=6)
    with pytest.raises(ValueError, match="cls="):
        reg(torch.randn(1, 3, 8, 8), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="cls_dim"):
        tiny()(torch.randn(1, 3, 8, 8), torch.rand(1), torch.tensor([0]), cls=torch.randn(1, 6))


def test_label_dropout_only_in_training():
    m = tiny()
    m.y_embedder.dropout_prob = 1.0  # every label becomes the null label in training
    y = torch.tensor([1, 2, 3])
    torch.testing.assert_close(m.y_embedder.train()(y), m.y_embedder.embedding_table.weight[[10, 10, 10]])
    torch.testing.assert_close(m.y_embedder.eval()(y), m.y_embedder.embedding_table.weight[[1, 2, 3]])


@pytest.mark.parametrize("reg", [False, True])
def test_optimizer_steps_lower_the_loss_and_every_head_gets_gradients(reg):
    torch.manual_seed(0)
    m = tiny(cls_dim=16 if reg else None)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    feats = torch.randn(8, 16, 16)
    cls = torch.randn(8, 16) if reg else None
    zs = [torch.cat([cls[:, None], feats], 1)] if reg else [feats]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

    def loss_at(seed):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        return compute_loss(m, x, y, zs, cls_target=cls, generator=g)

    def eval_loss():  # the same fixed (t, noise) draws before and after training
        m.eval()
        with torch.no_grad():
            out = sum(float(loss_at(1000 + s)["loss"]) for s in range(4)) / 4
        m.train()
        return out

    before = eval_loss()
    loss_at(0)["loss"].backward()
    assert m.final_layer.linear.weight.grad.abs().sum() > 0
    assert m.projectors[0][0].weight.grad.abs().sum() > 0  # REPA's projection is trained
    if reg:
        assert m.final_layer.linear_cls.weight.grad.abs().sum() > 0  # REG's class-token velocity is trained
    opt.step()
    for step in range(1, 40):  # fresh t and noise every step, the same batch
        opt.zero_grad()
        loss_at(step)["loss"].backward()
        opt.step()
    after = eval_loss()
    assert after < before - 0.2


def test_flops_count_matches_a_hand_count_for_the_linear_layers():
    m = tiny(z_dims=[])
    d, t, p = 192, 16, 2 * 2 * 3
    by_hand = (2 * t * p * d + 2 * (256 * d + d * d)
               + 6 * (2 * d * 6 * d + 2 * t * (3 * d * d + d * d + 8 * d * d) + 4 * t * t * d)
               + 2 * d * 2 * d + 2 * t * d * p)
    assert m.forward_flops() == by_hand
    # Parameter-based sanity: per token the linear FLOPs are ~2 x (matmul parameters of the blocks).
    block_params = sum(p.numel() for n, p in m.blocks.named_parameters() if n.endswith("weight") and "adaLN" not in n)
    assert m.forward_flops() > 2 * t * block_params
