"""The training step's fixed costs, kept honest (issue 30): the one-pass EMA and the fused clip + AdamW against the
written-out released arithmetic, the stats read one step late (a NaN still stops the run before any checkpoint of
the bad state, naming the step; all ranks agree to stop), the windowed --benchmark, --profile's table, and
--compile-mode reaching torch.compile. CPU, offline, SiT-T on tiny inputs."""
import json
import os
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import monitor
import profiling
import train

TINY = ["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "40", "--batch-size", "8",
        "--enc-type", "tiny-vit", "--projector-dim", "64", "--num-workers", "0", "--device", "cpu",
        "--log-every", "1", "--sample-every", "0"]
# Synthetic-data runs (--benchmark / --profile): SiT-T/4 on 32 px images, i.e. 4x4 latents, 1 token (+1 with REG)
BENCH = ["--model", "SiT-T/4", "--resolution", "32", "--batch-size", "2", "--reg", "--enc-type", "tiny-vit",
         "--projector-dim", "64", "--device", "cpu", "--mixed-precision", "no"]
EPS32 = 2.0 ** -23  # fp32 machine epsilon (spacing of floats in [1, 2))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------------
# EMA: one lerp pass vs the released mul-then-add
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", [0.9999, 0.98])
def test_one_pass_ema_equals_the_released_mul_then_add_to_rounding(decay):
    """100 EMA updates of weights ~N(0, 1) that move each step. The released arithmetic, written out here:
    ema = ema * d + p * (1 - d) (each operation rounded to fp32). Bound: both are within a few fp32 roundings of
    the exact (fp64) update per step, and the EMA contracts old errors by d, so after K steps they differ by at
    most 2 K eps32 max|theta| elementwise; measured: well under a tenth of it."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (7, 3, 5)]
    ema = [torch.randn(s, generator=g) for s in shapes]
    start = [e.clone() for e in ema]
    released = [e.clone() for e in ema]
    exact = [e.double() for e in ema]
    theta = [e.clone() for e in ema]
    steps = 100
    for _ in range(steps):
        theta = [t + 0.1 * torch.randn(t.shape, generator=g) for t in theta]
        train.update_ema(ema, theta, decay)
        released = [r * decay + t * (1 - decay) for r, t in zip(released, theta)]
        exact = [x * decay + t.double() * (1 - decay) for x, t in zip(exact, theta)]
    scale = max(max(float(t.abs().max()), float(e.abs().max())) for t, e in zip(theta, ema))
    bound = 2 * steps * EPS32 * scale
    diff = max(float((e - r).abs().max()) for e, r in zip(ema, released))
    err = max(float((e.double() - x).abs().max()) for e, x in zip(ema, exact))
    err_released = max(float((r.double() - x).abs().max()) for r, x in zip(released, exact))
    print(f"decay {decay}: |lerp - released| {diff:.2e}, |lerp - exact| {err:.2e}, |released - exact| "
          f"{err_released:.2e}, bound {bound:.2e}")
    assert 0 < diff <= bound  # not bit-identical (a different formula), but equal to rounding
    assert err <= bound and err_released <= bound
    # The EMA really moved toward theta (a no-op update would also sit within the bound of nothing).
    assert max(float((e - e0).abs().max()) for e, e0 in zip(ema, start)) > 1e-3


def test_the_released_ema_arithmetic_is_still_reachable():
    ema, theta = [torch.tensor([1.0, -2.0])], [torch.tensor([3.0, 5.0])]
    train.update_ema_mul_add(ema, theta, 0.75)
    assert ema[0].tolist() == [1.0 * 0.75 + 3.0 * 0.25, -2.0 * 0.75 + 5.0 * 0.25]


# ----------------------------------------------------------------------------------------------------------------
# Clipping + AdamW: the fused path (clip factor in grad_scale) and the foreach path vs the written-out update
# ----------------------------------------------------------------------------------------------------------------

def adamw_with_clipping_reference(params, grads_per_step, lr, betas, eps, wd, max_norm):
    """AdamW (decoupled weight decay, bias-corrected) on gradients clipped to a total norm of max_norm, written out
    in fp64: g <- g * min(1, max_norm / (||g|| + 1e-6)); m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
    theta <- theta (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)."""
    b1, b2 = betas
    theta = [p.double().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    norms = []
    for t, grads in enumerate(grads_per_step, start=1):
        grads = [gr.double() for gr in grads]
        norm = sum(float((gr ** 2).sum()) for gr in grads) ** 0.5
        norms.append(norm)
        c = min(1.0, max_norm / (norm + 1e-6))
        for i, gr in enumerate(grads):
            gr = gr * c
            m[i] = b1 * m[i] + (1 - b1) * gr
            v[i] = b2 * v[i] + (1 - b2) * gr * gr
            theta[i] = theta[i] * (1 - lr * wd) - lr * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
    return theta, norms


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_clip_and_adamw_equal_the_written_out_update(fused):
    """Three steps, the gradient norm far above max_norm in two (clipping active) and below it in one (so the clip
    factor changes between steps: Adam's invariance to a constant gradient scale would hide a missing clip).
    Tolerance: the change of each weight over the 3 steps (~lr = 1e-2 each) to 1e-5 relative, plus the rounding
    of the stored fp32 weights themselves, 3 steps x 2 eps32 x max|theta|."""
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=g).requires_grad_() for s in [(16, 8), (8,), (3, 3, 3)]]
    start = [p.detach().clone() for p in params]
    grads_per_step = [[scale * torch.randn(p.shape, generator=g) for p in params] for scale in (30.0, 0.01, 5.0)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt = torch.optim.AdamW(params, **kw, fused=True if fused else None, foreach=None if fused else True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    logged = []
    for grads in grads_per_step:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        logged.append(float(train.clip_and_step(opt, scaler, params, 1.0)))
        opt.zero_grad(set_to_none=True)
    assert not hasattr(opt, "grad_scale")  # the clip factor does not stay on the optimizer
    ref, norms = adamw_with_clipping_reference(start, grads_per_step, kw["lr"], kw["betas"], kw["eps"],
                                               kw["weight_decay"], 1.0)
    assert norms[0] > 10 and norms[1] < 1 and norms[2] > 1  # clipping on, off, on
    assert logged == pytest.approx(norms, rel=1e-5)  # the norm before clipping is what is logged
    atol = 3 * 2 * EPS32 * max(float(p0.abs().max()) for p0 in start)
    for p, p0, r in zip(params, start, ref):
        torch.testing.assert_close(p.detach().double() - p0.double(), r - p0.double(), rtol=1e-5, atol=atol)


def test_training_uses_the_fused_adamw_on_cpu_and_keeps_it_on_resume(tmp_path):
    train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "a", "--max-train-steps", "1"])
    ckpt = tmp_path / "a" / "checkpoints" / "0000001.pt"
    state = load(ckpt)
    assert state["opt"]["param_groups"][0]["fused"] is True
    # A checkpoint written with the foreach kernels (earlier versions) resumes on the fused ones.
    state["opt"]["param_groups"][0].update(fused=None, foreach=True)
    torch.save(state, ckpt)
    seen = []
    real = train.clip_and_step

    def spy(opt, *a):
        seen.append((opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"]))
        return real(opt, *a)
    mp_ = pytest.MonkeyPatch()
    mp_.setattr(train, "clip_and_step", spy)
    try:
        train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "a", "--max-train-steps", "2"])
    finally:
        mp_.undo()
    assert seen == [(True, None)]


# ----------------------------------------------------------------------------------------------------------------
# Stats read one step late: the order, NaN before a checkpoint, all ranks agree
# ----------------------------------------------------------------------------------------------------------------

def test_stats_of_a_step_are_read_after_the_next_step_is_queued(tmp_path, monkeypatch):
    events = []
    real_step, real_read = train.train_step, monitor.StepStats.read
    clock = [100.0]  # a fake clock: each step takes exactly 2 s, whatever else the machine is doing
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: clock[0])

    def step(*a, **k):
        out = real_step(*a, **k)
        clock[0] += 2.0
        events.append(f"q{len([e for e in events if e[0] == 'q']) + 1}")
        return out

    def read(self):
        events.append(f"r{self.step}")
        return real_read(self)
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(monitor.StepStats, "read", read)
    train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "o", "--max-train-steps", "6",
                "--checkpointing-steps", "3"])
    # Step k's stats are read after step k+1 is queued, except at a checkpoint (3, and the last step 6): read first.
    assert events == ["q1", "q2", "r1", "q3", "r2", "r3", "q4", "q5", "r4", "q6", "r5", "r6"]
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # Each line's images/s spans its own step, also when a read-late step is followed by one read at once (3, 6):
    # timed from when each step had run, not from when its stats were read (which would give ~0 s for step 3).
    ips = [r["images_per_sec_per_device"] for r in rows[1:]]
    assert ips == pytest.approx([8 / 2.0] * 5), ips  # batch 8 per 2 s


@pytest.mark.parametrize("bad_step, kept", [(5, ["0000002.pt", "0000004.pt"]), (4, ["0000002.pt"])],
                         ids=["before-a-checkpoint-step", "at-a-checkpoint-step"])
def test_a_nan_loss_stops_before_any_checkpoint_of_the_bad_state(tmp_path, monkeypatch, capsys, bad_step, kept):
    """The loss itself goes NaN at step k, so its gradients and then the weights are NaN from step k on. Step 5's
    stats are read after step 6 is queued, and step 6 is a checkpoint step: the run must stop without writing it."""
    real = train.compute_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == bad_step:  # one micro-batch per step
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(train, "compute_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "nan", "--max-train-steps", "10",
                    "--checkpointing-steps", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"at step {bad_step};" in err and "non-finite" in err
    assert sorted(os.listdir(tmp_path / "nan" / "checkpoints")) == kept
    for name in kept:
        assert all(torch.isfinite(v).all() for v in load(tmp_path / "nan" / "checkpoints" / name)["model"].values())
    assert calls["n"] <= bad_step + 1  # at most the one step already queued ran past it
    steps = [json.loads(line)["step"] for line in open(tmp_path / "nan" / "metrics.jsonl")]
    assert steps == list(range(1, bad_step))  # every good step logged, the bad one not


def _two_ranks(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        stats = {"loss": torch.tensor(float(rank + 1)), "grad_norm": torch.tensor(10.0 * (rank + 1))}
        p = monitor.StepStats(stats, stop=rank == 1, step=7, epoch=0, world_size=2, device=torch.device("cpu"))
        values, stop = p.read()
        torch.save({"values": values, "stop": stop}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_ranks_agree_to_stop_when_one_rank_is_signalled(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["stop"] is True  # only rank 1 was asked
        assert got["values"] == {"loss": pytest.approx(1.5), "grad_norm": pytest.approx(15.0)}  # rank means


# ----------------------------------------------------------------------------------------------------------------
# --benchmark windows, --profile, --compile-mode
# ----------------------------------------------------------------------------------------------------------------

def test_benchmark_times_n_steps_after_warm_up_in_windows(monkeypatch, capsys):
    calls = {"n": 0}
    real = train.train_step

    def count(*a, **k):
        calls["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", count)
    res = train.main(["--benchmark", "25", *BENCH, "--peak-tflops", "1"])
    out = capsys.readouterr().out
    assert calls["n"] == monitor.BENCHMARK_WARMUP + 25
    # 25 timed steps in windows of 10: [10, 15] (the last window takes the remainder)
    assert res["timed_steps"] == 25 and res["windows"] == 2 and len(res["window_images_per_sec"]) == 2
    rates = res["window_images_per_sec"]
    assert res["images_per_sec_per_device"] == pytest.approx((rates[0] + rates[1]) / 2)  # median of two
    assert res["images_per_sec_min"] == min(rates) and res["images_per_sec_max"] == max(rates)
    assert res["mfu"] == pytest.approx(3 * res["forward_gflops_per_image"] * 1e9 * res["images_per_sec_per_device"]
                                       / 1e12)
    assert "median of 2 windows" in out and "benchmark windows (images/s/device)" in out
    assert train.parse_args(["--benchmark"]).benchmark == monitor.BENCHMARK_DEFAULT >= 50


def test_profile_writes_the_per_part_table_and_json_on_cpu(tmp_path, capsys):
    prefix = str(tmp_path / "prof")
    train.main(["--profile", prefix, *BENCH])
    table = open(prefix + ".md").read()
    assert table in capsys.readouterr().out  # printed too
    r = json.load(open(prefix + ".json"))
    assert r["steps"] == profiling.PROFILE_STEPS and r["device"] == "cpu"
    assert [row["part"] for row in r["parts"]] == list(profiling.PARTS)
    for row in r["parts"]:
        assert f"| {row['part']} |" in table
        assert row["busy_ms_per_step"] > 0 and row["host_ms_per_step"] >= row["busy_ms_per_step"] * 0.99
    parts = {row["part"]: row for row in r["parts"]}
    assert any("lerp" in name for name, _ in parts["EMA"]["top"])  # the one-pass EMA ran in the EMA part
    assert any("adamw" in name for name, _ in parts["optimizer step"]["top"])
    # The parts and the time outside them add up to the step.
    assert sum(row["host_ms_per_step"] for row in r["parts"]) <= r["step_ms"]
    busy = sum(row["busy_ms_per_step"] for row in r["parts"]) + r["outside_parts_busy_ms_per_step"]
    assert busy + r["idle_ms_per_step"] == pytest.approx(r["step_ms"], rel=1e-6)
    assert "| idle |" in table


def test_profile_breakdown_of_a_cuda_trace_attributes_kernels_by_their_launch():
    """A hand-made CUDA trace of 2 steps (times in us): each step has a forward part (0-30) whose kernel is launched
    at +1 but runs at 32-42, after the part ended on the host (asynchronous execution), and a backward part (40-80)
    whose kernel is launched from another thread (autograd's) at +50 and runs at 60-80; a copy launched outside
    any part (5 us). Steps at 0-100 and 100-200."""
    def x(cat, name, ts, dur, tid=1, corr=None):
        e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}
        if corr is not None:
            e["args"] = {"correlation": corr}
        return e
    events = []
    for s, t0 in enumerate((0, 100)):
        c = 10 * s
        events += [x("user_annotation", profiling.STEP, t0, 100),
                   x("user_annotation", profiling.FORWARD, t0 + 0, 30),
                   x("user_annotation", profiling.BACKWARD, t0 + 40, 40),
                   x("cuda_runtime", "cudaLaunchKernel", t0 + 1, 2, corr=c + 1),
                   x("kernel", "gemm", t0 + 32, 10, tid=7, corr=c + 1),
                   x("cuda_runtime", "cudaLaunchKernel", t0 + 50, 2, tid=2, corr=c + 2),
                   x("kernel", "gemm_bwd", t0 + 60, 20, tid=7, corr=c + 2),
                   x("cuda_runtime", "cudaLaunchKernel", t0 + 90, 2, corr=c + 3),
                   x("gpu_memcpy", "Memcpy HtoD", t0 + 92, 5, tid=7, corr=c + 3)]
    r = profiling.breakdown(events, "cuda")
    parts = {row["part"]: row for row in r["parts"]}
    assert r["steps"] == 2 and r["step_ms"] == pytest.approx(0.1)
    assert parts[profiling.FORWARD]["busy_ms_per_step"] == pytest.approx(0.010)
    assert parts[profiling.BACKWARD]["busy_ms_per_step"] == pytest.approx(0.020)
    assert parts[profiling.FORWARD]["host_ms_per_step"] == pytest.approx(0.030)
    assert r["outside_parts_busy_ms_per_step"] == pytest.approx(0.005)
    # idle: 200 us span - 2 x (10 + 20 + 5) us busy = 130 us over 2 steps
    assert r["idle_ms_per_step"] == pytest.approx(0.065)


def test_compile_mode_reaches_torch_compile_for_the_model_and_the_target_encoder(tmp_path, monkeypatch):
    seen = []

    def fake_compile(module, mode=None, **k):  # records what would be compiled; runs it eagerly
        seen.append((type(module).__name__, mode))
        return module
    monkeypatch.setattr(torch, "compile", fake_compile)
    train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "c", "--max-train-steps", "1", "--compile",
                "--compile-mode", "max-autotune-no-cudagraphs"])
    assert seen == [("SiT", "max-autotune-no-cudagraphs"), ("TargetEncoder", "max-autotune-no-cudagraphs")]
    seen.clear()
    # Another compile mode is a way to run, not another experiment: the same folder continues with it.
    out = train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "c", "--max-train-steps", "2", "--compile"])
    assert out["steps"] == 2
    assert seen == [("SiT", None), ("TargetEncoder", None)]  # 'default' is torch's own default
