"""Behaviours that no other test guards: gradient accumulation's loss scaling (K micro-batches of B = one batch of
K*B), a non-default --cfg-prob reaching the model's label dropout, the per-image sampling noise being the function of
(seed, image index) that the evaluation folder's config.json documents, and the linear probe standardizing held-out
features with the training split's statistics only; and each script's top catching bad input (UsageError) only,
so that an internal error keeps its traceback.

Each test fails when the one line it guards changes; CPU, offline, tiny models (SiT-T/8)."""
import json
import os

import pytest
import torch

import evaluate
import losses
import plumbing
import sample
import train
from plumbing import UsageError
from model import SiT_models

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# The smallest training configuration train.py builds: plain SiT (no target encoder to load), fp32.
TINY = ["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--enc-type", "none", "--proj-coeff", "0",
        "--num-workers", "0", "--device", "cpu", "--mixed-precision", "no"]


class Quiet:
    def info(self, msg):
        pass


def build(*flags, num_classes=10):
    """args and (model, EMA, AdamW, scaler) the way train.run builds them; the data-dependent fields (which the
    data set-up would fill in) are set here: 4-channel 16x16 latents, SiT-T/8 -> a 2x2 token grid."""
    args = train.parse_args([*TINY, *flags])
    train.check_args(args, 1)
    args.method = train.method_name(args)
    args.latent_scale, args.input_size, args.in_channels, args.num_classes = 0.18215, 16, 4, num_classes
    encoders, model, ema, opt, scaler = train.build_training(args, CPU, 2, False, Quiet())
    return args, encoders, model, ema, opt, scaler


# ------------------------------------------------------------------------------------------------------------------
# 1. Gradient accumulation: K micro-batches of B == one step of K*B
# ------------------------------------------------------------------------------------------------------------------

