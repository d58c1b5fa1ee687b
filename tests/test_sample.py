"""sample.py: samplers against a closed-form case, guidance rules, per-image noise, resumable evaluation runs,
released checkpoint layouts, and clear errors. CPU, offline, tiny models."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from losses import interpolant
from model import SiT_models, detect_model_config
from sample import euler_maruyama_sampler, euler_sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# --------------------------------------------------------------------------------------------------------------
# A case with a known answer: data ~ N(mu, s^2 I)
# --------------------------------------------------------------------------------------------------------------

class GaussianVelocity:
    """The exact velocity of x_t = alpha_t x_0 + sigma_t eps for x_0 ~ N(mu, s^2 I), eps ~ N(0, I).

    (x_0, x_t) are jointly Gaussian, x_t ~ N(alpha mu, V_t I) with V_t = alpha^2 s^2 + sigma^2, so
        E[x_0 | x_t] = mu + alpha s^2 / V_t (x_t - alpha mu),   E[eps | x_t] = sigma / V_t (x_t - alpha mu)
        v(x, t) = E[d_alpha x_0 + d_sigma eps | x_t = x]
                = d_alpha mu + (d_alpha alpha s^2 + d_sigma sigma) / V_t (x - alpha mu)
    With cls_mu / cls_s it also plays a REG model whose class token is an independent N(cls_mu, cls_s^2 I)."""

    num_classes = 3

    def __init__(self, mu, s, path, cls_mu=None, cls_s=None):
        self.mu, self.s, self.path, self.cls_mu, self.cls_s = mu, s, path, cls_mu, cls_s
        self.cls_dim = None if cls_mu is None else cls_mu.shape[-1]

    def velocity(self, x, t, mu, s):
        t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        a, sg, da, dsg = interpolant(t, self.path)
        return da * mu + (da * a * s ** 2 + dsg * sg) / (a ** 2 * s ** 2 + sg ** 2) * (x - a * mu)

    def __call__(self, x, t, y, cls=None):
        cls_v = None if cls is None else self.velocity(cls, t, self.cls_mu, self.cls_s)
        return self.velocity(x, t, self.mu, self.s), [], cls_v


def predicted_sde_moments(num_steps, path, mu, s):
    """Mean and std the Euler-Maruyama scheme itself produces for this Gaussian, from its moment recursion (an
    independent scalar re-derivation, no model). With the exact score -(x - alpha mu)/V_t the drift is affine,
    d = c + b x with b = k + t / V_t (1/2 w_t = t), so  m <- m + dt (c + b m),  V <- (1 + b dt)^2 V + 2 t |dt|
    (no noise term on the last, mean-only step); start m = 0, V = 1."""
    ts = torch.cat([torch.linspace(1, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    ts = ts.tolist()
    m, var = torch.zeros_like(mu), 1.0
    for i, (tc, tn) in enumerate(zip(ts[:-1], ts[1:])):
        a, sg, da, dsg = (float(c) for c in interpolant(torch.tensor(tc, dtype=torch.float64), path))
        vt = a * a * s * s + sg * sg
        b = (da * a * s * s + dsg * sg) / vt + tc / vt
        dt = tn - tc
        m = m + dt * (da * mu - b * a * mu + b * m)
        var = (1 + dt * b) ** 2 * var + (2 * tc * abs(dt) if i < num_steps - 1 else 0.0)
    return m, math.sqrt(var)


MU = torch.linspace(-1, 2, 8, dtype=torch.float64).reshape(1, 2, 2, 2)
S = 0.5


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_ode_lands_on_gaussian_and_heun_is_second_order(path):
    """The ODE maps eps to the exact x_0 = mu + s eps (the flow of this v is x_t = alpha mu + sqrt(V_t) eps), so
    the error can be measured per sample. Euler is first order (doubling the steps halves the error), Heun second
    order (a quarter; its correction is skipped on the last step, whose O(h^2) local error keeps the order).
    Mean and std then match N(mu, s^2) within 4 standard errors of n samples plus that path-wise error."""
    n = 2000
    eps = torch.randn(n, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(n, dtype=torch.long)
    model, exact = GaussianVelocity(MU, S, path), MU + S * eps
    err = {(heun, steps): (euler_sampler(model, eps, y, steps, heun=heun, path_type=path) - exact).abs().max().item()
           for heun in (False, True) for steps in (20, 40)}
    assert 1.7 < err[False, 20] / err[False, 40] < 2.3
    assert 3.3 < err[True, 20] / err[True, 40] < 4.7
    assert err[True, 40] < err[False, 40] / 10  # Heun is closer than Euler at equal steps

    x = euler_sampler(model, eps, y, 40, heun=True, path_type=path)
    bound = err[True, 40]
    assert (x.mean(0) - MU[0]).abs().max() < 4 * S / math.sqrt(n) + bound
    assert abs(x.std(0).mean() - S) < 4 * S / math.sqrt(2 * n) + bound


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_with_reg_class_token_lands_on_gaussians(path):
    """Euler-Maruyama with 100 steps, the image and a REG class token sampled jointly, each from its own Gaussian.
    The scheme's own mean/std (predicted_sde_moments) sit within 1.5% of (mu, s): the bias of stopping the noise at
    t = 0.04. The samples match that prediction within 4 standard errors (n = 4000: s/sqrt(n) for a mean,
    s/sqrt(2 n d) for the std pooled over d independent coordinates)."""
    n, steps = 4000, 100
    cls_mu, cls_s = torch.tensor([[0.5, -0.5, 1.0]], dtype=torch.float64), 1.5
    model = GaussianVelocity(MU, S, path, cls_mu, cls_s)
    gen = torch.Generator().manual_seed(1)
    eps = torch.randn(n, 2, 2, 2, dtype=torch.float64, generator=gen)
    cls_eps = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    x, cls = euler_maruyama_sampler(model, eps, torch.zeros(n, dtype=torch.long), steps, path_type=path,
                                    cls_latents=cls_eps, generator=gen, return_cls=True)
    for out, mu, s in ((x, MU, S), (cls, cls_mu, cls_s)):
        m_pred, s_pred = predicted_sde_moments(steps, path, mu[0], s)
        assert (m_pred - mu[0]).abs().max() < 0.015 * (mu.abs().max() + s) and abs(s_pred - s) < 0.015 * s
        d = out[0].numel()
        assert (out.mean(0) - m_pred).abs().max() < 4 * s / math.sqrt(n)
        assert abs(out.std(0).pow(2).mean().sqrt() - s_pred) < 4 * s / math.sqrt(2 * n * d)


def test_sde_steps_match_hand_computation():
    """Two SDE steps with v = c (constant), linear path, computed by hand: t = [1, 0.04, 0], w_t = 2t,
    s = (-(1 - t) v - x) / t, drift d = v - t s; a noisy step 1 -> 0.04, then the mean-only step 0.04 -> 0."""
    c = torch.tensor([[0.3, -0.7]], dtype=torch.float64)

    class Const:
        num_classes, cls_dim = 3, None

        def __call__(self, x, t, y, cls=None):
            return c.expand_as(x), [], None

    x0 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    out = euler_maruyama_sampler(Const(), x0, torch.zeros(1, dtype=torch.long), num_steps=2,
                                 generator=torch.Generator().manual_seed(5))
    eps = torch.randn(1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    d1 = c - 1.0 * (-(1 - 1.0) * c - x0) / 1.0                      # t = 1
    x1 = x0 + d1 * (0.04 - 1) + math.sqrt(2 * 1.0) * math.sqrt(0.96) * eps
    d2 = c - 0.04 * (-(1 - 0.04) * c - x1) / 0.04                   # t = 0.04
    torch.testing.assert_close(out, x1 + d2 * (0 - 0.04), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------------------------

class LabelVelocity:
    """v = W[y] (1 + t), cls_v = U[y] (1 - t): depends on the label and time only, so a guided trajectory is affine
    in the guidance scale (x_{i+1} = A_i x_i + B_i + scale C_i). Records every call (batch, labels, t, dtype)."""

    def __init__(self, reg=False, num_classes=3):
        g = torch.Generator().manual_seed(3)
        self.num_classes = num_classes
        self.W = torch.randn(num_classes + 1, 2, 4, 4, generator=g)
        self.U = torch.randn(num_classes + 1, 5, generator=g)
        self.cls_dim = 5 if reg else None
        self.calls = []

    def __call__(self, x, t, y, cls=None):
        self.calls.append(dict(n=x.shape[0], y=y.clone(), t=t.clone(), dtype=(x.dtype, t.dtype)))
        v = self.W[y].to(x.dtype) * (1 + t).reshape(-1, 1, 1, 1)
        return v, [], None if cls is None else self.U[y].to(cls.dtype) * (1 - t)[:, None]


def _run(sampler, model, cfg, cls_cfg=0.0, heun=False, **kw):
    g = torch.Generator().manual_seed(0)
    z, cls = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 1])
    return sampler(model, z, y, num_steps=6, heun=heun, cfg_scale=cfg, cls_cfg_scale=cls_cfg,
                   cls_latents=cls if model.cls_dim else None, generator=torch.Generator().manual_seed(1),
                   return_cls=True, **kw)


@pytest.mark.parametrize("sampler,heun", [(euler_sampler, False), (euler_sampler, True),
                                          (euler_maruyama_sampler, False)])
def test_cfg_is_u_plus_s_times_c_minus_u(sampler, heun):
    """Scale 1 runs the conditional model only (no doubled batch, no null label) and equals the conditional
    sampler; since the output is affine in the scale, u + s (c - u) implies x(1) = 2 x(2) - x(3) for the guided
    runs. REG: the class token follows cls_cfg_scale the same way, and with cls_cfg_scale = 0 it takes its
    conditional prediction even while the image is guided."""
    model = LabelVelocity(reg=True)
    x1, c1 = _run(sampler, model, 1.0, heun=heun)
    assert all(c["n"] == 4 and (c["y"] < 3).all() for c in model.calls)
    assert len(model.calls) == (2 * 6 - 1 if heun else 6)  # 6 steps; Heun's correction skipped on the last one
    (x2, c2), (x3, c3) = _run(sampler, model, 2.0, 2.0, heun), _run(sampler, model, 3.0, 3.0, heun)
    torch.testing.assert_close(2 * x2 - x3, x1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(2 * c2 - c3, c1, rtol=1e-9, atol=1e-9)
    assert (x2 - x1).abs().max() > 0.1  # guidance does change the image
    _, c_cond = _run(sampler, model, 3.0, 0.0, heun)
    torch.testing.assert_close(c_cond, c1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_guidance_interval_doubles_the_batch_only_inside(sampler):
    """With cfg > 1 and interval [0.3, 0.7] the model sees [x; x] with [y; null] at the t inside and the plain batch
    at the t outside. The time it gets is a [B] tensor of t_i in the latents' dtype, on the released grids."""
    model = LabelVelocity()
    g = torch.Generator().manual_seed(0)
    sampler(model, torch.randn(4, 2, 4, 4, generator=g), torch.tensor([0, 1, 2, 1]), num_steps=6, cfg_scale=1.5,
            guidance_low=0.3, guidance_high=0.7, generator=g)
    grid = (torch.linspace(1, 0, 7, dtype=torch.float64)[:-1] if sampler is euler_sampler
            else torch.linspace(1, 0.04, 6, dtype=torch.float64))
    assert [c["dtype"] for c in model.calls] == [(torch.float32, torch.float32)] * 6
    for call, t in zip(model.calls, grid.tolist()):
        assert torch.equal(call["t"], torch.full((call["n"],), t, dtype=torch.float64).float())
        if 0.3 <= t <= 0.7:
            assert call["n"] == 8 and call["y"][:4].tolist() == [0, 1, 2, 1] and (call["y"][4:] == 3).all()
        else:
            assert call["n"] == 4 and call["y"].tolist() == [0, 1, 2, 1]
    assert {c["n"] for c in model.calls} == {4, 8}


