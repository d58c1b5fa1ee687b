"""The training and sampling recipe around the equations: each test fails when one line of the papers' recipe changes
(batch construction, targets, defaults, EMA, clipping, the weights beta and lambda, class-token guidance, decoding,
the guidance interval). Expected values are hand-computed or come from independent formulas.

Training pieces run on SiT-T/8 + REG on 16 px toy images with the random `tiny-vit` target, built through the same
train.py set-up functions as a real run, from the default flags (only size, data and encoder overridden)."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import encoders
import plumbing
import sample
import train
from model import SiT_models

CPU = torch.device("cpu")
# Only what makes the run small; every recipe flag (lr, betas, eps, wd, clip, EMA, lambda, beta, dropout, path,
# weighting) keeps its default.
SMALL = ["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "40", "--batch-size", "8",
         "--enc-type", "tiny-vit", "--projector-dim", "64", "--num-workers", "0", "--device", "cpu",
         "--mixed-precision", "no"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Quiet:
    def info(self, msg):
        pass


def training_setup(*flags):
    """What train.run builds before its loop: args, encoders, SiT, EMA, AdamW, scaler, batches; and a step()."""
    args = train.parse_args([*SMALL, *flags])
    train.check_args(args, 1)
    args.method = train.method_name(args)
    dataset, num_classes, grid = train.resolve_data(args, False)
    torch.manual_seed(0)
    encs, raw, ema, opt, scaler = train.build_training(args, CPU, grid, False, Quiet())
    raw.train()
    batches = train.make_batches(args, dataset, (0, 0), 0, 1, CPU, num_classes, False)
    params = [p for p in raw.parameters() if p.requires_grad]
    ema_params = [q for p, q in zip(raw.parameters(), ema.parameters()) if p.requires_grad]
    ctx = plumbing.autocast_ctx(CPU, args.mixed_precision)

    def step(stream=batches):
        return train.train_step(raw, raw, ema_params, params, opt, scaler, stream, encs, args, ctx, CPU)
    return dict(args=args, encoders=encs, model=raw, ema=ema, opt=opt, params=params, batches=batches, step=step)


# ---------------------------------------------------------------------------------------------------------------
# The batch and its targets
# ---------------------------------------------------------------------------------------------------------------

def write_latent_dataset(root, mean, std):
    """2 items in the released layout at 16 px with the given VAE moments [2, 4, 2, 2] each."""
    for sub in ("images/00000", "vae-sd/00000"):
        os.makedirs(root / sub, exist_ok=True)
    labels = []
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / f"images/00000/img{i:08d}.png")
        np.save(root / f"vae-sd/00000/img-mean-std-{i:08d}.npy", np.concatenate([mean[i], std[i]]))
        labels.append([f"00000/img-mean-std-{i:08d}.npy", i])
    (root / "vae-sd/dataset.json").write_text(json.dumps({"labels": labels}))


def test_training_batch_is_a_posterior_sample_of_the_stored_moments_times_0_18215(tmp_path):
    g = np.random.default_rng(0)
    mean = g.normal(size=(2, 4, 2, 2)).astype(np.float32)
    std = (0.3 + g.random((2, 4, 2, 2))).astype(np.float32)  # clearly non-zero: the posterior, not its mean
    write_latent_dataset(tmp_path, mean, std)
    args = train.parse_args(["--data-dir", str(tmp_path), "--resolution", "16", "--model", "SiT-T/2"])
    train.check_args(args, 1)
    dataset, _, _ = train.resolve_data(args, False)
    assert args.latent_scale == 0.18215 and not args.pixel_space
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    torch.manual_seed(5)
    x, y, zs, cls = train.prepare_batch(batch, [], args.latent_scale, False, False, CPU, contextlib.nullcontext())
    torch.manual_seed(5)
    eps = torch.randn(2, 4, 2, 2)
    expected = (torch.from_numpy(mean) + torch.from_numpy(std) * eps) * 0.18215
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-7)
    assert y.tolist() == [0, 1] and zs == [] and cls is None


def test_alignment_targets_and_the_class_token_come_from_the_right_encoder_tokens():
    enc = encoders.load_encoders("tiny-vit", CPU, resolution=16, grid_size=4, random_init=True)[0]
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    batch = (images, torch.zeros(3, 6, 16, 16), torch.tensor([0, 1, 2]))
    with torch.no_grad():  # independent: timm's own forward_features (class token first, then the patches)
        tokens = enc.vit.forward_features(enc.preprocess(images))
    cls_ref, patches_ref = tokens[:, 0], tokens[:, enc.vit.num_prefix_tokens:]
    assert patches_ref.shape == (3, 16, 192)
    ctx = contextlib.nullcontext()
    _, _, zs, cls = train.prepare_batch(batch, [enc], 1.0, True, True, CPU, ctx)  # REG
    torch.testing.assert_close(cls, cls_ref)
    torch.testing.assert_close(zs[0], torch.cat([cls_ref[:, None], patches_ref], 1))  # y_* = [cls_*, f_*]
    _, _, zs, cls = train.prepare_batch(batch, [enc], 1.0, False, True, CPU, ctx)  # REPA
    torch.testing.assert_close(zs[0], patches_ref)
    assert cls is None


# ---------------------------------------------------------------------------------------------------------------
# Defaults: the papers' recipe, and each reaches what uses it
# ---------------------------------------------------------------------------------------------------------------

def test_train_defaults_are_the_papers_recipe():
    a = train.parse_args([])
    assert (a.learning_rate, a.adam_beta1, a.adam_beta2, a.adam_epsilon, a.adam_weight_decay) == (
        1e-4, 0.9, 0.999, 1e-8, 0.0)
    assert (a.max_grad_norm, a.ema_decay, a.batch_size, a.cfg_prob) == (1.0, 0.9999, 256, 0.1)
    assert (a.proj_coeff, a.cls, a.path_type, a.prediction, a.weighting) == (0.5, 0.03, "linear", "v", "uniform")
    assert (a.model, a.enc_type, a.projector_dim, a.resolution, a.reg) == ("SiT-XL/2", "dinov2-vit-b", 2048, 256,
                                                                          False)
    a.data_dir = "toy"
    train.check_args(a, 8)
    assert (a.micro_batch, a.grad_accum, a.encoder_depth) == (32, 1, 8)  # 256 global = 32 on each of 8 GPUs
    depth = {}
    for name in SiT_models:
        b = train.parse_args(["--model", name, "--data-dir", "toy"])
        depth[name.split("/")[0]] = train.check_args(b, 1).encoder_depth
    assert depth == {"SiT-T": 4, "SiT-S": 4, "SiT-B": 4, "SiT-L": 8, "SiT-XL": 8}


def test_default_optimizer_and_label_dropout_reach_the_objects():
    run = training_setup("--reg")
    group = run["opt"].param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-4, (0.9, 0.999), 1e-8, 0.0)
    assert isinstance(run["opt"], torch.optim.AdamW)
    assert {id(p) for p in group["params"]} == {id(p) for p in run["params"]}
    # Label dropout 0.1 in training (behaviour, not the attribute): the null row replaces ~10% of the labels.
    emb = run["model"].y_embedder
    null = emb.embedding_table.weight[emb.num_classes]
    torch.manual_seed(0)
    with torch.no_grad():
        frac = (emb(torch.zeros(20000, dtype=torch.long)) == null).all(-1).float().mean()
        assert abs(frac - 0.1) < 0.01, frac
        emb.eval()
        assert not (emb(torch.zeros(1000, dtype=torch.long)) == null).all(-1).any()


def test_total_loss_weighs_the_class_token_by_beta_and_the_alignment_by_lambda(monkeypatch):
    seen = {}
    real = train.compute_loss

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(train, "compute_loss", spy)
    for flags, beta, lam in [((), 0.03, 0.5), (("--cls", "0.2", "--proj-coeff", "0.7"), 0.2, 0.7)]:
        stats = training_setup("--reg", *flags)["step"]()
        loss, pred, cls, repa = (float(stats[k]) for k in ("loss", "pred", "cls", "repa"))
        assert cls > 0.1 and abs(repa) > 0.01  # non-zero terms, so a wrong weight shows
        assert loss == pytest.approx(pred + beta * cls + lam * repa, rel=1e-6, abs=1e-7)
    assert (seen["path_type"], seen["weighting"]) == ("linear", "uniform")


# ---------------------------------------------------------------------------------------------------------------
# The optimizer step: clipping and EMA
# ---------------------------------------------------------------------------------------------------------------

class Scaled:
    """A batch stream whose latents are 100x larger: a large loss, a large gradient."""

    def __init__(self, batches):
        self.batches = batches

    def __next__(self):
        image, moments, y = next(self.batches)
        return image, moments * 100, y


def test_clipping_leaves_a_total_norm_of_at_most_1():
    run = training_setup("--reg")
    opt, params, norms = run["opt"], run["params"], []
    real_step = opt.step

    def step(*a, **k):  # the gradient AdamW actually uses (a fused AdamW divides it by its grad_scale as it reads it)
        scale = float(getattr(opt, "grad_scale", 1.0))
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                     / scale)
        return real_step(*a, **k)

    opt.step = step
    stats = run["step"](Scaled(run["batches"]))
    assert float(stats["grad_norm"]) > 10  # the norm before clipping, as logged
    assert norms[0] <= 1.0 * (1 + 1e-5) and norms[0] > 0.99


def test_ema_update_equals_its_closed_form_over_three_steps():
    """theta_ema_k = d^k theta_0 + (1 - d) sum_i d^(k-i) theta_i (theta_ema_0 = theta_0), d = 0.9999 (default).
    A large learning rate makes each step move the weights far enough for the EMA's 1e-4 share to show in fp32."""
    run = training_setup("--reg", "--learning-rate", "0.1")
    params, ema = run["params"], run["ema"]
    thetas = [[p.detach().double().clone() for p in params]]
    for _ in range(3):
        run["step"]()
        thetas.append([p.detach().double().clone() for p in params])
    d = 0.9999
    ema_params = [q for p, q in zip(run["model"].parameters(), ema.parameters()) if p.requires_grad]
    err, moved = 0.0, 0.0
    for j, q in enumerate(ema_params):
        expected = d ** 3 * thetas[0][j] + sum((1 - d) * d ** (3 - i) * thetas[i][j] for i in (1, 2, 3))
        err = max(err, float((q.double() - expected).abs().max()))
        moved = max(moved, float((expected - thetas[0][j]).abs().max()))
    assert moved > 3e-5 and err < moved * 1e-2, (err, moved)
    assert max(float((q.double() - t).abs().max()) for q, t in zip(ema_params, thetas[3])) > 1e-3  # not the raw model