def test_grad_accumulation_of_k_micro_batches_equals_one_batch_of_k_times_b(monkeypatch):
    """K = 4 micro-batches of B = 2 and one batch of 8, on the same data and the same per-sample t, eps and label
    dropout: the accumulated gradient, the logged loss and grad_norm, and the updated weights agree.

    The randomness is tied to the sample, not to the order of the draws: the labels are sample ids, and
    compute_loss is run sample by sample, each after seeding the RNG with its id (the batch loss is the mean of
    the per-sample losses, so this is the same objective). The VAE moments have std 0, so prepare_batch's
    posterior draw does not change x. Clipping is off (--max-grad-norm 1e6) so that it cannot hide a wrong
    scale. AdamW's step lr * m / (sqrt(v) + eps) is nearly scale-invariant, so the gradients themselves are
    compared, read where train_step clips them (after unscale, before the optimizer step); and with eps = 1, far
    above every |gradient| (and lr = 1), the first step is about g: the weight updates follow the gradients' scale
    too."""
    K, B = 4, 2
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (K * B, 3, 16, 16), dtype=torch.uint8, generator=g)
    moments = torch.cat([torch.randn(K * B, 4, 16, 16, generator=g), torch.zeros(K * B, 4, 16, 16)], 1)
    ids = torch.arange(K * B)  # labels = sample ids (num_classes 10 > 8)

    def per_sample_loss(model, x, y, zs_target, cls_target=None, **kw):
        outs = []
        for j in range(x.shape[0]):
            torch.manual_seed(1000 + int(y[j]))  # t, eps and the label dropout of sample y[j], in any batch
            outs.append(losses.compute_loss(model, x[j:j + 1], y[j:j + 1], [z[j:j + 1] for z in zs_target],
                                            None if cls_target is None else cls_target[j:j + 1], **kw))
        return {k: torch.stack([o[k] for o in outs]).mean() for k in outs[0]}
    monkeypatch.setattr(train, "compute_loss", per_sample_loss)

    real_clip, seen = train.clip_and_step, []

    def spy_clip(opt, scaler, params, *a, **k):  # the accumulated gradient, before clipping and AdamW
        params = list(params)
        seen.append([p.grad.detach().clone() for p in params])
        return real_clip(opt, scaler, params, *a, **k)
    monkeypatch.setattr(train, "clip_and_step", spy_clip)

    def one_step(grad_accum):
        args, encs, model, ema, opt, scaler = build("--batch-size", str(K * B), "--grad-accum", str(grad_accum),
                                                    "--max-grad-norm", "1e6", "--learning-rate", "1",
                                                    "--adam-epsilon", "1")
        with torch.no_grad():  # off the zero-initialized output layers, so that every weight gets a gradient
            wg = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=wg))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        ema_params = [q for p, q in zip(model.parameters(), ema.parameters()) if p.requires_grad]
        m = args.micro_batch
        assert m * grad_accum == K * B
        batches = iter([(images[s:s + m], moments[s:s + m], ids[s:s + m]) for s in range(0, K * B, m)])
        start.append([p.detach().clone() for p in params])
        stats = train.train_step(model, model, ema_params, params, opt, scaler, batches, encs, args,
                                 train.autocast_ctx(CPU, args.mixed_precision), CPU)
        assert next(batches, None) is None  # it took exactly grad_accum micro-batches
        return stats, seen[-1], [p.detach().clone() for p in params]

    start = []
    big_stats, big_grads, big_weights = one_step(1)
    acc_stats, acc_grads, acc_weights = one_step(K)
    assert len(seen) == 2
    for a, b in zip(*start):
        assert torch.equal(a, b)  # the same initial weights
    start = start[0]
    assert big_stats["grad_norm"] > 0.1 and sum(bool(gr.abs().max() > 0) for gr in big_grads) > 0.9 * len(big_grads)
    assert max(b.abs().max().item() for b in big_grads) < 0.1  # << eps = 1: the step is linear in the gradient
    for a, b in zip(acc_grads, big_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    for key in ("loss", "pred", "grad_norm"):
        torch.testing.assert_close(acc_stats[key], big_stats[key], rtol=1e-5, atol=1e-7)
    for w0, a, b in zip(start, acc_weights, big_weights):
        ulp = torch.finfo(torch.float32).eps * w0.abs().max().item()  # the rounding of w0 + update
        torch.testing.assert_close(a - w0, b - w0, rtol=1e-4, atol=1e-4 * (b - w0).abs().max().item() + 2 * ulp)


# ------------------------------------------------------------------------------------------------------------------
# 2. --cfg-prob reaches the label dropout of the model train.py builds
# ------------------------------------------------------------------------------------------------------------------

def test_a_non_default_cfg_prob_sets_the_label_dropout_of_the_built_model():
    """--cfg-prob 0.37 (not the 0.1 default): the SiT built from the flags drops 37% of its labels in training
    (to the null label, row num_classes of the table) and none in eval mode."""
    args, _, model, ema, _, _ = build("--cfg-prob", "0.37", num_classes=10)
    assert args.cfg_prob == 0.37
    emb = model.y_embedder
    assert emb.dropout_prob == pytest.approx(0.37)
    n = 20000
    labels = torch.arange(n) % 10
    null = emb.embedding_table.weight[10].detach()
    torch.manual_seed(0)
    with torch.no_grad():
        model.train()
        dropped = (emb(labels) == null).all(1)
        model.eval()
        assert not (emb(labels) == null).all(1).any()
    # 4 standard deviations of a binomial fraction: sqrt(0.37 * 0.63 / 20000) = 0.0034
    assert abs(dropped.float().mean().item() - 0.37) < 4 * (0.37 * 0.63 / n) ** 0.5, dropped.float().mean()


# ------------------------------------------------------------------------------------------------------------------
# 3. Per-image sampling noise: a function of (seed, image index), as the evaluation folder documents
# ------------------------------------------------------------------------------------------------------------------

def _tiny_reg_checkpoint(path):
    """A pixel-space SiT-T/8 REG checkpoint in our format (16 px, 3 channels, class token of 8, 5 classes)."""
    torch.manual_seed(0)
    net = SiT_models["SiT-T/8"](input_size=16, in_channels=3, num_classes=5, z_dims=[], encoder_depth=2,
                                projector_dim=32, cls_dim=8)
    args = dict(model="SiT-T/8", input_size=16, in_channels=3, num_classes=5, encoder_depth=2, z_dims=[],
                projector_dim=32, cls_dim=8, path_type="linear", resolution=16, latent_scale=1.0, pixel_space=True,
                vae=None, data_dir="toy")
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "opt": {}, "args": args, "steps": 1}, path)
    return net