def test_per_sample_generators_make_noise_independent_of_the_batch():
    """A list of generators (one per image) gives each image the same SDE trajectory alone or in any batch."""
    model = LabelVelocity(reg=True)
    gens = lambda idx: sample.image_generators(7, idx, "cpu")
    y = torch.tensor([0, 1, 2])

    def run(idx):
        g = gens(idx)
        z, cls, _ = sample.initial_noise(g, type("M", (), dict(in_channels=2, input_size=4, cls_dim=5))(), y[idx])
        return euler_maruyama_sampler(model, z, y[idx], 5, cfg_scale=2.0, cls_latents=cls, generator=g)

    together, alone = run([0, 1, 2]), torch.cat([run([2]), run([0]), run([1])])
    torch.testing.assert_close(together, alone[[1, 2, 0]], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Pixels and grids
# --------------------------------------------------------------------------------------------------------------

def test_to_uint8_and_grid(tmp_path):
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 6)
    assert sample.to_uint8(x).flatten().tolist() == [0, 0, 127, 254, 255, 255]  # clamp, then truncate
    images = torch.arange(5, dtype=torch.uint8).mul(40).reshape(5, 1, 1, 1).expand(5, 3, 4, 6).contiguous()
    sample.save_grid(images, str(tmp_path / "g.png"), nrow=3, padding=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3)
    for k in range(5):
        r, c = divmod(k, 3)
        tile = grid[2 + r * 6: 2 + r * 6 + 4, 2 + c * 8: 2 + c * 8 + 6]
        assert (tile == 40 * k).all()
    assert (grid[2 + 6: 2 + 6 + 4, 2 + 2 * 8: 2 + 2 * 8 + 6] == 0).all()  # the sixth tile is empty


