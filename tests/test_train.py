"""train.py on the CPU, offline: each method learns, torchrun (gloo) runs, stop + resume == uninterrupted (bit for
bit), checkpoints are written atomically, NaN and bad input stop with clear errors, --benchmark reports.

Everything runs SiT-T on 16x16 toy images with the random `tiny-vit` target encoder and a small projector."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import monitor
import run_folder
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SiT-T/8 on 16 px toy images: 2x2 tokens (+1 with REG); 40 toy items, batch 8 -> 5 steps per epoch.
TINY = ["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "40", "--batch-size", "8",
        "--enc-type", "tiny-vit", "--projector-dim", "64", "--num-workers", "0", "--device", "cpu",
        "--log-every", "1", "--sample-every", "0", "--num-sample-images", "4", "--sample-steps", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run_train(tmp_path, *flags):
    return train.main([*TINY, "--output-dir", str(tmp_path), *flags])


def metrics(exp_dir, key="loss"):
    rows = [json.loads(line) for line in open(os.path.join(exp_dir, "metrics.jsonl"))]
    return [r[key] for r in rows if key in r]


def load(path):
    # weights_only: model.load_checkpoint reads our checkpoints this way, so they must stay plain data.
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("flags, method", [(["--proj-coeff", "0"], "sit"), ([], "repa"), (["--reg"], "reg")])
def test_each_method_lowers_the_loss_on_a_fixed_batch(tmp_path, flags, method):
    # 8 toy items = one batch: every step sees the same images (fresh t and noise each step).
    out = run_train(tmp_path, "--toy-samples", "8", "--max-train-steps", "16", "--learning-rate", "2e-3",
                    "--exp-name", method, *flags)
    exp_dir = out["exp_dir"]
    loss, repa, cls = metrics(exp_dir), metrics(exp_dir, "repa"), metrics(exp_dir, "cls")
    assert len(loss) == 16
    # At init the velocity output is 0, so step 1 has L_pred = E||eps - x||^2 = 1 + E[x^2]; training brings the
    # total clearly below it.
    assert sum(loss[-4:]) / 4 < 0.85 * loss[0], loss
    ckpt = load(os.path.join(exp_dir, "checkpoints", "0000016.pt"))
    a = ckpt["args"]
    assert a["method"] == method
    if method == "sit":
        assert a["z_dims"] == [] and a["cls_dim"] is None and all(r == 0 for r in repa)
        assert not any(k.startswith("projectors") for k in ckpt["model"])
    else:
        assert a["z_dims"] == [192] and repa[-1] < repa[0] - 0.05, repa  # the projector learns to align
    if method == "reg":
        assert a["cls_dim"] == 192 and cls[-1] > 0 and "cls_projectors2.weight" in ckpt["model"]
    else:
        assert all(c == 0 for c in cls)


def test_stop_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # REG with label dropout, grad accumulation, bf16 autocast, an epoch boundary (5 steps / epoch) between the
    # stop (3) and the end (6), and sample grids (which must not touch the training RNG) in both runs.
    common = ["--reg", "--grad-accum", "2", "--mixed-precision", "bf16", "--sample-every", "2",
              "--checkpointing-steps", "100"]
    run_train(tmp_path, *common, "--exp-name", "straight", "--max-train-steps", "6")
    run_train(tmp_path, *common, "--exp-name", "stopped", "--max-train-steps", "3")
    run_train(tmp_path, *common, "--exp-name", "stopped", "--max-train-steps", "6", "--resume", "auto")
    a = load(tmp_path / "straight" / "checkpoints" / "0000006.pt")
    b = load(tmp_path / "stopped" / "checkpoints" / "0000006.pt")
    assert a["steps"] == b["steps"] == 6 and a["data"] == b["data"] == [1, 8]  # epoch 1, 1 step (2 x 4 items) in
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), ("opt", i, k)
    # ... and the weights did move from the step-3 checkpoint.
    mid = load(tmp_path / "stopped" / "checkpoints" / "0000003.pt")
    assert not torch.equal(mid["model"]["final_layer.linear.weight"], b["model"]["final_layer.linear.weight"])
    assert os.path.exists(tmp_path / "stopped" / "samples" / "0000006.png")
    assert len(metrics(tmp_path / "stopped", "toy_joint")) == 4  # steps 2, 3 (end of run 1), 4, 6
    # The logged losses of the two halves are the uninterrupted run's, step for step.
    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "straight")


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    # A run checkpointed at 2, logged steps 3-4, then was killed mid-line; resuming from 2 must not leave
    # steps 3-4 (or the torn line) before the new steps 3-4.
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    monitor.trim_metrics(str(path), 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_interrupted_checkpoint_write_never_replaces_the_last_good_one(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    good = str(ckpt_dir / "0000010.pt")
    checkpoints.save_checkpoint({"steps": 10, "w": torch.arange(5)}, good)
    before = open(good, "rb").read()

    def torn_save(obj, f, *a, **k):  # dies half-way through writing, like a kill or a full disk
        f.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", torn_save)
    for path in (good, str(ckpt_dir / "0000020.pt")):  # overwrite the same name, and write a newer step
        with pytest.raises(train.UsageError) as e:
            checkpoints.save_checkpoint({"steps": 20}, path)
        # The message names the checkpoint not written and the intact one to continue from.
        assert f"could not write checkpoint {path}" in str(e.value) and f"previous checkpoint {good} is intact" in \
            str(e.value) and "rerun the same command" in str(e.value)
    monkeypatch.undo()
    assert open(good, "rb").read() == before
    assert sorted(os.listdir(ckpt_dir)) == ["0000010.pt"]  # no partial file left, no .tmp
    assert checkpoints.latest_checkpoint(str(ckpt_dir)) == good
    (ckpt_dir / "0000030.pt.tmp").write_bytes(b"torn")  # a stale temp file from a SIGKILLed run is ignored
    assert checkpoints.latest_checkpoint(str(ckpt_dir)) == good
    assert load(good)["steps"] == 10


def test_nan_loss_stops_naming_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = train.compute_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # step 3 (one micro-batch per step)
            out["cls"] = torch.tensor(float("nan"))
        return out
    monkeypatch.setattr(train, "compute_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--reg", "--exp-name", "nan", "--max-train-steps", "10", "--checkpointing-steps", "2")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "non-finite cls" in err and "step 3" in err
    # What to do: continue from the last good checkpoint at half the learning rate; a bf16 run is not told "bf16".
    assert "0000002.pt, is the last good one" in err and "--learning-rate 5e-05" in err and "--mixed-precision" not in err
    assert sorted(os.listdir(tmp_path / "nan" / "checkpoints")) == ["0000002.pt"]


def test_sigterm_writes_a_checkpoint_and_exits_cleanly_and_a_concurrent_run_is_refused(tmp_path, capsys):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--output-dir", str(tmp_path), "--exp-name", "pre",
           "--max-train-steps", "100000", "--checkpointing-steps", "100000", "--log-every", "1"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in p.stdout:  # wait until it trains
        if "step       2/" in line:
            break
    # A second run into the same folder while this one trains is refused (the lock names the live process).
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "pre", "--max-train-steps", "5"])
    assert e.value.code == 2 and f"in use by another run (pid {p.pid}" in capsys.readouterr().err
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 0, out
    assert "stopped by SIGTERM" in out
    files = os.listdir(tmp_path / "pre" / "checkpoints")
    assert len(files) == 1 and load(tmp_path / "pre" / "checkpoints" / files[0])["steps"] >= 2


def test_torchrun_two_cpu_ranks_run_reg_and_write_one_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *TINY, "--output-dir", str(tmp_path), "--exp-name", "ddp", "--reg",
           "--max-train-steps", "3", "--checkpointing-steps", "3"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 2" in r.stdout and "4/device x 2 ranks" in r.stdout
    assert r.stdout.count("step       3/3") == 1  # only rank 0 logs
    files = os.listdir(tmp_path / "ddp" / "checkpoints")
    assert files == ["0000003.pt"]
    ckpt = load(tmp_path / "ddp" / "checkpoints" / "0000003.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # per-rank seeds
    assert "cls_projectors2.weight" in ckpt["model"] and ckpt["args"]["micro_batch"] == 4


def test_benchmark_prints_images_per_second_mfu_and_memory(capsys):
    res = train.main(["--benchmark", "3", "--model", "SiT-T/4", "--resolution", "32", "--batch-size", "4", "--reg",
                      "--enc-type", "tiny-vit", "--projector-dim", "64", "--device", "cpu", "--peak-tflops", "1"])
    out = capsys.readouterr().out
    assert "images/s/device" in out and "MFU" in out and "peak memory" in out
    assert res["images_per_sec_per_device"] > 0 and res["peak_memory_gib"] > 0
    # SiT-T/4 on 32x32x4 synthetic latents (VAE shapes): MFU = 3 * forward FLOPs * images/s / 1 TFLOP/s.
    assert res["mfu"] == pytest.approx(3 * res["forward_gflops_per_image"] * 1e9 * res["images_per_sec_per_device"]
                                       / 1e12)
    assert res["micro_batch"] == 4 and res["timed_steps"] == 3  # N timed steps after the warm-up


def _write_released_layout(root, resolution):
    """A 2-item dataset in the released REPA layout (PNG images + VAE moments + dataset.json)."""
    import numpy as np
    from PIL import Image
    for sub in ("images/00000", "vae-sd/00000"):
        os.makedirs(root / sub, exist_ok=True)
    labels = []
    for i in range(2):
        Image.fromarray(np.zeros((resolution, resolution, 3), np.uint8)).save(root / f"images/00000/img{i:08d}.png")
        np.save(root / f"vae-sd/00000/img-mean-std-{i:08d}.npy",
                np.zeros((8, resolution // 8, resolution // 8), np.float32))
        labels.append([f"00000/img-mean-std-{i:08d}.npy", i])
    (root / "vae-sd/dataset.json").write_text(json.dumps({"labels": labels}))


def test_bad_input_gives_clear_errors_before_training(tmp_path, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            train.main(list(argv))
        assert e.value.code == 2
        return capsys.readouterr().err

    err = error("--data-dir", str(tmp_path / "nowhere"), "--model", "SiT-T/2")
    assert "does not exist" in err and "python data.py --source" in err and "python train.py --smoke" in err
    assert "Traceback" not in err
    _write_released_layout(tmp_path / "in32", 32)
    err = error("--data-dir", str(tmp_path / "in32"), "--resolution", "256", "--model", "SiT-T/2")
    assert "32px" in err and "--resolution is 256" in err
    err = error(*TINY, "--batch-size", "10", "--grad-accum", "4")
    assert "divisible" in err and "--grad-accum" in err
    # A REG checkpoint resumed as plain SiT or as another model.
    run_train(tmp_path, "--reg", "--exp-name", "r", "--max-train-steps", "1")
    ckpt = str(tmp_path / "r" / "checkpoints" / "0000001.pt")
    err = error(*TINY, "--output-dir", str(tmp_path), "--proj-coeff", "0", "--resume", ckpt)
    assert "other settings" in err and "reg" in err and "method" in err
    err = error(*TINY[:1], "SiT-T/4", *TINY[2:], "--reg", "--output-dir", str(tmp_path), "--resume", ckpt)
    assert "model: checkpoint 'SiT-T/8' vs now 'SiT-T/4'" in err
    assert len(os.listdir(tmp_path / "r" / "checkpoints")) == 1


def test_out_of_memory_stops_with_what_to_do_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real = train.compute_loss
    calls = {"n": 0}

    def oom_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*a, **k)
    monkeypatch.setattr(train, "compute_loss", oom_at_step_3)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--reg", "--exp-name", "oom", "--max-train-steps", "10", "--checkpointing-steps", "2")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "out of memory in step 3" in err and "--micro-batch-size 4" in err and "--grad-checkpointing" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path / "oom" / "checkpoints")) == ["0000002.pt"]
    assert load(tmp_path / "oom" / "checkpoints" / "0000002.pt")["steps"] == 2


# ------------------------------------------------------------------------------------------------------------------
# The experiment folder: one configuration, one writer; settings changed on resume; bad input
# ------------------------------------------------------------------------------------------------------------------



def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_the_same_command_twice_continues_the_run(tmp_path, monkeypatch):
    # A Ctrl-C during step 3 checkpoints at 4 and exits cleanly (the stop flag travels with step 3's stats, which are
    # read once step 4 is queued: all ranks learn it at the same step); the same command again (no --resume, as a
    # cluster requeue) continues to 6: every step logged once, args.json untouched. A third time there is nothing to do.
    cmd = ["--exp-name", "again", "--max-train-steps", "6", "--checkpointing-steps", "100"]
    real, calls = train.compute_loss, {"n": 0}

    def ctrl_c_in_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    monkeypatch.setattr(train, "compute_loss", ctrl_c_in_step_3)
    assert run_train(tmp_path, *cmd)["steps"] == 4
    monkeypatch.undo()
    exp = tmp_path / "again"
    args_json = (exp / "args.json").read_bytes()
    assert run_train(tmp_path, *cmd)["steps"] == 6
    assert sorted(os.listdir(exp / "checkpoints")) == ["0000004.pt", "0000006.pt"]
    assert [json.loads(line)["step"] for line in open(exp / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    log = (exp / "log.txt").read_text()
    assert [log.count(f"step {s:7d}/6 |") for s in range(1, 7)] == [1] * 6
    assert "continuing from step 4" in log
    assert (exp / "args.json").read_bytes() == args_json
    assert not (exp / "lock").exists()
    before = snapshot(exp)
    assert run_train(tmp_path, *cmd)["steps"] == 6
    assert snapshot(exp) == before


def test_another_configuration_is_refused_and_leaves_the_folder_byte_identical(tmp_path, capsys, train_fails):
    run_train(tmp_path, "--reg", "--exp-name", "mine", "--max-train-steps", "2", "--checkpointing-steps", "1")
    exp = tmp_path / "mine"
    before = snapshot(exp)
    assert {"args.json", "log.txt", "metrics.jsonl", "checkpoints/0000001.pt", "checkpoints/0000002.pt"} <= set(before)
    base = [*TINY, "--output-dir", str(tmp_path), "--exp-name", "mine", "--max-train-steps", "4"]
    err = train_fails(*base)  # REPA into a REG folder
    assert "holds the checkpoints (up to step 2) of another configuration" in err
    assert "reg: True (folder) vs False (now)" in err and "--exp-name" in err and "--resume auto" in err
    err = train_fails(*base, "--reg", "--ema-decay", "0.5")  # a recipe setting differs
    assert "ema_decay: 0.9999 (folder) vs 0.5 (now)" in err
    # --resume PATH must not write over later checkpoints, nor into a folder with checkpoints of its own.
    err = train_fails(*base, "--reg", "--resume", str(exp / "checkpoints" / "0000001.pt"))
    assert "older than 1 checkpoint(s)" in err and "--resume auto" in err
    run_train(tmp_path, "--reg", "--exp-name", "other", "--max-train-steps", "1")
    err = train_fails(*base, "--reg", "--resume", str(tmp_path / "other" / "checkpoints" / "0000001.pt"))
    assert "already holds the checkpoints of its own run" in err
    assert snapshot(exp) == before


def test_a_second_writer_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys, train_fails):
    exp = tmp_path / "locked"
    exp.mkdir()
    lock = exp / "lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live process on this host holds the folder
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "then"}))
        err = train_fails(*TINY, "--output-dir", str(tmp_path), "--exp-name", "locked", "--max-train-steps", "1")
        assert f"in use by another run (pid {sleeper.pid} on {socket.gethostname()}" in err and str(lock) in err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert os.listdir(exp) == ["lock"]
    # The same process is gone now: its lock is stale and taken over at once.
    assert run_train(tmp_path, "--exp-name", "locked", "--max-train-steps", "1")["steps"] == 1
    assert f"pid {sleeper.pid} on this host has exited" in (exp / "log.txt").read_text() and not lock.exists()
    # A lock from another host counts while its heartbeat is fresh, and is taken over once it is LOCK_STALE_S old.
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    train_fails(*TINY, "--output-dir", str(tmp_path), "--exp-name", "locked", "--max-train-steps", "2")
    old = time.time() - run_folder.LOCK_STALE_S - 5
    os.utime(lock, (old, old))
    assert run_train(tmp_path, "--exp-name", "locked", "--max-train-steps", "2")["steps"] == 2
    assert "took over the lock of a run that is gone (no heartbeat for" in (exp / "log.txt").read_text()


def test_the_lock_works_on_a_file_system_without_hard_links(tmp_path, monkeypatch, capsys):
    def no_link(*a):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_link)
    seen = {}
    real = train.compute_loss

    def look(*a, **k):  # while the run trains, its lock holds its pid
        seen.update(json.loads((tmp_path / "nolink" / "lock").read_text()))
        return real(*a, **k)
    monkeypatch.setattr(train, "compute_loss", look)
    assert run_train(tmp_path, "--exp-name", "nolink", "--max-train-steps", "1")["steps"] == 1
    assert seen["pid"] == os.getpid() and not (tmp_path / "nolink" / "lock").exists()


def test_a_learning_rate_changed_on_resume_reaches_the_optimizer(tmp_path):
    # Two branches from one step-2 checkpoint, one at twice the learning rate: with the same gradients (same weights,
    # same RNG) AdamW's step -lr * m_hat / (sqrt(v_hat) + eps) (no weight decay) is exactly twice as large.
    run_train(tmp_path, "--exp-name", "base", "--max-train-steps", "2", "--learning-rate", "1e-3", "--log-every", "10")
    start = str(tmp_path / "base" / "checkpoints" / "0000002.pt")
    # (With --log-every 10 the first step still shows at once, in log.txt only; metrics.jsonl keeps its rhythm.)
    assert "step       1/2 | loss" in (tmp_path / "base" / "log.txt").read_text()
    assert [json.loads(line)["step"] for line in open(tmp_path / "base" / "metrics.jsonl")] == [2]
    for name, lr in (("a", "1e-3"), ("b", "2e-3")):
        run_train(tmp_path, "--exp-name", name, "--resume", start, "--max-train-steps", "3", "--learning-rate", lr,
                  "--mixed-precision", "no")
    w0, a, b = (load(p)["model"]["final_layer.linear.weight"] for p in
                (start, tmp_path / "a" / "checkpoints" / "0000003.pt", tmp_path / "b" / "checkpoints" / "0000003.pt"))
    assert (a - w0).abs().max() > 0
    torch.testing.assert_close(b - w0, 2 * (a - w0), rtol=1e-4, atol=1e-9)
    assert {g["lr"] for g in load(tmp_path / "b" / "checkpoints" / "0000003.pt")["opt"]["param_groups"]} == {2e-3}
    assert "changed since the checkpoint: learning_rate 0.001 -> 0.002" in (tmp_path / "b" / "log.txt").read_text()


def test_each_bad_input_exits_2_with_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch, train_fails):
    out = ["--output-dir", str(tmp_path / "results")]
    assert "--batch-size must be a positive integer, got 0" in train_fails(*TINY, *out, "--batch-size", "0")
    assert "--max-train-steps must be a positive integer, got -5" in train_fails(*TINY, *out,
                                                                           "--max-train-steps", "-5")
    (tmp_path / "a_file").write_text("")
    err = train_fails(*TINY, "--output-dir", str(tmp_path / "a_file" / "results"))
    assert "cannot write the experiment folder" in err and "writable --output-dir" in err
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    err = train_fails(*TINY, *out, "--resume", str(tmp_path / "garbage.pt"))
    assert "is not a readable training checkpoint" in err and "mmap" not in err
    err = train_fails(*TINY, *out, "--resume", str(tmp_path))
    assert "is a folder; pass a checkpoint file" in err
    # The default DINOv2 target offline and not in the (empty) hub cache: one line, naming --enc-path.
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    err = train_fails(*TINY, *out, "--enc-type", "dinov2-vit-b")
    assert "cannot load target encoder 'dinov2-vit-b'" in err and "--enc-path" in err
    assert not os.path.exists(tmp_path / "results")  # no stub experiment folder from a failed start
