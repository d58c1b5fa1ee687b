"""The variants the docs promise beside the main path, each against an independent computation written out here:
path types x REPA/REG in the objective, samplers x guidance interval x REG (cosine path, Heun's corrector for the
class token), fp16's grad scaler and another world size on resume, images/s and MFU with gradient accumulation, and
the GPU of each process in a multi-node torchrun. Inventory of what guards what: tests/README.md."""
import json
import math
import os

import pytest
import torch

import checkpoints
import monitor
import plumbing
import train
from losses import compute_loss
from sample import euler_maruyama_sampler, euler_sampler

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

PATHS = ["linear", "cosine"]


def path_coefficients(t, path):
    """alpha_t, sigma_t and their derivatives, written out (SiT; REPA §3), for a float or a tensor t."""
    if path == "linear":
        return 1 - t, t, -1.0, 1.0
    c, s = (torch.cos, torch.sin) if torch.is_tensor(t) else (math.cos, math.sin)
    h = math.pi / 2
    return c(h * t), s(h * t), -h * s(h * t), h * c(h * t)


# ----------------------------------------------------------------------------------------------------------------
# The objective on each path, with and without REG's class token
# ----------------------------------------------------------------------------------------------------------------

class ExactVelocity:
    """Knows the clean x and cls_*, so from z_t = alpha_t x + sigma_t eps (on `path`) it recovers eps and returns the
    exact velocity alpha'_t x + sigma'_t eps, for the image and the class token. Zero loss iff the objective noised
    both with this path and the same t, and took the target on this path."""

    def __init__(self, x, cls, path):
        self.x, self.cls, self.path = x, cls, path

    def _v(self, z, clean, t):
        a, s, da, ds = (c.reshape(-1, *[1] * (z.dim() - 1)) if torch.is_tensor(c) else c
                        for c in path_coefficients(t.double(), self.path))
        return da * clean + ds * (z - a * clean) / s

    def __call__(self, z_t, t, y, cls=None):
        return self._v(z_t, self.x, t), [], None if cls is None else self._v(cls, self.cls, t)


@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
@pytest.mark.parametrize("reg", [False, True], ids=["repa", "reg"])
@pytest.mark.parametrize("path", PATHS)
def test_objective_noises_image_and_class_token_on_the_chosen_path(path, reg, weighting):
    g = torch.Generator().manual_seed(0)
    x, cls = torch.randn(64, 2, 3, 3, dtype=torch.float64, generator=g), torch.randn(64, 5, dtype=torch.float64, generator=g)
    y = torch.zeros(64, dtype=torch.long)
    other = "linear" if path == "cosine" else "cosine"
    losses = {}
    for p in (path, other):
        torch.manual_seed(1)
        out = compute_loss(ExactVelocity(x, cls, p), x, y, [], cls_target=cls if reg else None, path_type=path,
                           weighting=weighting, generator=torch.Generator().manual_seed(2))
        losses[p] = (float(out["pred"]), float(out["cls"]))
    assert losses[path][0] < 1e-16 and losses[path][1] < 1e-16
    # the other path's exact model is far off: the check above can fail
    assert losses[other][0] > 1e-3 and (losses[other][1] > 1e-3 if reg else losses[other][1] == 0)


def test_path_and_weighting_flags_reach_the_objective(tmp_path, monkeypatch):
    seen = []
    real = train.compute_loss
    monkeypatch.setattr(train, "compute_loss", lambda *a, **k: seen.append(k) or real(*a, **k))
    train.main(["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "16",
                "--batch-size", "8", "--enc-type", "tiny-vit", "--projector-dim", "32", "--num-workers", "0",
                "--device", "cpu", "--sample-every", "0", "--mixed-precision", "no", "--output-dir", str(tmp_path),
                "--reg", "--path-type", "cosine", "--weighting", "lognormal", "--cls", "0.2", "--proj-coeff", "0.7",
                "--max-train-steps", "2", "--exp-name", "e"])
    assert [(k["path_type"], k["weighting"], k["cls_weight"], k["proj_coeff"]) for k in seen] == \
        [("cosine", "lognormal", 0.2, 0.7)] * 2
    # docs/training.md: the first step is printed at once (with its duration), before the first --log-every line
    log = (tmp_path / "e" / "log.txt").read_text()
    assert "step       1/2 | loss" in log and "first step done in" in log and "step       2/2 | loss" in log


# ----------------------------------------------------------------------------------------------------------------
# Samplers x guidance interval x REG x path: against a transcription of the update rules
# ----------------------------------------------------------------------------------------------------------------

NUM_CLASSES = 3