# --------------------------------------------------------------------------------------------------------------
# Command line: tiny pixel-space REG checkpoint in our format
# --------------------------------------------------------------------------------------------------------------

def _tiny_model(seed, in_channels=3, input_size=16, cls_dim=8, num_classes=5, name="SiT-T/4", z_dims=()):
    torch.manual_seed(seed)
    model = SiT_models[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                             z_dims=list(z_dims), encoder_depth=2, projector_dim=32, cls_dim=cls_dim)
    with torch.no_grad():  # move off the zero-initialized output layers so the images depend on everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _save_ours(path, seed=0):
    sd, raw = _tiny_model(seed).state_dict(), _tiny_model(seed + 100).state_dict()
    args = dict(model="SiT-T/4", input_size=16, in_channels=3, num_classes=5, encoder_depth=2, z_dims=[],
                projector_dim=32, cls_dim=8, path_type="linear", resolution=16, latent_scale=1.0, pixel_space=True,
                vae=None, data_dir="toy")
    torch.save({"model": raw, "ema": sd, "opt": {}, "args": args, "steps": 10}, path)
    return str(path)


FID_ARGS = ["--num-fid-samples", "7", "--mode", "sde", "--num-steps", "5", "--cfg-scale", "2.0", "--guidance-high",
            "0.7", "--cls-cfg-scale", "2.0", "--per-proc-batch-size", "2", "--device", "cpu", "--precision", "bf16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    ckpt = _save_ours(root / "0000010.pt")
    npz = sample.main(["--ckpt", ckpt, "--sample-dir", str(root / "ref")] + FID_ARGS)
    return dict(root=root, ckpt=ckpt, npz=npz, ref=np.load(npz)["arr_0"])


def test_evaluation_folder_layout(tiny):
    ref, folder = tiny["ref"], tiny["npz"][:-len(".npz")]
    assert ref.shape == (7, 16, 16, 3) and ref.dtype == np.uint8 and ref.std() > 5
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(7)] + ["config.json"]
    assert json.load(open(os.path.join(folder, "config.json")))["cls_cfg_scale"] == 2.0
    assert np.array_equal(np.asarray(Image.open(os.path.join(folder, "000003.png"))), ref[3])