def _documented(noise_doc, seed, index):
    """The generator of image `index`, seeded by the formula the folder's config.json states after the comma,
    e.g. 'per-image generator, seed * 2^32 + (index + seed * 2654435769) % 2^32'."""
    formula = noise_doc.split(",", 1)[1].strip().replace("^", "**")
    return torch.Generator().manual_seed(eval(formula, {"__builtins__": {}}, {"seed": seed, "index": index}))


def test_per_image_noise_is_the_documented_function_of_seed_and_index(tmp_path, monkeypatch):
    """An evaluation run (seed 5, 3 images in batches of 2) draws, for image i, z_1, the class token and the label
    from one generator seeded by the formula its config.json documents; the same noise comes out for i alone, in
    another batch or rank split; another seed follows the same formula, and every image has noise of its own."""
    net = _tiny_reg_checkpoint(tmp_path / "0000001.pt")
    real_gens, real_noise, drawn = sample.image_generators, sample.initial_noise, []

    def spy_gens(seed, indices, device):
        drawn.append({"seed": seed, "indices": [int(i) for i in indices]})
        return real_gens(seed, indices, device)

    def spy_noise(gens, model, labels=None):
        z, cls, y = real_noise(gens, model, labels)
        drawn[-1].update(z=z.clone(), cls=cls.clone(), y=y.clone())
        return z, cls, y
    monkeypatch.setattr(sample, "image_generators", spy_gens)
    monkeypatch.setattr(sample, "initial_noise", spy_noise)
    npz = sample.main(["--ckpt", str(tmp_path / "0000001.pt"), "--sample-dir", str(tmp_path / "s"), "--seed", "5",
                       "--num-fid-samples", "3", "--per-proc-batch-size", "2", "--mode", "ode", "--num-steps", "1",
                       "--precision", "fp32", "--device", "cpu"])
    monkeypatch.undo()
    doc = json.load(open(os.path.join(npz[:-len(".npz")], "config.json")))["noise"]
    assert [d["indices"] for d in drawn] == [[0, 1], [2]] and {d["seed"] for d in drawn} == {5}

    def expected(seed, i):  # in initial_noise's documented order: z_1 [C, H, W], cls_1 [cls_dim], the label
        g = _documented(doc, seed, i)
        return (torch.randn(3, 16, 16, generator=g), torch.randn(8, generator=g),
                torch.randint(0, 5, (1,), generator=g))

    for d in drawn:
        for row, i in enumerate(d["indices"]):
            z, cls, y = expected(5, i)
            assert torch.equal(d["z"][row], z) and torch.equal(d["cls"][row], cls) and d["y"][row] == y[0], \
                f"image {i} of the run: not the noise of the documented generator ({doc})"

    def noise(seed, indices):
        z, cls, y = sample.initial_noise(sample.image_generators(seed, indices, "cpu"), net)
        return {i: (z[r], cls[r], y[r]) for r, i in enumerate(indices)}

    ref = noise(5, list(range(6)))
    splits = [noise(5, [3]), noise(5, [4, 1, 0]), noise(5, [5, 2])]  # alone, reordered, another batch
    splits += [noise(5, list(range(6))[r::2]) for r in range(2)]  # the two ranks of a 2-process run
    for part in splits:
        for i, (z, cls, y) in part.items():
            assert torch.equal(z, ref[i][0]) and torch.equal(cls, ref[i][1]) and y == ref[i][2], i
    for i, (z, cls, _) in ref.items():
        ez, ecls, _ = expected(5, i)
        assert torch.equal(z, ez) and torch.equal(cls, ecls), i
    # Another seed follows the same formula and draws other noise, on the CPU too (whose generator keeps only the
    # low 32 bits of a seed: seed * 2^32 + index gave every seed the same noise there)
    other = noise(6, list(range(6)))
    for i in range(6):
        assert torch.equal(other[i][0], expected(6, i)[0]) and torch.equal(other[i][1], expected(6, i)[1]), i
        assert not torch.equal(other[i][0], ref[i][0]), f"seeds 5 and 6 draw the same noise for image {i}"
    assert len({tuple(ref[i][0].flatten()[:4].tolist()) for i in range(6)}) == 6  # every image its own noise