# ---------------------------------------------------------------------------------------------------------------
# Sampling: REG's class-token guidance, decoding, the guidance interval
# ---------------------------------------------------------------------------------------------------------------

class ConstantVelocity:
    """v = C (label) or U (null label) for the image; a (label) or b (null label) for REG's class token."""
    num_classes, cls_dim = 3, 2

    def __init__(self):
        self.C, self.U = torch.tensor(1.0), torch.tensor(-2.0)
        self.a, self.b = torch.tensor([0.5, 1.5]), torch.tensor([-1.0, 4.0])
        self.calls = []

    def __call__(self, x, t, y, cls=None):
        self.calls.append((float(t[0]), x.shape[0]))
        null = (y == self.num_classes).to(x.dtype)
        v = (self.C + null * (self.U - self.C)).reshape(-1, 1, 1, 1).expand_as(x)
        cls_v = self.a + null[:, None] * (self.b - self.a)
        return v, [], cls_v


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_reg_class_token_is_guided_by_cls_cfg_scale_alone(mode):
    """One step from t = 1. ODE: x_0 = x_1 - v. SDE (linear path, t = 1: score -x, w = 2, so the drift is x + v and
    the last step is mean-only): x_0 = x_1 - (x_1 + v) = -v. Guided v = u + s (c - u); the class token uses
    cls_cfg_scale, and at cls_cfg_scale 0 its conditional velocity."""
    sampler = sample.SAMPLERS[mode]
    model = ConstantVelocity()
    x1, c1 = torch.ones(2, 1, 2, 2), torch.tensor([[0.25, -0.5], [1.0, 2.0]])
    y = torch.tensor([0, 2])

    def run(s, s_cls):
        return sampler(model, x1.double(), y, num_steps=1, cfg_scale=s, cls_cfg_scale=s_cls, cls_latents=c1.double(),
                       return_cls=True, generator=torch.Generator().manual_seed(0))

    def final(start, v):
        return start - v if mode == "ode" else -v.expand_as(start)

    x, c = run(2.0, 3.0)  # distinct scales
    torch.testing.assert_close(x, final(x1.double(), torch.tensor(-2.0 + 2.0 * (1.0 + 2.0)).double()))
    torch.testing.assert_close(c, final(c1.double(), (model.b + 3.0 * (model.a - model.b)).double()))
    _, c = run(2.0, 0.0)
    torch.testing.assert_close(c, final(c1.double(), model.a.double()))