class CoupledModel:
    """A REG 'model' whose velocities depend on x, the class token, t and the label, and couple the two:
    v = A[y] x + B[y] t + mean(cls),  cls_v = C[y] cls + D[y] (1 - t) + mean(x); row by row."""
    num_classes, cls_dim = NUM_CLASSES, 4

    def __init__(self):
        g = torch.Generator().manual_seed(11)
        self.A, self.C = torch.randn(NUM_CLASSES + 1, generator=g).double(), torch.randn(NUM_CLASSES + 1, generator=g).double()
        self.B = torch.randn(NUM_CLASSES + 1, 2, 2, 2, generator=g).double()
        self.D = torch.randn(NUM_CLASSES + 1, 4, generator=g).double()
        self.batches = []

    def velocities(self, x, cls, t, y):
        """t: a float; the same rule as __call__, for the reference."""
        v = self.A[y].reshape(-1, 1, 1, 1) * x + self.B[y] * t + cls.mean(1).reshape(-1, 1, 1, 1)
        cls_v = self.C[y][:, None] * cls + self.D[y] * (1 - t) + x.flatten(1).mean(1)[:, None]
        return v, cls_v

    def __call__(self, x, t, y, cls=None):
        assert torch.all(t == t[0])
        self.batches.append(len(x))
        v, cls_v = self.velocities(x, cls, float(t[0]), y)
        return v, [], cls_v


def reference_sampler(model, x, cls, y, mode, heun, steps, cfg, cls_cfg, low, high, path, generator=None):
    """SiT's ODE (Euler / Heun, corrector skipped on the last step) and Euler-Maruyama SDE (t = 1 .. 0.04 then a
    mean-only step to 0, w_t = 2t, score s = (a/a' v - x) / (sigma^2 - a/a' sigma' sigma)), CFG u + s (c - u) on
    [low, high] for the image, the class token with its own scale (or its conditional velocity at 0), written out."""
    null = torch.full_like(y, NUM_CLASSES)

    def drift(xx, cc, t, label):
        v, cv = model.velocities(xx, cc, t, label)
        if mode == "ode":
            return v, cv
        a, s, da, ds = path_coefficients(t, path)
        score = lambda vel, pos: (a / da * vel - pos) / (s * s - a / da * ds * s)
        return v - t * score(v, xx), cv - t * score(cv, cc)  # 1/2 w_t = t

    def guided(xx, cc, t, use):
        dx, dc = drift(xx, cc, t, y)
        if not use:
            return dx, dc
        ux, uc = drift(xx, cc, t, null)
        return ux + cfg * (dx - ux), (uc + cls_cfg * (dc - uc) if cls_cfg > 0 else dc)

    if mode == "ode":
        ts = [1 - i / steps for i in range(steps + 1)]
    else:
        ts = [1 - 0.96 * i / (steps - 1) for i in range(steps)] + [0.0]
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        h = tn - t
        use = cfg > 1 and low <= t <= high
        if mode == "sde" and i < len(ts) - 2:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            ceps = torch.randn(cls.shape, generator=generator, dtype=torch.float64)
        dx, dc = guided(x, cls, t, use)
        x1, c1 = x + h * dx, cls + h * dc
        if mode == "ode" and heun and i < steps - 1:
            dx2, dc2 = guided(x1, c1, tn, use)
            x1, c1 = x + h * (dx + dx2) / 2, cls + h * (dc + dc2) / 2
        if mode == "sde" and i < len(ts) - 2:
            x1, c1 = x1 + math.sqrt(2 * t) * math.sqrt(-h) * eps, c1 + math.sqrt(2 * t) * math.sqrt(-h) * ceps
        x, cls = x1, c1
    return x, cls


@pytest.mark.parametrize("cfg, cls_cfg, low, high", [(1.0, 0.0, 0.0, 1.0), (3.0, 2.0, 0.3, 0.7), (2.5, 0.0, 0.0, 1.0)],
                         ids=["no-cfg", "interval+cls-cfg", "cls-conditional"])
@pytest.mark.parametrize("mode, heun", [("ode", False), ("ode", True), ("sde", False)], ids=["euler", "heun", "sde"])
@pytest.mark.parametrize("path", PATHS)
def test_sampler_follows_the_update_rule_for_image_and_class_token(path, mode, heun, cfg, cls_cfg, low, high):
    model = CoupledModel()
    g = torch.Generator().manual_seed(4)
    x, cls = torch.randn(3, 2, 2, 2, generator=g).double(), torch.randn(3, 4, generator=g).double()
    y = torch.tensor([0, 2, 1])
    sampler = euler_sampler if mode == "ode" else euler_maruyama_sampler
    got = sampler(model, x, y, num_steps=5, heun=heun, cfg_scale=cfg, guidance_low=low, guidance_high=high,
                  path_type=path, cls_latents=cls, cls_cfg_scale=cls_cfg, generator=torch.Generator().manual_seed(9),
                  return_cls=True)
    want = reference_sampler(model, x, cls, y, mode, heun, 5, cfg, cls_cfg, low, high, path,
                             generator=torch.Generator().manual_seed(9))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    doubled = [n == 6 for n in model.batches]  # the model runs on [cond; uncond] only where guidance applies
    assert any(doubled) == (cfg > 1) and all(n in (3, 6) for n in model.batches)


# ----------------------------------------------------------------------------------------------------------------
# Resume: fp16's grad scaler, another world size
# ----------------------------------------------------------------------------------------------------------------

TINY = ["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "40", "--batch-size", "8",
        "--enc-type", "tiny-vit", "--projector-dim", "32", "--num-workers", "0", "--device", "cpu",
        "--log-every", "1", "--sample-every", "0", "--checkpointing-steps", "100"]