def test_resumed_run_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    """Kill the run after 3 images (plus a stray temp file); the rerun samples only the 4 missing images and the
    .npz equals the uninterrupted one."""
    real_save, saved = sample._save_png, []

    def dying_save(img, path):
        if len(saved) == 3:
            open(path + ".123.tmp", "wb").write(b"partial")
            raise KeyboardInterrupt
        saved.append(path)
        real_save(img, path)

    args = ["--ckpt", tiny["ckpt"], "--sample-dir", str(tmp_path)] + FID_ARGS
    monkeypatch.setattr(sample, "_save_png", dying_save)
    with pytest.raises(KeyboardInterrupt):
        sample.main(args)
    monkeypatch.setattr(sample, "_save_png", lambda img, path: (saved.append(path), real_save(img, path)))
    npz = sample.main(args)
    assert len(saved) == 7 and len(set(saved)) == 7
    assert np.array_equal(np.load(npz)["arr_0"], tiny["ref"])


def test_two_processes_give_the_same_images(tiny, tmp_path):
    """torchrun with 2 CPU processes (gloo): each process samples every other missing image, with its own per-image
    noise, so the set equals the single-process one."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "sample.py"), "--ckpt", tiny["ckpt"], "--sample-dir", str(tmp_path)] + FID_ARGS
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "images/s" in r.stdout
    npz = os.path.join(tmp_path, os.path.basename(tiny["npz"]))
    assert np.array_equal(np.load(npz)["arr_0"], tiny["ref"])


def test_ctrl_c_stops_with_one_line_and_the_rerun_continues(tiny, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", tiny["ckpt"], "--sample-dir", str(tmp_path),
           *FID_ARGS[:1], "1000", *FID_ARGS[2:]]
    # Ctrl-C's default handling in the child, even when this suite runs as a background job (a shell without job
    # control starts those with SIGINT ignored, and the child would inherit that)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:  # wait until it samples
        if "to sample" in line:
            break
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("sample.py: interrupted; rerun the same command to continue")


def test_grid_mode(tiny, tmp_path):
    """A grid of 3 labels; EMA weights by default, the raw training weights on request."""
    args = ["--ckpt", tiny["ckpt"], "--class-labels", "4", "0", "2", "--mode", "ode", "--heun", "--num-steps", "3",
            "--device", "cpu"]
    grid = np.asarray(Image.open(sample.main(args + ["--grid-path", str(tmp_path / "ema.png")])))
    assert grid.shape == (16 + 4, 8 * 18 + 2, 3) and grid[2:18, 2:18].std() > 5
    raw = np.asarray(Image.open(sample.main(args + ["--grid-path", str(tmp_path / "raw.png"), "--use-model-weights"])))
    assert raw.shape == grid.shape and not np.array_equal(raw, grid)


def test_bad_input_gives_clear_errors(tiny, tmp_path, capsys):
    base = ["--ckpt", tiny["ckpt"], "--device", "cpu", "--num-steps", "2"]
    with pytest.raises(ValueError, match=r"holds SiT-T/4 .*model='SiT-S/4'"):
        sample.main(base + ["--model", "SiT-S/4"])
    with pytest.raises(ValueError, match="input_size=32"):
        sample.main(base + ["--resolution", "32"])
    with pytest.raises(ValueError, match=r"class label\(s\) \[5\] out of range: this model has 5 classes"):
        sample.main(base + ["--class-labels", "0", "5"])
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit):
            sample.main(base + ["--num-fid-samples", bad])
        assert "--num-fid-samples: must be a positive integer" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not found"):
        sample.main(["--ckpt", str(tmp_path / "nope.pt")])
    with pytest.raises(ValueError, match=f"is a folder; pass a checkpoint file, e.g. --ckpt {tiny['ckpt']}$"):
        sample.main(["--ckpt", str(tiny["root"])])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        sample.main(["--ckpt", str(tmp_path / "junk.pt")])
    torch.save(torch.load(tiny["ckpt"])["ema"], tmp_path / "released.pt")
    with pytest.raises(ValueError, match="released EMA state dict: it has no raw training weights"):
        sample.main(["--ckpt", str(tmp_path / "released.pt"), "--use-model-weights"])
    # Another run's checkpoint with the same file name would land in the same folder: refused, nothing mixed.
    other = _save_ours(tmp_path / os.path.basename(tiny["ckpt"]), seed=1)
    with pytest.raises(ValueError, match=r"another configuration \(weights: "):
        sample.main(["--ckpt", other, "--sample-dir", str(tiny["root"] / "ref")] + FID_ARGS)


# --------------------------------------------------------------------------------------------------------------
# Released checkpoint layouts
# --------------------------------------------------------------------------------------------------------------

def test_detects_the_released_architectures():
    """The four released state-dict layouts (keys and shapes in tests/data/official_sit_state_dicts.json) are
    recognized from their shapes alone, and the model built from the detection has exactly those keys/shapes."""
    ref = json.load(open(os.path.join(ROOT, "tests", "data", "official_sit_state_dicts.json")))
    for name, entry in ref.items():
        sd = {k: torch.empty(shape, device="meta") for k, shape in entry["state_dict"].items()}
        c = detect_model_config(sd)
        assert (c["model"], c["input_size"], c["in_channels"], c["num_classes"]) == (name.split()[1], 32, 4, 1000)
        assert c["cls_dim"] == (768 if name.startswith("reg") else None) and c["z_dims"] == entry["z_dims"]
        assert c["encoder_depth"] == entry["encoder_depth"]
        with torch.device("meta"):
            net = SiT_models[c["model"]](**{k: v for k, v in c.items() if k != "model"})
        assert {k: list(v.shape) for k, v in net.state_dict().items()} == entry["state_dict"]


@pytest.mark.filterwarnings("ignore:\\s*!+\\s*VAE HAS RANDOM WEIGHTS")
@pytest.mark.parametrize("layout", ["repa", "reg"])
def test_released_layout_checkpoint_samples_end_to_end(layout, tmp_path):
    """A small latent model saved as the authors release them (REPA: the EMA state dict itself; REG: {'ema': ...}),
    no args: detected, loaded strictly, sampled with CFG and decoded by a random SD-VAE."""
    pytest.importorskip("encoders")
    reg = layout == "reg"
    sd = _tiny_model(0, in_channels=4, input_size=8, cls_dim=16 if reg else None, num_classes=1000,
                     name="SiT-T/2", z_dims=[24]).state_dict()
    path = tmp_path / f"{layout}.pt"
    torch.save({"ema": sd} if reg else sd, path)
    out = sample.main(["--ckpt", str(path), "--class-labels", "1", "999", "--mode", "sde", "--num-steps", "3",
                       "--cfg-scale", "1.8", "--guidance-high", "0.7", "--cls-cfg-scale", "1.5", "--vae", "random",
                       "--grid-path", str(tmp_path / "g.png"), "--device", "cpu"])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (64 + 4, 8 * 66 + 2, 3)