# ------------------------------------------------------------------------------------------------------------------
# 4. The linear probe standardizes with the training split's statistics
# ------------------------------------------------------------------------------------------------------------------

def test_linear_probe_standardizes_held_out_features_with_the_training_statistics():
    """A held-out point's prediction depends on the training split only, not on which other points are held out
    with it. Feature 0 is the class (-1 / +1, noise 0.3), three more are noise. Held out: 200 points of class 1
    alone. Standardized by their own mean and std they would straddle the boundary (about half wrong); with the
    training split's statistics they sit on the class-1 side, exactly as they do inside a balanced held-out set."""
    g = torch.Generator().manual_seed(0)

    def points(labels):
        x = torch.randn(len(labels), 4, generator=g)
        x[:, 0] = 2.0 * labels - 1 + 0.3 * torch.randn(len(labels), generator=g)
        return x

    ty = torch.arange(400) % 2
    tx = points(ty)
    ones_y = torch.ones(200, dtype=torch.long)
    ones_x = points(ones_y)
    zeros_y = torch.zeros(200, dtype=torch.long)
    zeros_x = points(zeros_y)
    alone = evaluate.linear_probe(tx, ty, ones_x, ones_y, num_classes=2)
    mixed = evaluate.linear_probe(tx, ty, torch.cat([ones_x, zeros_x]), torch.cat([ones_y, zeros_y]), num_classes=2)
    zeros = evaluate.linear_probe(tx, ty, zeros_x, zeros_y, num_classes=2)
    assert alone > 0.95 and zeros > 0.95  # 3.3 noise sigmas from the boundary: essentially all right
    assert mixed == pytest.approx((alone + zeros) / 2, abs=1e-6)  # per point, the same answer in either split


# --- a script's top catches bad input, and only bad input -----------------------------------------------------------

def internal_bug(*a, **k):
    raise ValueError("internal bug, not bad input")


def bad_input(*a, **k):
    raise UsageError("bad input: pass --x")


def test_a_scripts_top_prints_bad_input_in_one_line_and_lets_an_internal_error_through(tmp_path, monkeypatch, capsys):
    (tmp_path / "x.pt").write_bytes(b"")  # exists: the file check passes, the mocked loader decides
    ckpt = ["--ckpt", str(tmp_path / "x.pt"), "--device", "cpu"]
    monkeypatch.setattr(sample, "load_for_sampling", bad_input)
    assert sample.cli(ckpt) == 2
    assert capsys.readouterr().err.strip() == "sample.py: error: bad input: pass --x"
    monkeypatch.setattr(sample, "load_for_sampling", internal_bug)
    with pytest.raises(ValueError, match="internal bug"):  # a ValueError of ours is not bad input
        sample.cli(ckpt)
    monkeypatch.setattr(evaluate, "fid_main", internal_bug)
    with pytest.raises(ValueError, match="internal bug"):
        evaluate.cli(["a.npz", "b.npz"])
    monkeypatch.setattr(evaluate, "fid_main", bad_input)
    assert evaluate.cli(["a.npz", "b.npz"]) == 2 and "evaluate.py: error: bad input" in capsys.readouterr().err
    monkeypatch.setattr(train, "build_training", internal_bug)
    with pytest.raises(ValueError, match="internal bug"):  # not SystemExit(2): the traceback is kept
        train.main([*TINY, "--output-dir", str(tmp_path / "runs"), "--toy-samples", "16", "--batch-size", "4"])
    assert not (tmp_path / "runs").exists()  # and the folder this run created is gone again
    assert plumbing.run_script("toy.py", lambda argv: 0) == 0
