"""evaluate.py's alignment analysis (REPA §3): CKNNA against an independent loop implementation and its invariances,
the linear probe on separable / random labels, the PNG plot, and the command on a toy checkpoint."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import toy_experiment
import train
from plumbing import UsageError


def _cknna_loops(A, B, k):
    """CKNNA written independently with Python loops and lists: sort every row for its neighbours, sets for the
    mutual mask, the unbiased HSIC as explicit sums (Song et al. 2012, eq. 5)."""
    n = len(A)
    K = [[sum(x * y for x, y in zip(A[i], A[j])) for j in range(n)] for i in range(n)]
    L = [[sum(x * y for x, y in zip(B[i], B[j])) for j in range(n)] for i in range(n)]

    def knn(M, i):
        return set(sorted((j for j in range(n) if j != i), key=lambda j: -M[i][j])[:k])

    def hsic(P, Q):
        P = [[P[i][j] if i != j else 0.0 for j in range(n)] for i in range(n)]
        Q = [[Q[i][j] if i != j else 0.0 for j in range(n)] for i in range(n)]
        tr = sum(P[i][j] * Q[j][i] for i in range(n) for j in range(n))
        sp, sq = sum(map(sum, P)), sum(map(sum, Q))
        one_pq_one = sum(P[i][j] * Q[j][r] for i in range(n) for j in range(n) for r in range(n))
        return (tr + sp * sq / ((n - 1) * (n - 2)) - 2 * one_pq_one / (n - 2)) / (n * (n - 3))

    def align(M, N):
        mask = [[1.0 if (j in knn(M, i) and j in knn(N, i)) else 0.0 for j in range(n)] for i in range(n)]
        return hsic([[mask[i][j] * M[i][j] for j in range(n)] for i in range(n)],
                    [[mask[i][j] * N[i][j] for j in range(n)] for i in range(n)])

    return align(K, L) / ((align(K, K) * align(L, L)) ** 0.5 + 1e-6)


def test_cknna_equals_a_loop_implementation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(11, 4, generator=g, dtype=torch.float64)
    b = a[:, :3] + 0.7 * torch.randn(11, 3, generator=g, dtype=torch.float64)  # related, not identical
    for k in (2, 4):
        expected = _cknna_loops(a.tolist(), b.tolist(), k)
        assert 0.05 < abs(expected) < 0.999  # a case where the answer is neither trivial value
        assert evaluate.cknna(a, b, topk=k) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_cknna_self_one_invariances_and_independent_near_zero():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 16, generator=g)
    b = a @ torch.randn(16, 24, generator=g) + 0.5 * torch.randn(300, 24, generator=g)
    assert evaluate.cknna(a, a, topk=10) == pytest.approx(1.0, abs=1e-5)
    base = evaluate.cknna(a, b, topk=10)
    assert 0.2 < base < 0.95
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))  # orthogonal rotation
    assert evaluate.cknna(a @ q, b, topk=10) == pytest.approx(base, abs=1e-5)
    assert evaluate.cknna(a, b @ torch.linalg.qr(torch.randn(24, 24, generator=g))[0], topk=10) == \
        pytest.approx(base, abs=1e-5)
    assert evaluate.cknna(7.5 * a, b, topk=10) == pytest.approx(base, abs=1e-5)  # isotropic scaling
    assert evaluate.cknna(a, 0.2 * b, topk=10) == pytest.approx(base, abs=1e-5)
    independent = [evaluate.cknna(a, torch.randn(300, 24, generator=g), topk=10) for _ in range(3)]
    assert max(abs(v) for v in independent) < 0.05, independent


def test_cknna_bad_input_names_the_argument():
    a = torch.randn(20, 3)
    for k in (19, 20, 25, 0):
        with pytest.raises(ValueError, match="topk"):
            evaluate.cknna(a, a, topk=k)
    with pytest.raises(ValueError, match="same n"):
        evaluate.cknna(a, a[:10], topk=3)


def test_linear_probe_separable_is_perfect_random_labels_at_chance():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(900, 10, generator=g)
    w = torch.randn(10, 4, generator=g)
    y = (x @ w).argmax(1)  # labels of a linear rule (for the several-sets check below)
    centres = 3 * torch.randn(4, 10, generator=g)  # linearly separable with a wide margin
    yc = torch.arange(900) % 4
    xc = centres[yc] + 0.3 * torch.randn(900, 10, generator=g)
    assert evaluate.linear_probe(xc[:600], yc[:600], xc[600:], yc[600:]) == 1.0
    y_random = torch.randint(0, 4, (900,), generator=g)
    acc = evaluate.linear_probe(x[:600], y_random[:600], x[600:], y_random[600:])
    assert abs(acc - 0.25) < 0.08
    # several feature sets at once (one per block) = each on its own
    both = evaluate.linear_probe(torch.stack([x[:600], x[:600, :5].repeat(1, 2)]), y[:600],
                                 torch.stack([x[600:], x[600:, :5].repeat(1, 2)]), y[600:])
    assert both[0] == pytest.approx(evaluate.linear_probe(x[:600], y[:600], x[600:], y[600:]))
    assert both[1] < both[0] - 0.1  # half the features carry less of the label


def test_plot_lines_writes_a_png(tmp_path):
    path = tmp_path / "p.png"
    toy_experiment.plot_lines(str(path), [{"label": "a", "x": [0, 100, 200], "y": [0.1, 0.5, 0.9], "lo": [0, 0.4, 0.8],
                                     "hi": [0.2, 0.6, 1.0]}, {"label": "b", "x": [0, 100, 200], "y": [0.2, 0.2, 0.3]}],
                        title="t", xlabel="step", ylabel="acc", ylim=(0, 1), size=(400, 300))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (300, 400, 3)
    assert (np.abs(img.astype(int) - toy_experiment.COLOURS[0]).sum(-1) == 0).sum() > 50  # the first line is drawn


def _toy_checkpoint(tmp_path, *flags):
    out = train.main(["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "16",
                      "--batch-size", "8", "--enc-type", "tiny-vit", "--projector-dim", "32", "--num-workers", "0",
                      "--device", "cpu", "--max-train-steps", "1", "--sample-every", "0", "--output-dir",
                      str(tmp_path), *flags])
    return os.path.join(out["exp_dir"], "checkpoints", "0000001.pt")


def test_alignment_command_on_toy_checkpoints_and_bad_input(tmp_path, capsys, single_thread):
    reg = _toy_checkpoint(tmp_path, "--reg", "--exp-name", "reg")
    sit = _toy_checkpoint(tmp_path, "--proj-coeff", "0", "--exp-name", "sit")
    plot = tmp_path / "a.png"
    res = evaluate.alignment_main(["--ckpt", reg, sit, "--num-samples", "60", "--topk", "5", "--enc-type",
                                   "tiny-vit", "--plot", str(plot)])
    assert set(res) == {"reg", "sit"} and all(len(r["probe"]) == len(r["cknna"]) == 6 for r in res.values())
    assert all(0 <= v <= 1 for r in res.values() for v in r["probe"]) and plot.is_file()
    out = capsys.readouterr().out
    assert "| linear probe |" in out and "| CKNNA |" in out and "| shape area, probe R^2 |" in out
    with pytest.raises(evaluate.UsageError, match="--topk"):
        evaluate.alignment_main(["--ckpt", reg, "--num-samples", "60", "--topk", "60"])
    released = tmp_path / "released.pt"  # the released format: the EMA state dict itself, no training args
    torch.save(torch.load(reg, weights_only=True)["ema"], released)
    with pytest.raises(evaluate.UsageError, match="--ckpt .*toy set"):
        evaluate.alignment_main(["--ckpt", str(released)])
    with pytest.raises(evaluate.UsageError, match="--ckpt"):
        evaluate.alignment_main(["--ckpt", str(tmp_path / "missing.pt")])
    with pytest.raises(UsageError, match="usage"):  # one positional argument: the FID command's usage
        evaluate.main(["fid"])
    assert evaluate.main(["alignment", "--ckpt", sit, "--num-samples", "30", "--topk", "3", "--enc-type", "tiny-vit",
                          "--plot", str(plot)]) == 0  # exit status 0 for the shell


def test_alignment_probes_the_shape_area_of_the_images_fed_on_their_own_toy_style(tmp_path, monkeypatch,
                                                                                     single_thread):
    """The area probe reads the images the model was given, drawn in the run's --toy-style: with t = 0 a 'block'
    holding each channel's pixel sum holds the area linearly (flat background, 3 colours: R^2 ~ 1), a block of
    noise does not."""
    sit = _toy_checkpoint(tmp_path, "--proj-coeff", "0", "--exp-name", "sit", "--toy-style", "sizes")
    model, args = evaluate.load_toy_model(sit)
    assert args["toy_style"] == "sizes"
    monkeypatch.setattr(evaluate, "block_features", lambda model, x, t, y, cls=None: [
        torch.cat([x.sum((2, 3)), torch.zeros(len(x), 5)], 1), torch.randn(len(x), 8, generator=torch.Generator())])
    r = evaluate.alignment_analysis(model, args, t=0.0, num_samples=90, topk=5, enc_type="tiny-vit")
    assert r["area_r2"][0] > 0.95 and r["area_r2"][1] < 0.3


def test_toy_experiment_runs_every_method_and_seed_writes_table_and_plot(tmp_path, monkeypatch, capsys,
                                                                           single_thread):
    out = tmp_path / "exp"
    flags = ["--seeds", "0", "1", "--output-dir", str(out), "--jobs", "2", "--eval-every", "2", "--model", "SiT-T/8",
             "--enc-type", "tiny-vit", "--projector-dim", "32", "--toy-samples", "16", "--batch-size", "8",
             "--max-train-steps", "4", "--num-sample-images", "4", "--sample-steps", "2"]
    text = toy_experiment.experiment_main(flags)
    assert sorted(os.listdir(out)) == sorted(["curves.json", "fd.png", "joint_accuracy.png", "samples.png", "table.md"] +
                                             [f"{m}-seed{s}" for m in ("sit", "repa", "reg") for s in (0, 1)])
    curves = json.load(open(out / "curves.json"))
    assert all([s for s, _ in c[k]] == [2, 4] for c in curves.values() for k in ("toy_fd", "toy_joint"))
    assert len(curves) == 6
    args = {m: json.load(open(out / f"{m}-seed1" / "args.json")) for m in ("sit", "repa", "reg")}
    assert [args[m]["method"] for m in ("sit", "repa", "reg")] == ["sit", "repa", "reg"]
    assert {(a["seed"], a["batch_size"], a["max_train_steps"]) for a in args.values()} == {(1, 8, 4)}  # same budget
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:4]] == ["| SiT", "| REPA", "| REG"] and rows[0] == "| method | 2 | 4 |"
    assert [a["target_norm"] for a in args.values()] == ["none", "spatial", "spatial"]  # the default design:
    assert [a["proj_coeff"] for a in args.values()] == [0.0, 2.0, 2.0]  # normalized targets, lambda 2
    fig = np.asarray(Image.open(out / "samples.png"))  # 3 methods x 2 steps of grid rows, 3x enlarged
    assert fig.shape[0] > 3 * 3 * (16 + 4) and fig.shape[1] > 2 * 3 * 2 * 18
    # finished runs are reused: a second call trains nothing
    monkeypatch.setattr(toy_experiment, "start_training", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert toy_experiment.experiment_main(flags) == text
    other = [("8" if f == "4" else f) for f in flags]  # --max-train-steps 8: another configuration
    with pytest.raises(UsageError, match=r"finished run of another configuration \(--max-train-steps: '4'"):
        toy_experiment.experiment_main(other)
    with pytest.raises(SystemExit):
        toy_experiment.experiment_main(["--methods", "dit"])
    assert "--methods" in capsys.readouterr().err


def test_parallel_trainings_keep_finished_runs_and_stop_on_a_failure(tmp_path, monkeypatch):
    """--jobs 2: a run that fails stops the experiment with its command named, after the one running beside it
    has finished and recorded its done.json; the one not started yet stays to do."""
    import subprocess
    import sys
    threads = []

    def fake(flags, env=None, name=None):  # exits with the status given as the first flag, after a while
        threads.append(env["OMP_NUM_THREADS"])
        return subprocess.Popen([sys.executable, "-c", f"import time, sys; time.sleep({flags[1]}); sys.exit({flags[0]})"])
    monkeypatch.setattr(toy_experiment, "start_training", fake)
    runs = [(n, [rc, wait], str(tmp_path / f"{n}.json")) for n, rc, wait in (("bad", "3", "0"), ("slow", "0", "1"),
                                                                             ("later", "0", "0"))]
    with pytest.raises(UsageError, match=r"`python train.py 3 0` exited with status 3"):
        toy_experiment.run_trainings(runs, jobs=2)
    assert sorted(os.listdir(tmp_path)) == ["slow.json"] and len(threads) == 2
    assert threads[0] == str(max(1, (os.cpu_count() or 2) // 2))


def test_toy_experiment_reuses_committed_runs_without_training(tmp_path, monkeypatch):
    # what a fresh clone holds: experiments/toy/<method>-seed<seed>/ with metrics.jsonl, args.json, samples and
    # done.json (the flags of the run), no checkpoints
    out = tmp_path / "toy"

    def flags(method, seed, name):  # what the default command passes train.py (the default design: lambda 2)
        return [f"--smoke={method}", "--seed", str(seed), "--output-dir", str(out), "--exp-name", name,
                "--toy-style", "sizes", "--sample-every", "50", "--num-sample-images", "256", "--sample-steps", "10",
                *([] if method == "sit" else ["--proj-coeff", "2"])]
    for method, acc, fd in (("sit", [0.2, 0.6], [3.0, 1.0]), ("reg", [0.5, 0.9], [0.8, 0.4])):
        run = out / f"{method}-seed0"
        (run / "samples").mkdir(parents=True)
        (run / "done.json").write_text(json.dumps({"flags": flags(method, 0, f"{method}-seed0")}))
        (run / "args.json").write_text(json.dumps({"resolution": 16}))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "toy_fd": f, "toy_joint": a}) + "\n"
                                                   for s, a, f in zip((100, 200), acc, fd)))
        Image.new("RGB", (146, 146)).save(run / "samples" / "0000200.png")
    monkeypatch.setattr(toy_experiment, "start_training", lambda *a, **k: pytest.fail("retrained a committed run"))
    text = toy_experiment.experiment_main(["--methods", "sit", "reg", "--seeds", "0", "--output-dir", str(out)])
    assert "| REG | 100 | 100 | 2.00x | yes |" in text  # FD: SiT's final 1.0, reached by REG at step 100
    assert "| REG | 200 | 200 | 1.00x | no |" in text  # accuracy: SiT's final 0.6, reached at step 200
    assert (out / "samples.png").is_file()
    for method in ("sit", "reg"):  # the runs' own grids are read, never written
        assert Image.open(out / f"{method}-seed0" / "samples" / "0000200.png").size == (146, 146)
    toy_experiment.experiment_main(["--methods", "reg", "--seeds", "0", "--output-dir", str(out), "--tag", "one"])
    assert (out / "table-one.md").is_file() and (out / "samples-one.png").is_file()
    assert "| SiT |" in (out / "table.md").read_text() and "| SiT |" not in (out / "table-one.md").read_text()
    with pytest.raises(UsageError, match=r"another configuration \(--seed: '0' \(finished run\) vs '1'"):
        (out / "sit-seed1").mkdir()
        old = flags("sit", 0, "sit-seed1")  # a run of seed 0 under seed 1's name
        old[old.index("--output-dir") + 1] = "elsewhere"  # where it was run from is no setting
        (out / "sit-seed1" / "done.json").write_text(json.dumps({"flags": old}))
        toy_experiment.experiment_main(["--methods", "sit", "--seeds", "1", "--output-dir", str(out)])
    with pytest.raises(UsageError, match=r"another configuration \(--toy-style: 'sizes' \(finished run\) vs 'centred'"):
        toy_experiment.experiment_main(["--methods", "sit", "--seeds", "0", "--output-dir", str(out), "--toy-style", "centred"])
    assert toy_experiment.method_label("reg-dense") == "REG (dense)"  # the encoder comparison's rows
