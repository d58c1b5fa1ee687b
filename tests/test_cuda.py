"""CUDA-only checks, skipped (with the reason) on a machine without a GPU, so CI stays green.

What only a GPU can show: train.py's REG step in bf16, fp16 (+ grad scaler) and fp32, with and without
torch.compile; a bf16 CUDA forward against the fp64 CPU forward of the same weights; exact stop/resume on CUDA;
torchrun with NCCL; the samplers on CUDA against the CPU trajectory; evaluation images that do not depend on which
batch (so which rank) drew them; clear errors for a missing device index and for running out of memory.

Run on a GPU machine with `python -m pytest -q -s tests/test_cuda.py` (-s shows the measured errors)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import plumbing
import sample
import train
from model import SiT_models, build_model, load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SiT-T/8 on 16 px toy images (2x2 tokens + the REG class token), 8 items = one batch of 8.
TINY = ["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "8", "--batch-size", "8",
        "--enc-type", "tiny-vit", "--projector-dim", "64", "--num-workers", "0", "--device", "cuda",
        "--log-every", "1", "--sample-every", "0", "--reg"]


def metrics(exp_dir, key="loss"):
    rows = [json.loads(line) for line in open(os.path.join(exp_dir, "metrics.jsonl"))]
    return [r[key] for r in rows if key in r]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def randomized(model, seed=0):
    """The model with its zero-initialized layers (adaLN-Zero modulations, output layers) drawn at random too, so
    that every block and both outputs carry signal; otherwise a fresh SiT outputs v = 0 and any comparison passes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def fp32_ieee():
    """Full fp32 matmuls for the test, whatever an earlier test in the process set."""
    plumbing.set_tf32(False)
    yield
    plumbing.set_tf32(False)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_reg_training_steps_on_cuda_lower_the_loss_and_stay_finite(tmp_path, precision, compile):
    out = train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "run", "--max-train-steps", "16",
                      "--learning-rate", "2e-3", "--mixed-precision", precision] + (["--compile"] if compile else []))
    loss, cls, repa = metrics(out["exp_dir"]), metrics(out["exp_dir"], "cls"), metrics(out["exp_dir"], "repa")
    assert len(loss) == 16 and all(map(torch.isfinite, torch.tensor(loss + cls + repa))), loss
    # Step 1 has the zero-output loss; 16 steps on one fixed batch bring it well below (as on the CPU).
    assert sum(loss[-4:]) / 4 < 0.85 * loss[0], loss
    ckpt = load(os.path.join(out["exp_dir"], "checkpoints", "0000016.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])  # compiled models save plain keys
    if precision == "fp16":  # the grad scaler ran and is saved for resumption
        assert ckpt["scaler"]["scale"] > 0
    log = open(os.path.join(out["exp_dir"], "log.txt")).read()
    assert "on cuda:0" in log and f"{precision} autocast" in log


def test_bf16_cuda_forward_matches_the_fp64_cpu_forward(fp32_ieee):
    """SiT-S/2 + REPA projector + REG class token, 256 tokens + 1, random weights everywhere.

    Tolerance: bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3); each matmul input is rounded once and the
    error of 12 residual blocks adds up roughly as a random walk, so a relative error of a few 1e-3 is expected and
    2e-2 leaves room without hiding a real bug (a wrong kernel or layout gives errors of order 1). Full fp32 on the GPU
    must agree to 1e-5 (roundoff 6e-8 times the depth), TF32 (10-bit mantissa) to 5e-3."""
    torch.manual_seed(0)
    ref_model = randomized(SiT_models["SiT-S/2"](input_size=32, z_dims=[768], cls_dim=768, encoder_depth=4)).eval()
    x, t, y = torch.randn(4, 4, 32, 32), torch.rand(4), torch.tensor([1, 7, 999, 1000])
    cls = torch.randn(4, 768)
    with torch.no_grad():
        ref = ref_model.double()(x.double(), t.double(), y, cls=cls.double())
        gpu_model = ref_model.float().cuda()
        inputs = (x.cuda(), t.cuda(), y.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu_model(*inputs, cls=cls.cuda())
        fp32 = gpu_model(*inputs, cls=cls.cuda())
        plumbing.set_tf32(True)
        tf32 = gpu_model(*inputs, cls=cls.cuda())
    for name, out, tol in (("bf16", bf16, 2e-2), ("fp32", fp32, 1e-5), ("tf32", tf32, 5e-3)):
        errs = {"v": rel_err(out[0], ref[0]), "zs": rel_err(out[1][0], ref[1][0]), "cls_v": rel_err(out[2], ref[2])}
        print(f"\n{name} CUDA vs fp64 CPU, relative error: {errs}")
        assert all(e < tol for e in errs.values()), (name, errs)
    assert rel_err(bf16[0], ref[0]) > 1e-4  # the autocast really ran in bf16


def _max_abs_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_stop_and_resume_on_cuda_continues_exactly(tmp_path):
    """6 steps straight vs 3 + resume to 6 (REG, bf16, label dropout, grad accumulation, sample grids in between).
    A second uninterrupted run measures the GPU's own run-to-run spread: where the kernels are deterministic the
    resumed run must equal the straight one bit for bit; otherwise it may differ by no more than that spread."""
    common = [*TINY, "--output-dir", str(tmp_path), "--toy-samples", "40", "--grad-accum", "2", "--sample-every", "2",
              "--num-sample-images", "4", "--sample-steps", "2", "--checkpointing-steps", "100"]
    train.main([*common, "--exp-name", "straight", "--max-train-steps", "6"])
    train.main([*common, "--exp-name", "again", "--max-train-steps", "6"])
    train.main([*common, "--exp-name", "stopped", "--max-train-steps", "3"])
    train.main([*common, "--exp-name", "stopped", "--max-train-steps", "6", "--resume", "auto"])
    a, again, b = (load(tmp_path / n / "checkpoints" / "0000006.pt") for n in ("straight", "again", "stopped"))
    assert a["steps"] == b["steps"] == 6 and a["data"] == b["data"]
    spread = max(_max_abs_diff(a[k], again[k]) for k in ("model", "ema"))
    diff = max(_max_abs_diff(a[k], b[k]) for k in ("model", "ema"))
    print(f"\nCUDA stop/resume: max |resumed - straight| = {diff:.3g}, run-to-run spread = {spread:.3g}")
    assert diff <= spread, (diff, spread)
    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "straight") or spread > 0
    mid = load(tmp_path / "stopped" / "checkpoints" / "0000003.pt")
    assert not torch.equal(mid["model"]["final_layer.linear.weight"], b["model"]["final_layer.linear.weight"])


def _torchrun(tmp_path, nproc, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train.py"), *TINY, "--output-dir", str(tmp_path), *flags]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_torchrun_single_process_initialises_nccl_and_trains(tmp_path):
    r = _torchrun(tmp_path, 1, "--exp-name", "nccl", "--max-train-steps", "3", "--checkpointing-steps", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 1 (nccl) on cuda:0" in r.stdout
    assert os.listdir(tmp_path / "nccl" / "checkpoints") == ["0000003.pt"]


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="checks the message for more ranks than GPUs")
def test_more_ranks_than_gpus_is_refused_with_the_fix(tmp_path):
    r = _torchrun(tmp_path, 2, "--exp-name", "two", "--max-train-steps", "3")
    assert r.returncode != 0
    assert "only 1 GPU(s) are visible: use --nproc_per_node=1" in r.stdout + r.stderr


def _tiny_sampler_model(seed=0):
    torch.manual_seed(seed)
    return randomized(SiT_models["SiT-S/2"](input_size=16, z_dims=[], cls_dim=64), seed).eval()


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_sampler_on_cuda_follows_the_cpu_trajectory(fp32_ieee, mode):
    """The same model, noise and labels (per-image CPU generators) on CPU and CUDA, fp32, CFG 2 on [0, 0.7] and
    class-token CFG 2: the final latents agree to fp32 roundoff accumulated over the steps."""
    model = _tiny_sampler_model()
    y = torch.tensor([0, 5, 9, 999])
    ends = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        gens = sample.image_generators(0, range(4), "cpu")
        z, cls, _ = sample.initial_noise(gens, m, y)
        x, c = sample.SAMPLERS[mode](m, z.to(device), y.to(device), num_steps=40, heun=True, cfg_scale=2.0,
                                     guidance_low=0.0, guidance_high=0.7, cls_latents=cls.to(device), cls_cfg_scale=2.0,
                                     generator=gens, return_cls=True)
        ends[device] = (x, c)
    ex, ec = rel_err(ends["cuda"][0], ends["cpu"][0]), rel_err(ends["cuda"][1], ends["cpu"][1])
    print(f"\n{mode} sampler CUDA vs CPU (fp32): relative error x {ex:.2e}, cls {ec:.2e}")
    assert ex < 1e-4 and ec < 1e-4, (ex, ec)
    assert ends["cpu"][0].abs().mean() > 0.1  # a real trajectory, not a collapsed one


def test_evaluation_images_do_not_depend_on_the_rank_that_draws_them(tmp_path):
    """One GPU cannot run 2 NCCL ranks, so the 2-process run is checked through what it relies on: rank r of 2 draws
    images r, r+2, ... in batches of the same size. sample.py's evaluation mode (1 process, batches [0..3], [4..7])
    must write exactly the images that batches [0, 2, 4, 6] and [1, 3, 5, 7] give."""
    out = train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "m", "--max-train-steps", "4",
                      "--learning-rate", "2e-3"])
    ckpt = os.path.join(out["exp_dir"], "checkpoints", "0000004.pt")
    flags = ["--ckpt", ckpt, "--use-model-weights", "--device", "cuda", "--mode", "sde", "--num-steps", "10",
             "--cfg-scale", "2", "--cls-cfg-scale", "2", "--guidance-high", "0.7", "--per-proc-batch-size", "4",
             "--sample-dir", str(tmp_path / "s")]
    npz = sample.main([*flags, "--num-fid-samples", "8"])
    import numpy as np
    written = np.load(npz)["arr_0"]
    args = sample.parse_args(flags)
    sd, ckpt_args = load_checkpoint(ckpt, use_model_weights=True)
    model, _ = build_model(sd, ckpt_args, device=torch.device("cuda"))
    for idx in ([0, 2, 4, 6], [1, 3, 5, 7]):
        images, _ = sample._sample_batch(args, model, None, 1.0, "linear", idx, None, torch.device("cuda"))
        assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), written[idx]), idx
    assert len({written[i].tobytes() for i in range(8)}) == 8  # 8 different images