def test_decode_divides_by_the_latent_scale():
    class RecordingVAE:
        def decode(self, z):
            self.seen = z
            return 2 * z

    z = torch.tensor([[[[0.18215, -0.3643]]]])
    torch.testing.assert_close(sample.decode(z, None, 0.18215), torch.tensor([[[[1.0, -2.0]]]]))
    vae = RecordingVAE()
    out = sample.decode(z, vae, 0.18215)
    torch.testing.assert_close(vae.seen, torch.tensor([[[[1.0, -2.0]]]]))
    torch.testing.assert_close(out, torch.tensor([[[[2.0, -4.0]]]]))


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_guidance_interval_includes_both_ends_on_grid_times(mode):
    """With guidance_low and guidance_high exactly on grid times, the steps at both ends are guided (doubled batch):
    the interval is closed, as in the released samplers."""
    if mode == "ode":  # t = 1, 0.75, 0.5, 0.25 (exact in binary)
        grid, low, high = [1.0, 0.75, 0.5, 0.25], 0.25, 0.75
    else:  # the released SDE grid, linspace(1, 0.04, 5); the last step starts at 0.04
        grid = torch.linspace(1.0, 0.04, 5, dtype=torch.float64).tolist()
        low, high = grid[3], grid[1]
    model = ConstantVelocity()
    sample.SAMPLERS[mode](model, torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1]),
                          num_steps=len(grid) if mode == "ode" else 5, cfg_scale=2.0, guidance_low=low,
                          guidance_high=high, cls_latents=torch.zeros(2, 2, dtype=torch.float64),
                          generator=torch.Generator().manual_seed(0))
    doubled = {t: n == 4 for t, n in model.calls}
    assert [t for t, _ in model.calls] == pytest.approx(grid)
    assert doubled == {t: low <= t <= high for t in grid}
    assert doubled[low] and doubled[high] and not doubled[grid[0]]
