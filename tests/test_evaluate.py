"""evaluate.py / inception.py: the ADM metrics against independent formulas and brute force, the TF-graph quirks of
the Inception port, the weight file round trip, the .npz reader and the command line's errors. Offline, CPU."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import evaluate
import inception
from plumbing import UsageError
from evaluate import frechet_distance, inception_score, precision_recall, read_images


def _random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d + 3))
    return a @ a.T / a.shape[1]


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------

def test_frechet_distance_closed_form_diagonal_and_commuting():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    a[0] = b[1] = 0.0  # singular covariances (as with fewer samples than features) stay exact
    # Commuting covariances share eigenvectors: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    # A zero eigenvalue computed as ~1e-16 contributes its square root, ~1e-8: the floor for singular matrices.
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-7)


def test_frechet_distance_general_matches_eigenvalues_of_product():
    rng = np.random.default_rng(1)
    d = 8
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # Independent route: the eigenvalues of the (non-symmetric) product S1 S2 are real and >= 0.
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)
    stats = evaluate.gaussian_statistics(rng.standard_normal((1000, 256)).astype(np.float32))
    assert abs(frechet_distance(*stats, *stats)) < 1e-9  # identical full-rank statistics: 0 up to rounding


def test_frechet_distance_scipy_route_agrees():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 50), _random_spd(rng, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    assert frechet_distance(mu1, s1, mu2, s2, sqrtm="scipy") == pytest.approx(frechet_distance(mu1, s1, mu2, s2),
                                                                             rel=1e-6)


def test_frechet_distance_rejects_bad_statistics():
    with pytest.raises(UsageError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UsageError, match="NaN or inf"):
        frechet_distance(np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), np.eye(3))
    with pytest.raises(UsageError, match="fewer than 2 samples|N >= 2"):
        evaluate.gaussian_statistics(np.zeros((1, 5)))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------------

def test_inception_score_uniform_and_confident():
    assert inception_score(np.full((40, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(5)[np.arange(20) % 5]  # confident and balanced: IS = number of classes
    assert inception_score(one_hot) == pytest.approx(5.0, rel=1e-12)
    assert inception_score(one_hot, split_size=10) == pytest.approx(5.0, rel=1e-12)
    # Per-split marginals: the first split of 10 sees classes 0..1 only (IS 2), the second all 5 (IS 5).
    skew = np.eye(5)[np.r_[np.arange(10) % 2, np.arange(10) % 5]]
    assert inception_score(skew, split_size=10) == pytest.approx((2 + 5) / 2, rel=1e-12)


def test_inception_score_equals_entropy_identity():
    # E_x KL(p(y|x) || p(y)) = H(p(y)) - E_x H(p(y|x)) on each split; 23 rows in splits of 7, 7, 7 and 2.
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(6, 0.5), size=23)

    def entropy(p):
        return -(p * np.log(p)).sum(-1)

    expected = np.mean([np.exp(entropy(part.mean(0)) - entropy(part).mean())
                        for part in (probs[0:7], probs[7:14], probs[14:21], probs[21:23])])
    assert inception_score(probs, split_size=7) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall
# ----------------------------------------------------------------------------------------------------------------

def _brute_force_pr(real, fake, k):
    def radius(x, i):  # k-th neighbour distance, the row including the point itself (distance 0)
        return sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(len(x)))[k]

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    prec = np.mean([any(np.sum((g - x) ** 2) <= r for x, r in zip(real, r_real)) for g in fake])
    rec = np.mean([any(np.sum((x - g) ** 2) <= r for g, r in zip(fake, r_fake)) for x in real])
    return prec, rec


def test_precision_recall_equals_brute_force_with_ties():
    rng = np.random.default_rng(4)
    # Small integers: every distance is exact in float32 (and float16), and many fall exactly on a radius.
    real = rng.integers(0, 4, (30, 3)).astype(np.float32)
    fake = rng.integers(1, 5, (25, 3)).astype(np.float32)
    expected = _brute_force_pr(real, fake, 3)
    radii = [sorted(np.sum((real - x) ** 2, 1))[3] for x in real]
    d = np.sum((fake[:, None] - real[None]) ** 2, -1)
    assert (d == np.array(radii)[None]).any()  # some fake samples lie exactly on a real radius
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for block in (1, 4, None):  # the blocking of the distance matrix does not change the result
        assert precision_recall(real, fake, k=3, block_size=block) == pytest.approx(expected, abs=0)
    assert precision_recall(real, fake, k=3, fp16=True) == pytest.approx(expected, abs=0)
    # Ties count as inside: strictly-less comparisons would give different figures on this data.
    strict = [sum(np.sum((g - x) ** 2) < r for x, r in zip(real, radii)) > 0 for g in fake]
    assert np.mean(strict) != expected[0]


def test_precision_recall_other_k_and_random_floats():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((40, 5)), rng.standard_normal((35, 5)) + 0.5
    assert precision_recall(real, fake, k=5, block_size=7) == pytest.approx(_brute_force_pr(real, fake, 5), abs=0)
    with pytest.raises(UsageError, match="N >= k \\+ 1 = 4"):
        precision_recall(real[:3], fake, k=3)


# ----------------------------------------------------------------------------------------------------------------
# The Inception network
# ----------------------------------------------------------------------------------------------------------------

def test_resize_tf1_hand_computed():
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]])[None, None]
    # Up 2 -> 4: source points 0, 0.5, 1, 1.5 -> rows (a, (a+b)/2, b, b); no half-pixel shift, edge clamped.
    row = torch.tensor([1.0, 2.0, 3.0, 3.0])
    expected = torch.stack([row, row + 2, row + 4, row + 4])
    assert torch.equal(inception.resize_tf1(x, 4)[0, 0], expected)
    # Down 4 -> 3: source points 0, 4/3, 8/3.
    line = torch.tensor([0.0, 10.0, 20.0, 30.0])
    out = inception.resize_tf1(line.expand(4, 4)[None, None], 3)[0, 0]
    assert torch.allclose(out[0], torch.tensor([0.0, 40 / 3, 80 / 3]), atol=1e-5)
    assert not torch.allclose(out, F.interpolate(line.expand(4, 4)[None, None], size=3, mode="bilinear",
                                                 align_corners=False)[0, 0])  # torch's resize is another op


def test_input_scaling_and_pool_quirks():
    assert inception.scale_input(torch.tensor([0.0, 128.0, 255.0])).tolist() == [-1.0, 0.0, 127 / 128]
    ones = torch.ones(1, 1, 5, 5)
    assert torch.equal(inception._pool_branch(ones, "avg"), ones)  # TF ignores the padding: no 4/9 corners
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    assert inception._pool_branch(x, "max")[0, 0, 0, 0] == 6.0 and inception._pool_branch(x, "avg")[0, 0, 0, 0] == 3.0


@pytest.fixture(scope="module")
def random_net():
    torch.manual_seed(0)
    net = inception.InceptionV3TF().eval()
    for m in net.modules():  # non-trivial BN statistics, so that a loader that drops buffers is caught
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    with torch.no_grad():
        pool, spatial = net(images)
    return net, images, pool, spatial


def test_network_shapes_and_sfid_layout(random_net):
    net, images, pool, spatial = random_net
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023)
    assert net.logits(pool).shape == (2, 1008)
    assert torch.allclose(net.logits(pool), net.fc(pool) - net.fc.bias, atol=1e-5)  # logits without the bias
    # spatial = mixed_6/conv (Mixed_6d's 1x1 branch) [..., :7] flattened in NHWC order.
    seen = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: seen.setdefault("conv", out))
    with torch.no_grad():
        net(images)
    conv = seen["conv"]
    assert conv.shape == (2, 192, 17, 17)
    assert torch.equal(spatial, conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert spatial[1, (5 * 17 + 9) * 7 + 3] == conv[1, 3, 5, 9]


def test_weight_file_round_trip(random_net, tmp_path):
    net, images, pool, spatial = random_net
    path = tmp_path / inception.WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    loaded, sha = inception.load_inception(str(path))
    assert sha == inception.file_sha256(str(path)) and len(sha) == 64
    with torch.no_grad():
        pool2, spatial2 = loaded(images)
    assert torch.equal(pool2, pool) and torch.equal(spatial2, spatial)
    # Files without BatchNorm's num_batches_tracked (older torch) load too.
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, path)
    inception.load_inception(str(path))


def test_torchvision_inception3_layout_is_accepted(tmp_path):
    # The published file is a state dict of torchvision's Inception3(num_classes=1008, aux_logits=False).
    tv = torchvision.models.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    net, _ = inception.load_inception(str(path))
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, tv.Mixed_7c.branch_pool.conv.weight)


def test_weight_file_errors(tmp_path):
    with pytest.raises(UsageError, match="pt_inception-2015-12-05-6726825d.pth.*--inception"):
        inception.load_inception(str(tmp_path / "absent.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(UsageError, match="cannot read"):
        inception.load_inception(str(bad))
    sd = inception.InceptionV3TF().state_dict()
    sd.pop("fc.bias")
    sd["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(sd, bad)
    with pytest.raises(UsageError, match=r"missing fc.bias \[1008\].*wrong shape fc.weight: "
                                                     r"\[1000, 2048\] \(expected \[1008, 2048\]\)"):
        inception.load_inception(str(bad))


# ----------------------------------------------------------------------------------------------------------------
# .npz input and the command line
# ----------------------------------------------------------------------------------------------------------------

def test_read_images_accepts_uint8_nhwc(tmp_path):
    imgs = np.random.default_rng(6).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", imgs, mu=np.zeros(2))  # stored: memory-mapped
    np.savez_compressed(tmp_path / "b.npz", imgs)       # compressed: read whole
    a, b = read_images(str(tmp_path / "a.npz")), read_images(str(tmp_path / "b.npz"))
    assert isinstance(a, np.memmap)
    assert np.array_equal(a, imgs) and np.array_equal(b, imgs)


@pytest.mark.parametrize("arr, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "float32 .*expected uint8"),
    (np.zeros((2, 3, 8, 8), np.uint8), "NCHW"),
    (np.zeros((2, 8, 8), np.uint8), r"\[2, 8, 8\]; expected uint8 RGB"),
    (np.zeros((2, 8, 8, 4), np.uint8), r"\[2, 8, 8, 4\]"),
])
def test_read_images_rejects_other_layouts(tmp_path, arr, message):
    np.savez(tmp_path / "x.npz", arr)
    with pytest.raises(UsageError, match=message):
        read_images(str(tmp_path / "x.npz"))


def test_read_images_rejects_non_npz(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"nope")
    with pytest.raises(UsageError, match="not an .npz"):
        read_images(str(tmp_path / "x.npz"))
    np.savez(tmp_path / "y.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UsageError, match="no arr_0"):
        read_images(str(tmp_path / "y.npz"))


def _batch(path, n, size=32, seed=0, **stats):
    np.savez(path, np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8), **stats)
    return str(path)


@pytest.mark.parametrize("sample, ref, message", [
    (dict(n=5, size=64), dict(n=5), "64x64 images but .* 32x32 reference"),
    (dict(n=3), dict(n=5), "holds 3 images; the statistics need at least 4"),
    (dict(n=5, mu=np.zeros(2048), sigma=np.eye(2048)), dict(n=5), "arguments look swapped"),
])
def test_cli_refuses_bad_batches(tmp_path, sample, ref, message):
    args = [_batch(tmp_path / "s.npz", **sample), _batch(tmp_path / "r.npz", **ref), "--device", "cpu"]
    with pytest.raises(UsageError, match=message):
        evaluate.main(args)


def test_cli_missing_weights(tmp_path):
    args = [_batch(tmp_path / "s.npz", 5), _batch(tmp_path / "r.npz", 5), "--device", "cpu",
            "--inception", str(tmp_path / "none.pth")]
    with pytest.raises(UsageError, match="not found"):
        evaluate.main(args)


def test_cli_end_to_end_cache_and_stored_statistics(random_net, tmp_path, capsys, monkeypatch):
    net = random_net[0]
    weights = tmp_path / "w.pth"
    torch.save(net.state_dict(), weights)
    rng = np.random.default_rng(7)
    stored = dict(mu=rng.standard_normal(2048), sigma=np.diag(rng.uniform(0.5, 1, 2048)),
                  mu_s=rng.standard_normal(2023), sigma_s=np.diag(rng.uniform(0.5, 1, 2023)))
    sample = _batch(tmp_path / "s.npz", 4, seed=1)
    ref = _batch(tmp_path / "r.npz", 4, seed=2, **stored)  # an ADM reference batch: images + statistics
    calls = []

    def recording_fd(*a, **kw):  # the distance itself is tested above; here: which statistics go in, which comes out
        calls.append(a)
        return float(len(calls))

    monkeypatch.setattr(evaluate, "frechet_distance", recording_fd)
    args = [sample, ref, "--device", "cpu", "--inception", str(weights), "--batch-size", "3"]
    metrics = evaluate.main(args)
    out = capsys.readouterr().out
    line = json.loads(out.strip().splitlines()[-1])
    assert line["fid"] == metrics["fid"] == 1.0 and line["sfid"] == metrics["sfid"] == 2.0 and line["num_samples"] == 4
    assert "sample: 3/4 images" in out and "sample: 4/4 images" in out and "images/s" in out and "ETA" in out
    s_cache, r_cache = np.load(evaluate.cache_path(sample)), np.load(evaluate.cache_path(ref))
    assert s_cache["pool"].shape == (4, 2048) and r_cache["mu_s"].shape == (2023,)
    # FID / sFID: the sample's statistics of its activations against the reference's stored ones.
    for got, want in zip(calls[0] + calls[1], [s_cache["mu"], s_cache["sigma"], stored["mu"], stored["sigma"],
                                               s_cache["mu_s"], s_cache["sigma_s"], stored["mu_s"], stored["sigma_s"]]):
        assert np.array_equal(got, want)
    assert np.allclose(s_cache["mu"], s_cache["pool"].mean(0))
    assert (metrics["precision"], metrics["recall"]) == precision_recall(r_cache["pool"], s_cache["pool"])
    # Second run: both batches come from the cache (no progress line), with the same statistics and figures.
    metrics2 = evaluate.main(args)
    out = capsys.readouterr().out
    assert "images/s" not in out and f"from {evaluate.cache_path(sample)}" in out
    assert all(np.array_equal(x, y) for x, y in zip(calls[2] + calls[3], calls[0] + calls[1]))
    assert {k: metrics2[k] for k in ("inception_score", "precision", "recall")} == \
        {k: metrics[k] for k in ("inception_score", "precision", "recall")}
    # A rewritten sample file invalidates its cache.
    os.utime(sample, ns=(0, 0))
    assert evaluate.load_cached(sample, line["inception_weights_sha256"]) is None


def test_main_dispatches_subcommands(monkeypatch):
    calls = []
    monkeypatch.setattr(evaluate, "alignment_main", calls.append, raising=False)
    evaluate.main(["alignment", "--x", "1"])
    assert calls == [["--x", "1"]]
    monkeypatch.delattr(evaluate, "toy_experiment_main", raising=False)
    with pytest.raises(UsageError, match="toy-experiment` is not available"):
        evaluate.main(["toy-experiment"])
