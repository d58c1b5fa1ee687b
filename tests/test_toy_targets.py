"""What the toy experiment's target designs and quality measure rest on: the toy Frechet distance, iREPA's spatial
normalization and convolutional projector, the label-free toy-vit-mae target (made on first use, cached, read back
through the normal loading path), the toy-oracle target, class-unconditional training, and their bad input."""
import json
import os

import numpy as np
import pytest
import torch

import encoders as E
import losses
import model as M
import toy_world
import train

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the toy Frechet distance ---------------------------------------------------------------------------------------

def _fd_by_hand(a, b):
    """FID's formula in numpy, with the square root of S_a S_b through S_a^(1/2) S_b S_a^(1/2) (eigh twice): another
    route than frechet.py's Cholesky factor."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, u = np.linalg.eigh(s_a)
    root_a = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
    inner = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    return ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


def test_toy_fd_is_the_frechet_formula_on_the_hand_made_features():
    gen, _ = toy_world.toy_images(np.arange(300), 16, seed=5, style="centred")  # the wrong sizes for the `sizes` set
    real, _ = toy_world.toy_images(np.arange(toy_world.FD_REAL_IMAGES), 16, seed=toy_world.FD_REAL_SEED, style="sizes")
    fa = toy_world.toy_fd_features(torch.from_numpy(gen)).numpy()
    fb = toy_world.toy_fd_features(torch.from_numpy(real)).numpy()
    assert fa.shape == (300, 3 + 64 + 5)
    assert toy_world.toy_fd(gen, 16, "sizes") == pytest.approx(_fd_by_hand(fa, fb), rel=1e-6, abs=1e-9)


def test_toy_fd_features_geometry_of_a_rectangle_by_hand():
    img = torch.full((1, 3, 16, 16), 51, dtype=torch.uint8)  # flat grey (0.2), as the toy sets
    img[0, :, 2:6, 3:9] = torch.tensor([219, 36, 31], dtype=torch.uint8)[:, None, None]  # a red 4 x 6 rectangle
    geo = toy_world.toy_fd_features(img)[0, -5:] / toy_world.FD_BLOCK_WEIGHTS[2]
    # The descriptor smooths with a 3x3 mean, then mask = clamp((chroma - 0.1) / 0.3, 0, 1), chroma c = 188 / 255
    # inside. Pixels by the share of their 3x3 window inside: inner edges 6/9 (mask 1), inner corners 4/9, outer
    # edges 3/9 (12 pixels), the outer pixels next to a corner 2/9 (8), outer corners 1/9 (mask 0).
    c = 188 / 255
    m = lambda share: min(max((share * c - 0.1) / 0.3, 0), 1)
    area = 20 * 1 + 4 * m(4 / 9) + 12 * m(3 / 9) + 8 * m(2 / 9)
    # centre (row 4.0, column 6.0): symmetric; the box grows by the outer ring (mask > 15 % of the fullest row)
    expect = torch.tensor([area / 256, 4 / 16, 6 / 16, 6 / 16, 8 / 16], dtype=torch.float64)
    torch.testing.assert_close(geo, expect, atol=1e-6, rtol=0)


def test_toy_fd_sees_size_and_diversity_not_only_correctness():
    real, _ = toy_world.toy_images(np.arange(256), 16, seed=9, style="sizes")
    one_size, _ = toy_world.toy_images(np.arange(256), 16, seed=9, style="centred")  # right classes, one size
    one_class, _ = toy_world.toy_images(np.arange(256) * toy_world.TOY_NUM_CLASSES, 16, seed=9, style="sizes")
    fd = {k: toy_world.toy_fd(v, 16, "sizes") for k, v in [("real", real), ("size", one_size), ("class", one_class)]}
    assert fd["real"] < 0.05 < 10 * fd["real"] < fd["size"] < fd["class"]
    assert toy_world.toy_accuracy(one_size, np.arange(256) % 12)["joint"] == 1.0  # which the accuracy cannot see


# --- iREPA: spatial normalization and the convolutional projector ---------------------------------------------------

def test_spatial_normalize_by_hand():
    f = torch.tensor([[[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]]])  # 1 image, 3 tokens, 2 channels
    # channel 0: mean 3, unbiased std 2; channel 1: mean 12, std sqrt(((-2)^2 * 2 + 4^2) / 2) = sqrt(12)
    expect = torch.tensor([[[-1.0, -2 / 12 ** 0.5], [0.0, -2 / 12 ** 0.5], [1.0, 4 / 12 ** 0.5]]])
    torch.testing.assert_close(losses.spatial_normalize(f, 1.0, eps=0.0), expect)
    half = torch.tensor([[[(1 - 1.5) / 2, (10 - 6) / 12 ** 0.5], [(3 - 1.5) / 2, (10 - 6) / 12 ** 0.5],
                          [(5 - 1.5) / 2, (16 - 6) / 12 ** 0.5]]])  # gamma 0.5 removes half the mean
    torch.testing.assert_close(losses.spatial_normalize(f, 0.5, eps=0.0), half)


def test_spatial_normalize_removes_a_per_image_class_code():
    g = torch.Generator().manual_seed(0)
    layout = torch.randn(1, 16, 8, generator=g)
    codes = torch.randn(3, 1, 8, generator=g) * 10  # one code per image, shared by all its tokens
    out = losses.spatial_normalize(layout + codes)
    torch.testing.assert_close(out, out[:1].expand(3, -1, -1))  # per image: the code is gone
    with pytest.raises(ValueError, match="at least 2 patch tokens"):
        losses.spatial_normalize(torch.ones(2, 1, 8))


def test_training_targets_are_normalized_but_not_regs_class_token():
    class Enc(torch.nn.Module):
        def forward(self, images):
            n = images.shape[0]
            return torch.full((n, 4), 7.0), torch.arange(n * 4 * 4.0).view(n, 4, 4) ** 2
    batch = (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 6, 2, 2), torch.zeros(2, dtype=torch.long))
    x, y, zs, cls = train.prepare_batch(batch, [Enc()], 1.0, True, True, "cpu", torch.autocast("cpu", enabled=False),
                                        target_norm=1.0)
    _, patches = Enc()(batch[0])
    by_hand = (patches - patches.mean(1, keepdim=True)) / (patches.std(1, keepdim=True) + 1e-6)
    torch.testing.assert_close(zs[0][:, 1:], by_hand)
    torch.testing.assert_close(zs[0][:, 0], torch.full((2, 4), 7.0))
    torch.testing.assert_close(cls, torch.full((2, 4), 7.0))


@pytest.mark.parametrize("reg", [False, True])
def test_conv_projector_is_a_3x3_neighbourhood_sum(reg):
    torch.manual_seed(0)
    net = M.SiT_models["SiT-T/4"](input_size=16, in_channels=3, num_classes=12, encoder_depth=2, z_dims=[5],
                                  cls_dim=6 if reg else None, projector="conv")
    proj = net.projectors[0]
    h = torch.randn(2, 16 + reg, 192)
    z = proj(h)
    grid = h[:, reg:].view(2, 4, 4, 192)
    w, b = proj.conv.weight, proj.conv.bias  # [5, 192, 3, 3]
    i, j = 1, 3  # a token at the right border: its column j + 1 is zero padding
    by_hand = b.clone()
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if 0 <= i + di < 4 and 0 <= j + dj < 4:
                by_hand = by_hand + w[:, :, di + 1, dj + 1] @ grid[0, i + di, j + dj]
    torch.testing.assert_close(z[0, reg + i * 4 + j], by_hand, rtol=1e-4, atol=1e-5)
    if reg:
        torch.testing.assert_close(z[:, 0], h[:, 0] @ proj.cls.weight.T + proj.cls.bias)


def test_conv_projector_checkpoint_is_rebuilt_and_the_recipe_stays_the_mlp():
    net = M.SiT_models["SiT-T/4"](input_size=16, in_channels=3, num_classes=12, encoder_depth=2, z_dims=[96],
                                  cls_dim=96, projector="conv")
    config = M.detect_model_config(net.state_dict())
    assert config["projector"] == "conv" and config["z_dims"] == [96] and config["cls_dim"] == 96
    rebuilt = M.build_model(net.state_dict())[0]
    assert isinstance(rebuilt.projectors[0], M.ConvProjector)
    assert train.parse_args([]).projector == "mlp" and train.parse_args([]).target_norm == "none"
    mlp = M.SiT_models["SiT-T/4"](input_size=16, in_channels=3, num_classes=12, encoder_depth=2, z_dims=[96])
    assert M.detect_model_config(mlp.state_dict())["projector"] == "mlp"


# --- the target designs ---------------------------------------------------------------------------------------------

def test_toy_oracle_is_the_renderers_patch_geometry():
    imgs, labels, geo = toy_world.toy_images_with_geometry(np.arange(24), 16, seed=3, style="sizes", patch=4)
    enc = E.load_encoders("toy-oracle", "cpu", resolution=16, grid_size=4)[0]
    cls, patches = enc(torch.from_numpy(imgs))
    assert patches.shape == (24, 16, 7) and enc.embed_dim == 7
    squares = labels // len(toy_world.TOY_COLORS) == 0  # a square's area is exactly (2 half)^2, so its offsets are exact
    np.testing.assert_allclose(patches[squares][..., :2].numpy(), geo[squares][..., :2], atol=0.05)
    np.testing.assert_allclose(patches[..., 2].numpy(), geo[..., 2], atol=0.005)  # coverage, every shape
    torch.testing.assert_close(cls, patches.mean(1))


def test_label_free_toy_encoder_made_on_first_use_cached_and_loaded(tmp_path, monkeypatch, tiny_toy_encoders):
    seen = []
    real_ce = torch.nn.functional.cross_entropy
    monkeypatch.setattr(toy_world.F, "cross_entropy", lambda *a, **k: seen.append(1) or real_ce(*a, **k))
    toy_world.ensure_toy_encoder("toy-vit-mae", grid_size=4, log=lambda m: None, style="sizes")
    assert not seen  # no label was used
    path = E.toy_encoder_path(4, "mae", "sizes")
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["objective"] == "mae" and "held_out_mse" in meta
    mtime = os.path.getmtime(path)
    toy_world.ensure_toy_encoder("toy-vit-mae", grid_size=4, log=lambda m: None, style="sizes")
    assert os.path.getmtime(path) == mtime  # cached: not trained again
    enc = E.load_encoders("toy-vit-mae", "cpu", resolution=16, grid_size=4, toy_style="sizes")[0]
    imgs, _ = toy_world.toy_images(np.arange(2), 16, style="sizes")
    cls, patches = enc(torch.from_numpy(imgs))
    assert patches.shape == (2, 16, E.TOY_DIM) and torch.isfinite(patches).all()


def test_masked_patch_loss_by_hand():
    torch.manual_seed(0)

    class Identity(torch.nn.Module):  # a "ViT" whose patch tokens are the input's patches, flattened
        pass
    x = torch.randn(2, 3, 8, 8)
    vit_tokens = E.vit_tokens
    try:
        E.vit_tokens = lambda vit, xm, final_norm=True: (None, xm.view(2, 3, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5)
                                                         .reshape(2, 4, 48))
        head = torch.nn.Linear(48, 48)
        torch.nn.init.eye_(head.weight), torch.nn.init.zeros_(head.bias)
        loss = toy_world.masked_patch_loss(Identity(), head, x, 4, 2, torch.Generator().manual_seed(1))
    finally:
        E.vit_tokens = vit_tokens
    # an identity reconstruction of a blanked patch predicts 0, so the loss is the mean square of the blanked
    # patches' pixels; half the patches (2 of 4) of each image are blanked
    mask = torch.rand(2, 4, generator=torch.Generator().manual_seed(1)).argsort(1) < 2
    patches = x.view(2, 3, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, 48)
    assert loss.item() == pytest.approx(patches[mask].pow(2).mean().item(), rel=1e-5)


# --- class-unconditional training, and bad input --------------------------------------------------------------------

TINY = ["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "40", "--batch-size", "8",
        "--projector-dim", "64", "--num-workers", "0", "--device", "cpu", "--log-every", "1",
        "--num-sample-images", "4", "--sample-steps", "2", "--max-train-steps", "2", "--sample-every", "2",
        "--mixed-precision", "no"]


def test_unconditional_run_samples_with_the_null_label_and_logs_the_distance(tmp_path, monkeypatch):
    seen = []
    import sample
    real = sample.euler_sampler
    monkeypatch.setattr(sample, "euler_sampler", lambda m, z, y, **k: seen.append((y.clone(), k)) or real(m, z, y, **k))
    train.main([*TINY, "--enc-type", "toy-oracle", "--reg", "--cfg-prob", "1", "--sample-cfg-scale", "4",
                "--target-norm", "spatial", "--projector", "conv", "--output-dir", str(tmp_path), "--exp-name", "u"])
    y, kw = seen[-1]
    assert (y == 12).all() and kw["cfg_scale"] == 1.0  # null label (row num_classes), no guidance
    rows = [json.loads(line) for line in open(tmp_path / "u" / "metrics.jsonl")]
    last = [r for r in rows if "toy_fd" in r][-1]
    assert np.isfinite(last["toy_fd"]) and "toy_joint" not in last


@pytest.mark.parametrize("flags, flag", [
    (["--smoke", "sit", "--target-norm", "spatial"], "--target-norm"),
    (["--smoke", "sit", "--projector", "conv"], "--projector"),
    (["--smoke", "repa", "--target-norm", "spatial", "--target-norm-gamma", "nan"], "--target-norm-gamma"),
    (["--smoke", "repa", "--enc-type", "toy-oracle", "--data-dir", "data/x"], "--enc-type"),
    (["--smoke", "repa", "--enc-type", "toy-vit-bogus"], "toy-vit-bogus"),
])
def test_target_design_bad_input_is_one_line_naming_the_flag(tmp_path, capsys, flags, flag):
    with pytest.raises(SystemExit) as e:
        train.main([*flags, "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and flag in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_target_norm_refuses_a_one_token_grid(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main([*TINY, "--model", "SiT-T/8", "--resolution", "8", "--enc-type", "toy-oracle", "--target-norm",
                    "spatial", "--output-dir", str(tmp_path)])
    assert "1x1 token grid" in capsys.readouterr().err


def test_irepa_options_train_with_a_released_encoder_and_the_checkpoint_samples(tmp_path):
    # any encoder: DINOv2-B's architecture (random weights: offline), REG, SiT-T/8's 2x2 grid
    train.main([*TINY, "--enc-type", "dinov2-vit-b", "--random-encoder", "--reg", "--target-norm", "spatial",
                "--projector", "conv", "--sample-every", "0", "--output-dir", str(tmp_path), "--exp-name", "d"])
    ckpt = torch.load(tmp_path / "d" / "checkpoints" / "0000002.pt", map_location="cpu", weights_only=True)
    assert ckpt["model"]["projectors.0.conv.weight"].shape == (768, 192, 3, 3)
    assert ckpt["args"]["target_norm"] == "spatial"
    import sample
    sample.main(["--ckpt", str(tmp_path / "d" / "checkpoints" / "0000002.pt"), "--class-labels", "0", "1",
                 "--num-steps", "2", "--grid-path", str(tmp_path / "g.png"), "--device", "cpu"])
    assert (tmp_path / "g.png").is_file()


def test_an_unknown_target_design_is_one_line_naming_the_flag(capsys):
    import toy_experiment
    with pytest.raises(SystemExit) as e:
        toy_experiment.experiment_main(["--design", "dino"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--design" in err and "spatial" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("design, sit, aligned", [
    ("spatial", [], []),  # the smoke preset's REPA / REG already normalize
    ("class", [], ["--target-norm", "none"]),
    ("oracle", [], ["--target-norm", "none", "--enc-type", "toy-oracle"]),
    ("unconditional", ["--cfg-prob", "1"], ["--cfg-prob", "1", "--target-norm", "none"]),
])
def test_each_design_adds_its_flags_and_has_its_own_folder(monkeypatch, tmp_path, design, sit, aligned):
    import toy_experiment
    planned = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(toy_experiment, "prepare_toy_encoders", lambda runs: None)

    def plan(todo, jobs):
        planned.extend(todo)
        raise KeyboardInterrupt  # stop before any training
    monkeypatch.setattr(toy_experiment, "run_trainings", plan)
    with pytest.raises(KeyboardInterrupt):
        toy_experiment.experiment_main(["--design", design, "--seeds", "0"])
    out = os.path.join("experiments", "toy", f"sizes-{design}")
    base = ["--seed", "0", "--output-dir", out]
    for (name, flags, _), method in zip(planned, ["sit", "repa", "reg"]):
        assert flags[:5] == [f"--smoke={method}", *base] and name == f"{method}-seed0"
        tail = flags[flags.index("--sample-steps") + 2:]
        assert tail == (sit if method == "sit" else aligned)


def test_a_bad_train_flag_in_the_experiment_ends_in_trains_own_line(tmp_path, capfd):
    import toy_experiment
    with pytest.raises(SystemExit) as e:
        toy_experiment.experiment_main(["--methods", "sit", "--seeds", "0", "--output-dir", str(tmp_path),
                                        "--batch-size", "0"])
    err = [line for line in capfd.readouterr().out.splitlines() + [] if "error" in line]
    assert e.value.code == 2 and len(err) == 1 and "--batch-size must be a positive integer" in err[0]