def test_fp16_resume_continues_the_grad_scaler_state(tmp_path):
    """The scaler's state (scale, steps since the last overflow) travels in the checkpoint: a run stopped at 2 and
    resumed to 4 ends with the uninterrupted run's scaler state, weights and losses."""
    common = [*TINY, "--output-dir", str(tmp_path), "--mixed-precision", "fp16"]
    train.main([*common, "--exp-name", "straight", "--max-train-steps", "4"])
    train.main([*common, "--exp-name", "stopped", "--max-train-steps", "2"])
    train.main([*common, "--exp-name", "stopped", "--max-train-steps", "4"])
    a, b = (torch.load(tmp_path / e / "checkpoints" / "0000004.pt", weights_only=True) for e in ("straight", "stopped"))
    assert a["scaler"]["_growth_tracker"] == 4 and a["scaler"]["scale"] == 2.0 ** 16  # 4 steps without overflow
    assert b["scaler"] == a["scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


class Log:
    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(msg)


def _draws():
    return torch.rand(4).tolist()


def test_resume_on_another_world_size_continues_the_streams_instead_of_restarting_them():
    """The checkpoint's per-rank RNG states only fit its world size. On another one each rank's noise/time stream is
    reseeded from (seed, rank, step): not the fresh run's stream (which would repeat step 0's noise and times), not
    another rank's, and the same on every restart at that step. The same world size takes the saved state back."""
    args = type("A", (), {"seed": 5})()
    cpu = torch.device("cpu")
    saved = [checkpoints.get_rng_state(cpu)] * 2  # written by 2 ranks
    streams = {}
    for rank, step in ((0, 0), (0, 7), (1, 7), (0, 8)):
        checkpoints.seed_rank(args, rank, 1, None if step == 0 else {"rng": saved}, step, cpu, Log())
        streams[rank, step] = _draws()
    assert len({tuple(s) for s in streams.values()}) == 4
    checkpoints.seed_rank(args, 0, 1, {"rng": saved}, 7, cpu, Log())
    assert _draws() == streams[0, 7]
    # same world size: the saved stream itself continues
    torch.manual_seed(123)
    state = checkpoints.get_rng_state(cpu)
    expected = _draws()
    log = Log()
    checkpoints.seed_rank(args, 1, 2, {"rng": [None, state]}, 7, cpu, log)
    assert _draws() == expected and not log.lines


class _Net(torch.nn.Linear):
    pass


@pytest.mark.parametrize("saved_world, world, expected", [(2, 2, (3, 16)), (2, 1, (3, 0)), (4, 8, (3, 0))])
def test_resume_keeps_the_data_position_only_on_the_same_world_size(saved_world, world, expected):
    """Another world size shards the data differently: the epoch is kept, its order restarts (and the log says so)."""
    net, ema = _Net(2, 2), _Net(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    ckpt = {"model": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "steps": 9, "data": [3, 16],
            "world_size": saved_world}
    log = Log()
    step, data = checkpoints.restore(ckpt, "x.pt", net, ema, opt, torch.amp.GradScaler("cpu", enabled=False), world, log)
    assert (step, data) == (9, expected)
    assert any("restarts" in line for line in log.lines) == (saved_world != world)


# ----------------------------------------------------------------------------------------------------------------
# Logged throughput with gradient accumulation; the GPU of each process under torchrun
# ----------------------------------------------------------------------------------------------------------------

class Metrics(Log):
    def metrics(self, step, values):
        self.values = values


def test_logged_images_per_second_and_mfu_count_every_micro_batch(monkeypatch):
    """micro-batch 4 x 3 accumulation steps = 12 images per optimizer step and device; 5 steps in 2 s: 30 images/s;
    MFU = 3 x forward FLOPs x images/s / peak."""
    clock = iter([100.0, 102.0, 102.0])
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
    args = type("A", (), dict(micro_batch=4, grad_accum=3, log_every=5, reg=False))()
    log = Metrics()
    meter = monitor.Meter(log, args, 2e9, 100.0, 10)
    for _ in range(5):
        meter.add(dict.fromkeys(monitor.STATS, 1.0))
    meter.log(5, 0)
    assert log.values["images_per_sec_per_device"] == pytest.approx(30.0)
    assert log.values["mfu"] == pytest.approx(3 * 2e9 * 30.0 / 100e12)
    assert "30.0 img/s/device" in log.lines[-1]


@pytest.mark.parametrize("rank, local_rank", [(9, 1), (0, 0), (15, 7)])
def test_each_torchrun_process_takes_the_gpu_of_its_local_rank(monkeypatch, rank, local_rank):
    """2 nodes x 8 GPUs: global rank 9 is local rank 1 on the second node and must take cuda:1 (not cuda:9)."""
    chosen, groups = [], []
    monkeypatch.setattr(plumbing.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(plumbing.torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(plumbing.torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(plumbing.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(plumbing.dist, "init_process_group", lambda backend, **kw: groups.append(backend))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert plumbing.setup_distributed(None) == (rank, 16, torch.device("cuda", local_rank))
    assert chosen == [local_rank] and groups == ["nccl"]
    monkeypatch.setenv("LOCAL_RANK", "8")  # --nproc_per_node larger than the node's GPUs
    with pytest.raises(plumbing.UsageError, match="--nproc_per_node=8"):
        plumbing.setup_distributed(None)


def test_a_fresh_start_seeds_each_rank_with_seed_plus_rank():
    """docs/training.md: under torchrun each rank is seeded with seed + rank (its own noise, times, label dropout)."""
    args = type("A", (), {"seed": 5})()
    for rank in (0, 3):
        checkpoints.seed_rank(args, rank, 4, None, 0, torch.device("cpu"), Log())
        got = _draws()
        torch.manual_seed(5 + rank)
        assert got == _draws()


@pytest.mark.parametrize("batch, world, cap, accum, micro", [(256, 8, 16, 2, 16), (256, 8, 12, 4, 8),
                                                             (256, 1, 64, 4, 64), (96, 2, 20, 3, 16),
                                                             (256, 8, 32, 1, 32)])
def test_micro_batch_size_sets_the_smallest_accumulation_that_fits(batch, world, cap, accum, micro):
    """--micro-batch-size caps the per-device forward batch; the global batch stays --batch-size: the smallest K
    that divides the local batch (batch / world) into micro-batches of at most the cap."""
    args = train.parse_args(["--data-dir", "toy", "--batch-size", str(batch), "--micro-batch-size", str(cap)])
    train.check_args(args, world)
    assert (args.grad_accum, args.micro_batch) == (accum, micro)
    assert args.micro_batch * args.grad_accum * world == batch


def test_each_torchrun_process_refuses_a_fixed_gpu_index(monkeypatch):
    monkeypatch.setattr(plumbing.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(plumbing.torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(plumbing.UsageError, match="--device cuda:3 under torchrun: each rank takes cuda:LOCAL_RANK"):
        plumbing.setup_distributed("cuda:3")


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("Tesla V100-SXM2-32GB", 125.0), ("NVIDIA GeForce GTX 1080", None)])
def test_mfu_peak_of_the_detected_gpu(monkeypatch, name, peak):
    """docs/training.md: the peak is the dense bf16 TFLOPs of the detected GPU (H100 SXM / H200 989, H100 PCIe 756,
    A100 312, ...), unknown otherwise; --peak-tflops overrides; no peak on the CPU."""
    monkeypatch.setattr(monitor.torch.cuda, "get_device_name", lambda device=None: name)
    assert monitor.device_peak_tflops(torch.device("cuda", 0))[0] == peak
    assert monitor.device_peak_tflops(torch.device("cuda", 0), 400.0)[0] == 400.0
    assert monitor.device_peak_tflops(torch.device("cpu"))[0] is None


def test_log_line_values_are_means_since_the_last_line(monkeypatch):
    clock = iter([0.0, 4.0, 4.0])
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
    args = type("A", (), dict(micro_batch=2, grad_accum=1, log_every=4, reg=True))()
    log = Metrics()
    meter = monitor.Meter(log, args, 1e9, None, 8)
    for i in range(4):
        meter.add({k: float(i + j) for j, k in enumerate(monitor.STATS)})  # loss 0..3, pred 1..4, ...
    meter.log(4, 2)
    v = log.values
    assert [v[k] for k in monitor.STATS] == [1.5, 2.5, 3.5, 4.5, 5.5] and v["epoch"] == 2
    assert "mfu" not in v and v["images_per_sec_per_device"] == 2.0  # 4 steps x 2 images in 4 s; no peak, no MFU
    assert "cls 4.5000" in log.lines[-1]


def test_fp16_leaves_an_overflowing_grad_norm_to_its_scaler_other_precisions_stop():
    """A non-finite grad norm under fp16 is the grad scaler's business (it skips the step and lowers the scale); in
    bf16 / fp32 it stops the run naming the grad norm. A non-finite loss term stops every precision."""
    stats = dict(loss=1.0, pred=1.0, repa=0.0, cls=0.0, grad_norm=float("inf"))
    fp16 = type("A", (), dict(mixed_precision="fp16", learning_rate=1e-4))()
    bf16 = type("A", (), dict(mixed_precision="bf16", learning_rate=1e-4))()
    monitor.check_finite(stats, 3, fp16, None)
    with pytest.raises(FloatingPointError, match="non-finite grad norm .* at step 3"):
        monitor.check_finite(stats, 3, bf16, None)
    with pytest.raises(FloatingPointError, match="non-finite pred .*--mixed-precision bf16"):
        monitor.check_finite({**stats, "pred": float("nan")}, 3, fp16, None)


class Recorder:
    """Stands in for a sampler: records its arguments and the autocast it runs under, returns zeros."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, z, y, **kw):
        self.calls.append(dict(kw, autocast=torch.is_autocast_enabled("cpu"), dtype=torch.get_autocast_dtype("cpu")))
        return torch.zeros_like(z, dtype=torch.float64)


def _reg_checkpoint(path, path_type):
    from model import SiT_models
    torch.manual_seed(0)
    sit = SiT_models["SiT-T/8"](input_size=16, in_channels=3, num_classes=4, z_dims=[], encoder_depth=2, cls_dim=8)
    args = dict(model="SiT-T/8", input_size=16, in_channels=3, num_classes=4, encoder_depth=2, z_dims=[], cls_dim=8,
                projector_dim=32, path_type=path_type, resolution=16, latent_scale=1.0, pixel_space=True,
                data_dir="toy")
    torch.save({"model": sit.state_dict(), "ema": sit.state_dict(), "opt": {}, "args": args, "steps": 1}, path)
    return str(path)


@pytest.mark.parametrize("trained, flags, path", [("cosine", [], "cosine"), ("linear", [], "linear"),
                                                  ("cosine", ["--path-type", "linear"], "linear")])
def test_sample_command_uses_the_training_runs_path_and_passes_each_flag(tmp_path, monkeypatch, trained, flags, path):
    import sample
    rec = Recorder()
    monkeypatch.setitem(sample.SAMPLERS, "sde", rec)
    ckpt = _reg_checkpoint(tmp_path / "c.pt", trained)
    sample.main(["--ckpt", ckpt, "--class-labels", "1", "3", "--num-steps", "7", "--cfg-scale", "2.5",
                 "--cls-cfg-scale", "1.5", "--guidance-low", "0.1", "--guidance-high", "0.6", "--device", "cpu",
                 "--grid-path", str(tmp_path / "g.png"), *flags])
    (kw,) = rec.calls
    assert (kw["path_type"], kw["num_steps"], kw["cfg_scale"], kw["cls_cfg_scale"], kw["guidance_low"],
            kw["guidance_high"]) == (path, 7, 2.5, 1.5, 0.1, 0.6)
    assert kw["cls_latents"].shape == (2, 8) and kw["autocast"] is False  # a CPU samples in fp32 by default


def test_sample_command_precision_fp32_and_ode_heun(tmp_path, monkeypatch):
    import sample
    rec = Recorder()
    monkeypatch.setitem(sample.SAMPLERS, "ode", rec)
    ckpt = _reg_checkpoint(tmp_path / "c.pt", "linear")
    sample.main(["--ckpt", ckpt, "--class-labels", "0", "--mode", "ode", "--heun", "--num-steps", "3",
                 "--precision", "fp32", "--device", "cpu", "--grid-path", str(tmp_path / "g.png")])
    (kw,) = rec.calls
    assert kw["heun"] is True and kw["num_steps"] == 3 and kw["autocast"] is False


def test_monitoring_grid_guides_image_and_class_token_with_sample_cfg_scale(tmp_path, monkeypatch):
    """docs: EMA grids by Euler ODE with --sample-steps; --sample-cfg-scale guides the image and, with REG, the class
    token too."""
    rec = Recorder()
    monkeypatch.setattr(monitor.sample, "euler_sampler", rec)
    args = type("A", (), dict(sample_steps=6, path_type="cosine", sample_cfg_scale=2.5, pixel_space=True,
                              latent_scale=1.0, cfg_prob=0.1, num_classes=4))()
    noise = (torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 3]), torch.randn(4, 8))
    monitor.sample_grid(None, noise, args, torch.autocast("cpu", enabled=False), None, str(tmp_path / "g.png"))
    (kw,) = rec.calls
    assert (kw["num_steps"], kw["cfg_scale"], kw["cls_cfg_scale"], kw["path_type"]) == (6, 2.5, 2.5, "cosine")
    assert kw["cls_latents"] is noise[2]


# ----------------------------------------------------------------------------------------------------------------
# One experiment folder, one configuration: what may change between two runs of it
# ----------------------------------------------------------------------------------------------------------------

def _resolved(*flags):
    args = train.parse_args(["--data-dir", "toy", *flags])
    train.check_args(args, 1)
    args.method = train.method_name(args)
    return args


# docs/training.md, "Settings that may change between two runs of one experiment, without --resume".
MAY_CHANGE = [("--learning-rate", "5e-05"), ("--max-train-steps", "9"), ("--epochs", "3"), ("--log-every", "7"),
              ("--checkpointing-steps", "5"), ("--sample-every", "3"), ("--num-sample-images", "4"),
              ("--sample-steps", "9"), ("--sample-cfg-scale", "2"), ("--vae", "mse"), ("--num-workers", "1"),
              ("--device", "cpu"), ("--micro-batch-size", "8"), ("--grad-accum", "2"), ("--compile",),
              ("--grad-checkpointing",), ("--output-dir", "elsewhere"), ("--enc-path", "/w/dinov2.safetensors")]
# "Settings that change the model (size, method, encoder, projector, data shape, path) are refused even with --resume."
MODEL = [("--model", "SiT-B/2", "model"), ("--reg", None, "reg"), ("--enc-type", "dinov2-vit-s", "enc_type"),
         ("--encoder-depth", "6", "encoder_depth"), ("--projector-dim", "1024", "projector_dim"),
         ("--path-type", "cosine", "path_type"), ("--resolution", "512", "resolution")]


@pytest.mark.parametrize("flag", MAY_CHANGE, ids=[f[0] for f in MAY_CHANGE])
def test_run_settings_may_change_between_two_runs_of_one_experiment(flag):
    from run_folder import config_differences
    old = dict(vars(_resolved("--seed", "3")))
    assert config_differences(old, _resolved("--seed", "3", *flag)) == []
    assert config_differences(old, _resolved("--seed", "4", *flag)) != []  # the seed is part of the configuration


@pytest.mark.parametrize("flag, value, key", MODEL, ids=[m[2] for m in MODEL])
def test_model_settings_are_refused_even_with_resume(flag, value, key):
    from run_folder import config_differences
    old = dict(vars(_resolved()))
    new = _resolved(flag, *([value] if value else []))
    assert any(d.startswith(f"{key}:") for d in config_differences(old, new))
    with pytest.raises(plumbing.UsageError, match=rf"other settings: .*{key}: checkpoint"):
        checkpoints.check_resume_compatible(old, new, "c.pt")


def test_other_settings_are_refused_without_resume_and_continue_with_it():
    """--weighting changes the objective, not the model: the same command with it is refused (another experiment),
    with --resume auto it continues."""
    from run_folder import config_differences
    old = dict(vars(_resolved()))
    new = _resolved("--weighting", "lognormal")
    assert [d.split(":")[0] for d in config_differences(old, new)] == ["weighting"]
    checkpoints.check_resume_compatible(old, new, "c.pt")


def test_sample_defaults_are_the_papers_fid_settings_and_train_aliases_read_as_documented():
    """docs: sample.py defaults to SDE, 250 steps, CFG 1, guidance on [0, 1], the `ema` VAE, bf16 on a GPU (released
    generate.py: ODE, 50 steps, CFG 1.5); train.py's --ckpt-every, --lr, --results-dir, --sampling-steps aliases."""
    import sample
    a = sample.parse_args(["--ckpt", "c.pt"])
    assert (a.mode, a.num_steps, a.cfg_scale, a.guidance_low, a.guidance_high, a.vae, a.precision, a.heun) == \
        ("sde", 250, 1.0, 0.0, 1.0, "ema", None, False)  # precision: bf16 on CUDA, fp32 on a CPU, resolved later
    t = train.parse_args(["--ckpt-every", "7", "--lr", "3e-4", "--results-dir", "R", "--sampling-steps", "9"])
    assert (t.checkpointing_steps, t.learning_rate, t.output_dir, t.sample_every) == (7, 3e-4, "R", 9)


def test_smoke_preset_is_the_documented_one():
    """docs/training.md: SiT-T/4 with REG on the 16 px toy set, the trained toy-vit target, 512-wide projector, lr 3e-3,
    EMA 0.98, 400 steps of batch 32 in fp32 on the CPU, checkpoints and EMA grids (64 images, 25 Euler steps, CFG 2)
    at steps 200 and 400."""
    a = train.parse_args(["--smoke"])
    assert (a.model, a.resolution, a.data_dir, a.enc_type, a.reg, a.projector_dim) == ("SiT-T/4", 16, "toy", "toy-vit",
                                                                                       True, 512)
    assert (a.learning_rate, a.ema_decay, a.max_train_steps, a.batch_size, a.mixed_precision, a.device) == \
        (3e-3, 0.98, 400, 32, "no", "cpu")
    assert (a.checkpointing_steps, a.sample_every, a.num_sample_images, a.sample_steps, a.sample_cfg_scale) == \
        (200, 200, 64, 25, 2.0)


def test_data_workers_default_to_four_per_rank_at_most_the_cpus_available(monkeypatch):
    for cpus, expected in ((2, 2), (16, 4)):
        monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert _resolved().num_workers == expected
    assert _resolved("--num-workers", "7").num_workers == 7


# ----------------------------------------------------------------------------------------------------------------
# Around the step: time sampling per path, the logged loss of an accumulated step, the mean over ranks, the shards
# ----------------------------------------------------------------------------------------------------------------

class RecordTime:
    def __init__(self):
        self.t = None

    def __call__(self, z_t, t, y, cls=None):
        self.t = t
        return torch.zeros_like(z_t), [], None


@pytest.mark.parametrize("path", PATHS)
def test_the_objectives_lognormal_times_follow_the_path(path):
    """lognormal: s = e^n, n ~ N(0, 1); t = s / (1 + s) on the linear path, 2/pi atan(s) on the cosine one, so
    n = log(t / (1 - t)) or log tan(pi t / 2) is standard normal (the other path's map gives a std of about 0.8)."""
    rec = RecordTime()
    x = torch.zeros(8000, 1, 1, 1, dtype=torch.float64)
    compute_loss(rec, x, torch.zeros(8000, dtype=torch.long), [], path_type=path, weighting="lognormal",
                 generator=torch.Generator().manual_seed(0))
    t = rec.t
    n = torch.log(t / (1 - t)) if path == "linear" else torch.log(torch.tan(math.pi * t / 2))
    assert abs(float(n.mean())) < 0.05 and abs(float(n.std()) - 1) < 0.04


def test_an_accumulated_steps_logged_loss_is_the_mean_over_its_micro_batches(tmp_path, monkeypatch):
    seen = []
    real = train.compute_loss

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append({key: float(out[key]) for key in ("loss", "pred", "repa", "cls")})
        return out
    monkeypatch.setattr(train, "compute_loss", spy)
    train.main([*TINY, "--output-dir", str(tmp_path), "--reg", "--grad-accum", "4", "--max-train-steps", "1",
                "--exp-name", "acc"])
    (row,) = [json.loads(line) for line in open(tmp_path / "acc" / "metrics.jsonl")]
    assert len(seen) == 4
    for key in ("loss", "pred", "repa", "cls"):
        assert row[key] == pytest.approx(sum(s[key] for s in seen) / 4, rel=1e-6)


def test_logged_statistics_are_the_mean_over_ranks_and_any_rank_can_stop_all(monkeypatch):
    """One all-reduce per step (simulated: the other rank holds 3, 5, 7, 9, 11 and asked to stop)."""
    other = torch.tensor([3.0, 5.0, 7.0, 9.0, 11.0, 1.0])
    monkeypatch.setattr(monitor.dist, "all_reduce", lambda t: t.add_(other))
    stats = dict(zip(monitor.STATS, torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])))
    means, stop = monitor.StepStats(stats, False, 1, 0, 2, torch.device("cpu")).read()
    assert means == dict(zip(monitor.STATS, [2.0, 3.0, 4.0, 5.0, 6.0])) and stop is True


def test_each_rank_reads_its_own_shard_of_the_data():
    args = _resolved("--toy-samples", "40", "--batch-size", "8", "--num-workers", "0", "--resolution", "16")
    train.check_args(args, 2)
    dataset, classes, _ = train.resolve_data(args, False)
    seen = []
    for rank in (0, 1):
        b = train.make_batches(args, dataset, (0, 0), rank, 2, torch.device("cpu"), classes, False)
        b.sampler.set_epoch(0)
        seen.append(list(iter(b.sampler)))
        assert b.loader.batch_size == 4  # 8 global over 2 ranks
    assert len(seen[0]) == len(seen[1]) == 20 and sorted(seen[0] + seen[1]) == list(range(40))


def test_benchmark_batches_have_the_sd_vae_latent_shapes_of_the_resolution():
    args = train.parse_args(["--benchmark", "3", "--resolution", "512"])
    train.check_args(args, 1)
    dataset, classes, grid = train.resolve_data(args, True)
    assert dataset is None and classes == 1000
    assert (args.latent_channels, args.latent_size, args.latent_scale, args.pixel_space) == (4, 64, 0.18215, False)
    assert grid == 32  # SiT-XL/2 on 64 x 64 latents


def test_several_target_encoders_give_one_projector_and_one_alignment_target_each(tmp_path, monkeypatch):
    """docs/encoders.md: `--enc-type a,b` is multi-target REPA (one projector and one loss term per encoder,
    averaged); with REG the class token is the first encoder's and each target is [cls, patches]."""
    seen = []
    real, real_load = train.compute_loss, train.encoders_module.load_encoders

    def two_different(*a, **k):  # the random tiny-vit twice: make the second one another network
        encs = real_load(*a, **k)
        with torch.no_grad():
            for p in encs[1].parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return encs
    monkeypatch.setattr(train.encoders_module, "load_encoders", two_different)
    monkeypatch.setattr(train, "compute_loss", lambda model, x, y, zs, cls, **k: seen.append((zs, cls)) or
                        real(model, x, y, zs, cls, **k))
    train.main([*TINY, "--output-dir", str(tmp_path), "--reg", "--enc-type", "tiny-vit,tiny-vit", "--max-train-steps",
                "1", "--exp-name", "two"])
    ((zs, cls),) = seen
    assert [tuple(z.shape) for z in zs] == [(8, 1 + 4, 192)] * 2
    assert torch.equal(zs[0][:, 0], cls) and not torch.allclose(zs[1][:, 0], cls)
    ckpt = torch.load(tmp_path / "two" / "checkpoints" / "0000001.pt", weights_only=True)
    assert ckpt["args"]["z_dims"] == [192, 192] and {k.split(".")[1] for k in ckpt["model"] if k.startswith("projectors.")} == {"0", "1"}


def test_toy_style_reaches_the_data_and_the_toy_target_encoder(monkeypatch):
    """docs/training.md: `--toy-style sizes` trains on the toy set whose shapes come in any size, and the toy target
    encoder is trained on that set too (its own cached file)."""
    args = _resolved("--enc-type", "toy-vit", "--toy-style", "sizes", "--model", "SiT-T/8", "--resolution", "16",
                     "--toy-samples", "16", "--batch-size", "8", "--projector-dim", "32", "--num-workers", "0",
                     "--device", "cpu", "--mixed-precision", "no")
    dataset, _, grid = train.resolve_data(args, False)
    assert dataset.style == "sizes"
    styles = {}
    real_load = train.encoders_module.load_encoders
    monkeypatch.setattr(train.toy_world, "ensure_toy_encoder", lambda name, grid, log=None, style=None:
                        styles.update(trained=(name, style)))
    monkeypatch.setattr(train.encoders_module, "load_encoders", lambda name, device, **k: styles.update(
        loaded=(name, k.get("toy_style"))) or real_load("tiny-vit", device, resolution=16, grid_size=grid,
                                                        random_init=True))
    train.build_training(args, torch.device("cpu"), grid, False, Log())
    assert styles == {"trained": ("toy-vit", "sizes"), "loaded": ("toy-vit", "sizes")}


def test_report_to_mirrors_the_metrics_on_rank_0_and_a_missing_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import sys
    import types
    logged = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **k: types.SimpleNamespace(log=lambda values, step: logged.append((values, step)),
                                                  finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = type("A", (), dict(report_to="wandb", exp_name="e"))()
    for rank in (1, 0):  # only rank 0 writes and mirrors
        log = monitor.Logger(str(tmp_path / f"r{rank}"), rank, args)
        log.info("hello")
        log.metrics(5, {"loss": 0.25})
        log.close()
    assert logged == [({"loss": 0.25}, 5)] and not (tmp_path / "r1").exists()
    assert json.loads((tmp_path / "r0" / "metrics.jsonl").read_text()) == {"step": 5, "loss": 0.25}
    assert "hello" in (tmp_path / "r0" / "log.txt").read_text() and capsys.readouterr().out.count("hello") == 1
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(plumbing.UsageError, match="--report-to wandb needs `pip install wandb`"):
        _resolved("--report-to", "wandb")


def test_epochs_end_the_run_at_an_epoch_boundary_with_a_checkpoint(tmp_path):
    """16 toy items, batch 8: two steps per epoch. --epochs 2 ends after step 4 (--max-train-steps is far away) and,
    as any end of a run, writes a checkpoint; the same command with --epochs 3 continues to step 6."""
    flags = [*TINY, "--toy-samples", "16", "--output-dir", str(tmp_path), "--enc-type", "none", "--proj-coeff", "0",
             "--max-train-steps", "50", "--exp-name", "ep"]
    assert train.main([*flags, "--epochs", "2"])["steps"] == 4
    ckpt = torch.load(tmp_path / "ep" / "checkpoints" / "0000004.pt", weights_only=True)
    assert ckpt["data"] == [1, 16]  # epoch 1 (the second) fully read
    assert train.main([*flags, "--epochs", "3"])["steps"] == 6
    assert sorted(os.listdir(tmp_path / "ep" / "checkpoints")) == ["0000004.pt", "0000006.pt"]


def test_the_toy_runs_real_grid_is_drawn_in_its_own_toy_style(tmp_path, monkeypatch):
    """samples/real.png: real toy images of the grid's classes, drawn in the run's --toy-style (once)."""
    styles = []
    images, labels = torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.tensor([0, 5, 7, 11])
    monkeypatch.setattr(monitor, "sample_grid", lambda *a: (images, labels))
    real = monitor.toy_world.toy_class_examples
    monkeypatch.setattr(monitor.toy_world, "toy_class_examples", lambda lab, res, style=None: styles.append((res, style))
                        or real(lab, res, style=style))
    args = type("A", (), dict(data_dir="toy", resolution=16, toy_style="sizes", cfg_prob=0.1))()
    log = Metrics()
    (tmp_path / "samples").mkdir()
    for step in (1, 2):
        monitor.save_samples(None, (None, None), step, args, None, str(tmp_path), log)
    assert styles == [(16, "sizes")] and (tmp_path / "samples" / "real.png").is_file()
    assert set(log.values) == {"toy_fd", "toy_colour", "toy_shape", "toy_joint"}


def test_a_fresh_start_is_refused_in_a_folder_that_holds_another_configurations_logs(tmp_path):
    """docs/training.md: a command with another configuration in a folder that holds another run's args.json (no
    checkpoints yet) is refused before anything is written, naming the settings; the same configuration starts."""
    from run_folder import choose_start
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "args.json").write_text(json.dumps(vars(_resolved("--seed", "3"))))
    assert choose_start(_resolved("--seed", "3", "--learning-rate", "5e-5"), str(exp)) == (None, [])
    with pytest.raises(plumbing.UsageError, match=r"holds the logs of another configuration \(path_type: 'linear'"):
        choose_start(_resolved("--seed", "3", "--path-type", "cosine"), str(exp))
    assert os.listdir(exp) == ["args.json"]


@pytest.mark.parametrize("minutes, taken", [(9, False), (11, True)])
def test_another_hosts_lock_counts_for_ten_minutes_without_heartbeat(tmp_path, minutes, taken):
    from run_folder import ExperimentFolder
    exp = tmp_path / "exp"
    exp.mkdir()
    lock = exp / "lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    old = __import__("time").time() - 60 * minutes
    os.utime(lock, (old, old))
    if not taken:
        with pytest.raises(plumbing.UsageError, match="in use by another run"):
            ExperimentFolder(str(exp))
        return
    folder = ExperimentFolder(str(exp))
    try:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and "no heartbeat for" in folder.note
    finally:
        folder.release()


def test_every_adamw_flag_given_on_resume_reaches_the_restored_optimizer():
    """docs/training.md: the learning rate and the other AdamW flags are written into the restored optimizer."""
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    args = _resolved("--learning-rate", "3e-5", "--adam-beta1", "0.8", "--adam-beta2", "0.95",
                     "--adam-weight-decay", "0.01", "--adam-epsilon", "1e-6")
    checkpoints.set_optimizer_flags(opt, args)
    (g,) = opt.param_groups
    assert (g["lr"], g["betas"], g["weight_decay"], g["eps"]) == (3e-5, (0.8, 0.95), 0.01, 1e-6)
