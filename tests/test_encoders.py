"""encoders.py: target encoders (timm ViTs) and the SD-VAE, offline, CPU, random weights saved in the real formats."""
import json
import os
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import encoders as E
from plumbing import UsageError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY = dict(depth=1, embed_dim=48)  # architecture overrides for cheap forward passes of every encoder family


def _build(name, grid, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return E.build_encoder(name, grid, **kw)


def _images(n, res, seed=0):
    return torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- target encoders ----------------------------------------------------------------------------------------------

# (embed_dim, depth, heads, patch, prefix tokens) from the papers / official model cards, not from timm.
ARCH = {
    "dinov2-vit-s": (384, 12, 6, 14, 1), "dinov2-vit-b": (768, 12, 12, 14, 1), "dinov2-vit-l": (1024, 24, 16, 14, 1),
    "dinov2-vit-g": (1536, 40, 24, 14, 1), "dinov2-vit-s-reg": (384, 12, 6, 14, 5),
    "dinov2-vit-b-reg": (768, 12, 12, 14, 5), "dinov2-vit-l-reg": (1024, 24, 16, 14, 5),
    "dinov2-vit-g-reg": (1536, 40, 24, 14, 5), "dinov1-vit-b": (768, 12, 12, 16, 1),
    "mocov3-vit-s": (384, 12, 12, 16, 1), "mocov3-vit-b": (768, 12, 12, 16, 1), "mocov3-vit-l": (1024, 24, 16, 16, 1),
    "clip-vit-L": (1024, 24, 16, 14, 1), "mae-vit-l": (1024, 24, 16, 16, 1), "jepa-vit-h": (1280, 32, 16, 14, 0),
}


def test_full_size_architectures_match_the_papers():
    """Every name maps to the right full-size network (built on the meta device: no memory, no forward)."""
    assert set(ARCH) | {"tiny-vit", "toy-vit", "toy-vit-dense", "toy-vit-mae", "toy-oracle"} == set(E.ENCODERS)
    for name, (dim, depth, heads, patch, prefix) in ARCH.items():
        with torch.device("meta"):
            enc = _build(name, 16, random_init=True)
        v = enc.vit
        assert (enc.embed_dim, len(v.blocks), v.blocks[0].attn.num_heads, enc.patch_size, enc.num_prefix_tokens) == \
            (dim, depth, heads, patch, prefix), name
        assert enc.image_size == {14: 224, 16: 256}[patch]  # ImageNet 256, SiT-*/2: 16x16 patches
    with torch.device("meta"):
        clip = _build("clip-vit-L", 16, random_init=True)
    assert type(clip.vit.blocks[0].mlp.act).__name__ == "QuickGELU"  # OpenAI CLIP's activation


@pytest.mark.parametrize("name", [n for n in E.ENCODERS if not E.ENCODERS[n].get("oracle")])  # ViTs
def test_token_grid_matches_sit_grid(name):
    """256 / 512 px with SiT patch 2 / 4: grid = res / 8 / patch tokens per side, whatever the encoder's patch."""
    builds = {}
    for res, sit_patch in [(256, 2), (256, 4), (512, 2), (512, 4)]:
        grid = res // 8 // sit_patch
        if grid not in builds:
            builds[grid] = _build(name, grid, random_init=True, **TINY)
        enc = builds[grid]
        cls, patches = enc(_images(1, res))
        assert enc.grid_size == grid and enc.image_size == grid * enc.patch_size  # timm checks the input size
        assert patches.shape == (1, grid * grid, 48) and cls.shape == (1, 48)
        assert torch.isfinite(patches).all() and torch.isfinite(cls).all()


def test_preprocess_is_the_released_formula():
    """x/255 -> ImageNet normalize -> bicubic resize (DINOv2); CLIP resizes first, then CLIP normalization."""
    x = _images(2, 256)
    dino = _build("dinov2-vit-b", 16, random_init=True, **TINY)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = F.interpolate((x / 255.0 - mean) / std, 224, mode="bicubic")
    torch.testing.assert_close(dino.preprocess(x), ref)
    clip = _build("clip-vit-L", 32, random_init=True, **TINY)  # 512 px, SiT-*/2
    x = _images(1, 512)
    cm = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    cs = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(clip.preprocess(x), (F.interpolate(x / 255.0, 448, mode="bicubic") - cm) / cs)
    mae = _build("mae-vit-l", 16, random_init=True, **TINY)  # patch 16 at 256 px: no resize at all
    x = _images(1, 256)
    torch.testing.assert_close(mae.preprocess(x), (x / 255.0 - mean) / std)


def test_tokens_are_timm_forward_features_without_registers():
    """cls = token 0 and patches = tokens after the class + 4 register tokens of timm's own forward_features;
    CLIP / MAE tokens skip the final norm (as the released code), I-JEPA's class token is the patch mean."""
    x = _images(2, 256)
    reg = _build("dinov2-vit-b-reg", 16, random_init=True, **TINY)
    full = reg.vit.forward_features(reg.preprocess(x))
    cls, patches = reg(x)
    assert full.shape[1] == 1 + 4 + 256
    torch.testing.assert_close(cls, full[:, 0])
    torch.testing.assert_close(patches, full[:, 5:])
    for name in ("clip-vit-L", "mae-vit-l"):
        enc = _build(name, 16, random_init=True, **TINY)
        full = enc.vit.forward_features(enc.preprocess(x))
        cls, patches = enc(x)
        assert not torch.allclose(patches, full[:, 1:], atol=1e-3)
        torch.testing.assert_close(enc.vit.norm(patches), full[:, 1:])
    jepa = _build("jepa-vit-h", 16, random_init=True, **TINY)
    full = jepa.vit.forward_features(jepa.preprocess(x))
    cls, patches = jepa(x)
    torch.testing.assert_close(patches, full)
    torch.testing.assert_close(cls, full.mean(1))


def test_local_safetensors_roundtrip_through_load_encoders(tmp_path):
    """Full-size dinov2-vit-s with random weights saved as timm .safetensors loads back via enc_path, same outputs;
    several encoders at once with one path per name (empty = default)."""
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        (src,) = E.load_encoders("dinov2-vit-s", "cpu", resolution=256, random_init=True)
    path = str(tmp_path / "dinov2_s.safetensors")
    save_file(src.vit.state_dict(), path)
    encs = E.load_encoders("dinov2-vit-s,tiny-vit", "cpu", resolution=256, grid_size=16, enc_path=f"{path},")
    assert [e.name for e in encs] == ["dinov2-vit-s", "tiny-vit"] and [e.embed_dim for e in encs] == [384, 192]
    x = _images(2, 256)
    for a, b in zip(src(x), encs[0](x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert encs[1](x)[1].shape == (2, 256, 192)


def test_pos_embed_resampled_like_released_code(tmp_path):
    """A checkpoint at DINOv2's native 518 px (37x37 grid) in the original torch.hub layout (.pth, with mask_token)
    loads into a 16x16-grid encoder with pos_embed = resample_abs_pos_embed(pos_embed, [16, 16]) (released call)."""
    import timm
    from timm.layers import resample_abs_pos_embed
    torch.manual_seed(0)
    native = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=518, **TINY)
    hub = dict(native.state_dict(), mask_token=torch.zeros(1, 48))
    path = str(tmp_path / "dinov2_vitb14_pretrain.pth")
    torch.save(hub, path)
    enc = _build("dinov2-vit-b", 16, enc_path=path, **TINY)
    expected = resample_abs_pos_embed(hub["pos_embed"], [16, 16])  # bicubic, antialias, class row kept
    torch.testing.assert_close(enc.vit.pos_embed, expected)
    ref = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=224, **TINY).eval()
    ref.load_state_dict(dict(native.state_dict(), pos_embed=expected))
    x = _images(2, 256)
    out = ref.forward_features(enc.preprocess(x))
    cls, patches = enc(x)
    torch.testing.assert_close(patches, out[:, 1:])


def test_torch_hub_register_layout_loads(tmp_path):
    """torch.hub DINOv2-reg layout (register_tokens, class row in pos_embed) gives the same tokens as timm's."""
    src = _build("dinov2-vit-s-reg", 16, random_init=True, **TINY)
    with torch.no_grad():
        src.vit.cls_token.normal_()  # timm inits it at std 1e-6, too small to survive the fold below in float32
    sd = src.vit.state_dict()
    p0 = torch.randn(1, 1, 48)
    hub = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    hub.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - p0,
               pos_embed=torch.cat([p0, sd["pos_embed"]], 1), mask_token=torch.zeros(1, 48))
    path = str(tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    torch.save(hub, path)
    enc = _build("dinov2-vit-s-reg", 16, enc_path=path, **TINY)
    x = _images(2, 256)
    for a, b in zip(src(x), enc(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_reads_torchscript_archives(tmp_path):
    """OpenAI distributes CLIP as a TorchScript archive; its state dict is read from it (then converted by timm)."""
    lin = nn.Linear(2, 3)
    torch.jit.script(lin).save(str(tmp_path / "ViT-L-14.pt"))
    sd = E._read_weight_file(str(tmp_path / "ViT-L-14.pt"))
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], lin.weight.detach())


def test_encoder_errors(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="dinov2-vit-b.*tiny-vit"):  # lists the valid names
        E.load_encoders("dinov3-vit-b", "cpu")
    enc = _build("tiny-vit", 8)
    for bad in (torch.rand(1, 3, 32, 32), _images(1, 32)[0], _images(1, 32).permute(0, 2, 3, 1), [1, 2]):
        with pytest.raises(ValueError, match="uint8 image batch"):
            enc(bad)
    src = _build("dinov2-vit-s", 16, random_init=True, **TINY)
    sd = src.vit.state_dict()
    sd.pop("norm.weight")
    sd["blocks.7.attn.qkv.weight"] = torch.zeros(1)
    path = str(tmp_path / "bad.safetensors")
    save_file(sd, path)
    with pytest.raises(UsageError, match=r"missing keys \(1\): norm\.weight(.|\n)*unexpected keys \(1\): blocks\.7"):
        _build("dinov2-vit-s", 16, enc_path=path, **TINY)
    with pytest.raises(UsageError, match="enc-path"):  # no hub copy of MoCo v3
        E.build_encoder("mocov3-vit-b", 16)
    # offline with an empty cache: a clear error pointing to --enc-path, not a stack trace from the hub client
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(RuntimeError, match="enc-path"):
        E.build_encoder("dinov2-vit-s", 16, **TINY)


def test_frozen_in_a_training_step():
    """Parent .train() leaves the encoder in eval mode; no grad reaches it; bf16 autocast runs and agrees."""
    enc = _build("tiny-vit", 16)
    head = nn.Linear(192, 192)
    parent = nn.ModuleDict(dict(enc=enc, head=head)).train()
    assert parent.training and head.training and not enc.training and not enc.vit.training
    assert not any(p.requires_grad for p in enc.parameters())
    x = _images(2, 64)
    cls, patches = enc(x)
    assert not patches.requires_grad and not cls.requires_grad
    loss = -F.cosine_similarity(head(patches), patches, dim=-1).mean()
    loss.backward()
    assert head.weight.grad is not None and all(p.grad is None for p in enc.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls16, patches16 = enc(x)
    torch.testing.assert_close(patches16.float(), patches, rtol=0.1, atol=0.1)
    torch.testing.assert_close(cls16.float(), cls, rtol=0.1, atol=0.1)


def test_random_weights_are_seeded():
    """Random encoders are identical on every rank / after a resume, whatever the global RNG state."""
    torch.manual_seed(1)
    a = _build("tiny-vit", 8)
    torch.manual_seed(2)
    b = _build("tiny-vit", 8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --- SD-VAE -------------------------------------------------------------------------------------------------------

GOLDEN = os.path.join(DATA, "encoders_vae_golden")  # made by diffusers, see tests/data/encoders_make_vae_golden.py


def test_vae_architecture_is_the_sd_vae():
    ref = json.load(open(os.path.join(DATA, "sd_vae_state_dict.json")))
    with torch.device("meta"):
        vae = E.AutoencoderKL(**E.SD_VAE_CONFIG)
    assert sum(p.numel() for p in vae.parameters()) == ref["num_params"] == 83_653_863
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == ref["state_dict"]
    assert list(vae.state_dict()) == list(ref["state_dict"])
    assert E.VAE_SCALE == 0.18215


def test_vae_matches_diffusers_golden():
    """Weights written by diffusers' save_pretrained (folder with config.json) give diffusers' moments and image."""
    io = load_file(os.path.join(GOLDEN, "io.safetensors"))
    vae = E.load_vae(GOLDEN, "cpu")
    mean, std = vae.encode(io["x"])
    torch.testing.assert_close(mean, io["mean"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, io["std"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(io["z"]), io["decoded"], rtol=1e-5, atol=1e-5)
    m1, s1 = vae.encode(io["x"], slice_size=1)  # slicing changes nothing
    torch.testing.assert_close(m1, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(io["z"], slice_size=1), vae.decode(io["z"]), rtol=1e-5, atol=1e-5)


def _legacy(sd, conv):
    names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    out = {}
    for k, v in sd.items():
        for new, old in names.items():
            if f".attentions.0.{new}" in k:
                k = k.replace(new, old)
                v = v[:, :, None, None] if conv and v.ndim == 2 else v
        out[k] = v
    return out


@pytest.mark.parametrize("fmt", ["bin", "legacy_safetensors", "legacy_conv_bin"])
def test_vae_bin_and_legacy_attention_names(tmp_path, fmt):
    io = load_file(os.path.join(GOLDEN, "io.safetensors"))
    sd = load_file(os.path.join(GOLDEN, "diffusion_pytorch_model.safetensors"))
    if fmt != "bin":
        sd = _legacy(sd, conv=fmt == "legacy_conv_bin")
        assert any(".query." in k for k in sd) and not any(".to_q." in k for k in sd)
    os.symlink(os.path.join(GOLDEN, "config.json"), tmp_path / "config.json")
    if fmt.endswith("bin"):
        torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    else:
        save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    vae = E.load_vae(str(tmp_path), "cpu")
    torch.testing.assert_close(vae.encode(io["x"])[0], io["mean"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(io["z"]), io["decoded"], rtol=1e-5, atol=1e-5)


def test_full_size_vae_file_roundtrip_shapes(tmp_path):
    """Full-size random VAE -> single .safetensors file -> load_vae(file): same outputs; KL-f8 shapes."""
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        src = E.load_vae("random", "cpu")
    path = str(tmp_path / "vae.safetensors")
    save_file(src.state_dict(), path)
    vae = E.load_vae(path, "cpu")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (2, 4, 2, 2) and (std > 0).all()
    torch.testing.assert_close(mean, src.encode(x)[0], rtol=0, atol=0)
    z = torch.randn(2, 4, 2, 2)
    y = vae.decode(z)
    assert y.shape == (2, 3, 16, 16) and torch.isfinite(y).all()
    torch.testing.assert_close(y, src.decode(z), rtol=0, atol=0)
    nn.ModuleDict(dict(vae=vae)).train()
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_vae_posterior_formula_and_clamp():
    """mean, logvar = quant_conv(h).chunk(2); std = exp(clamp(logvar, -30, 20) / 2), checked by hand."""
    vae = E.load_vae(GOLDEN, "cpu")
    with torch.no_grad():
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, 100.0, -100.0, 2.0, -4.0]))
    mean, std = vae.encode(torch.zeros(1, 3, 4, 4))
    torch.testing.assert_close(mean[0, :, 0, 0], torch.tensor([0.5, -1.0, 2.0, 0.0]))
    expected = torch.tensor([20.0, -30.0, 2.0, -4.0]).mul(0.5).exp()
    torch.testing.assert_close(std[0, :, 1, 1], expected)


def test_vae_errors(tmp_path, monkeypatch):
    sd = load_file(os.path.join(GOLDEN, "diffusion_pytorch_model.safetensors"))
    sd.pop("decoder.conv_out.bias")
    sd["decoder.extra.weight"] = torch.zeros(1)
    os.symlink(os.path.join(GOLDEN, "config.json"), tmp_path / "config.json")
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UsageError, match=r"missing keys \(1\): decoder\.conv_out\.bias(.|\n)*decoder\.extra"):
        E.load_vae(str(tmp_path), "cpu")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(RuntimeError, match="sd-vae-ft-ema(.|\n)*Offline"):
        E.load_vae("ema", "cpu")
    with pytest.raises(UsageError, match="not 'ema', 'mse'"):
        E.load_vae("no-such-vae", "cpu")


def test_an_unreachable_hub_fails_at_once_or_answers_from_the_cache(tmp_path, monkeypatch):
    # HF_HUB_OFFLINE unset and a hub endpoint that refuses connections, as on an offline machine: huggingface_hub
    # alone would retry for about a minute; the loaders answer at once, from the local cache when it has the files.
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    t0 = time.time()
    with pytest.raises(OSError, match=r"hub is out of reach \(no connection to 127\.0\.0\.1.*--enc-path FILE"):
        E.build_encoder("dinov2-vit-s", 16, **TINY)
    with pytest.raises(OSError, match=r"hub is out of reach .*--vae PATH"):
        E.load_vae("ema", "cpu")
    assert time.time() - t0 < 10
    # The same files in the hub cache layout (models--owner--name/snapshots/<rev>, refs/main = rev) load offline.
    repo = tmp_path / "hub" / "models--stabilityai--sd-vae-ft-ema"
    (repo / "snapshots" / "0123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123")
    for f in ("diffusion_pytorch_model.safetensors", "config.json"):
        os.symlink(os.path.join(GOLDEN, f), repo / "snapshots" / "0123" / f)
    vae = E.load_vae("ema", "cpu")
    golden = load_file(os.path.join(GOLDEN, "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vae.state_dict()[k], golden[k]) for k in ("decoder.conv_out.bias", "encoder.conv_in.weight"))