def test_missing_device_index_and_out_of_memory_give_clear_errors(tmp_path, capsys):
    n = torch.cuda.device_count()
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--device", f"cuda:{n}", "--output-dir", str(tmp_path), "--max-train-steps", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"only {n} CUDA device(s) visible" in err and "Traceback" not in err
    # A batch far beyond the GPU's memory: SiT-B/2 at 256 px, 8192 images per step.
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "SiT-B/2", "--reg", "--batch-size", "8192", "--benchmark", "2", "--device", "cuda"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "out of memory" in err and "--micro-batch-size 4096" in err, err
    assert "Traceback" not in err
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# The step's fixed costs on CUDA (issue 30): late stats, the fused clip + AdamW, the one-pass EMA, --profile
# ----------------------------------------------------------------------------------------------------------------

def test_a_nan_loss_on_cuda_stops_before_the_checkpoint_of_the_next_step(tmp_path, monkeypatch, capsys):
    # Step 5's stats are read once step 6 (a checkpoint step) is queued: the run stops naming step 5, keeps 2 and 4.
    real, calls = train.compute_loss, {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(train, "compute_loss", poisoned)
    with pytest.raises(SystemExit):
        train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "nan", "--max-train-steps", "10",
                    "--checkpointing-steps", "2"])
    assert "at step 5;" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "nan" / "checkpoints")) == ["0000002.pt", "0000004.pt"]


def test_fused_clip_and_adamw_and_the_ema_on_cuda_match_the_cpu_arithmetic():
    """The same three clipped AdamW steps and EMA updates on CUDA (fused kernels, clip factor in grad_scale) and on
    the CPU (foreach AdamW, clip_grad_norm_ in place, the released mul-then-add EMA): equal to fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g) for s in [(64, 32), (32,), (5, 5, 5)]]
    grads = [[scale * torch.randn(p.shape, generator=g) for p in start] for scale in (30.0, 0.01, 5.0)]
    results = {}
    for dev in ("cuda", "cpu"):
        params = [p.clone().to(dev).requires_grad_() for p in start]
        ema = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True if dev == "cuda" else None,
                                foreach=None if dev == "cuda" else True)
        scaler = torch.amp.GradScaler(dev, enabled=False)
        for step_grads in grads:
            for p, gr in zip(params, step_grads):
                p.grad = gr.to(dev)
            train.clip_and_step(opt, scaler, params, 1.0)
            opt.zero_grad(set_to_none=True)
            (train.update_ema if dev == "cuda" else train.update_ema_mul_add)(ema, params, 0.9)
        results[dev] = [t.detach().cpu() for t in params + ema]
    for a, b in zip(results["cuda"], results["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_profile_on_cuda_puts_kernel_time_in_every_part(tmp_path):
    prefix = str(tmp_path / "prof")
    train.main(["--profile", prefix, "--model", "SiT-T/4", "--resolution", "32", "--batch-size", "4", "--reg",
                "--enc-type", "tiny-vit", "--projector-dim", "64", "--device", "cuda"])
    r = json.load(open(prefix + ".json"))
    assert r["device"] == "cuda" and r["steps"] == 5
    parts = {row["part"]: row for row in r["parts"]}
    for name in ("target encoder + batch", "SiT forward + loss", "backward", "grad clipping", "optimizer step", "EMA"):
        assert parts[name]["busy_ms_per_step"] > 0, name
    assert r["idle_ms_per_step"] >= 0
    assert "| backward |" in open(prefix + ".md").read()


@pytest.mark.parametrize("mode", ["reduce-overhead"])
def test_compile_mode_with_cuda_graphs_trains_and_checkpoints(tmp_path, mode):
    # CUDA graphs reuse their output memory from one step to the next: the step marks each start, and its stats are
    # copied out of the graphs' outputs before the next step (they are read one step late).
    out = train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "g", "--max-train-steps", "8",
                      "--learning-rate", "2e-3", "--compile", "--compile-mode", mode, "--checkpointing-steps", "4"])
    loss = metrics(out["exp_dir"])
    assert len(loss) == 8 and all(map(torch.isfinite, torch.tensor(loss))), loss
    assert sum(loss[-3:]) / 3 < loss[0], loss
    assert sorted(os.listdir(os.path.join(out["exp_dir"], "checkpoints"))) == ["0000004.pt", "0000008.pt"]
