"""The evaluator between the network and the metric formulas (which tests/test_evaluate.py checks on given inputs):
the statistics FID is computed from (ADM's unbiased covariance), logits -> class probabilities for the Inception
Score, and the TF Inception graph's own constants (BatchNorm epsilon 1e-3, the max pool of the last block, pool_3 as
the 8x8 mean), each against a computation written out here. A stand-in network keeps the command-line test fast."""
import os

import numpy as np
import pytest
import torch

import evaluate
import inception


def test_fid_statistics_are_the_mean_and_the_unbiased_covariance():
    acts = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32) * [1.0, 3.0, 0.5] + [2.0, 0.0, -1.0]
    mu, sigma = evaluate.gaussian_statistics(acts)
    x = acts.astype(np.float64)
    m = x.sum(0) / 7
    expected = sum(np.outer(r - m, r - m) for r in x) / (7 - 1)  # ADM: np.cov, i.e. divided by N - 1
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, m, rtol=1e-12)
    np.testing.assert_allclose(sigma, expected, rtol=1e-12)


class StandIn(torch.nn.Module):
    """The network's interface with cheap layers: pool_3 and the sFID features are fixed linear maps of the pixels;
    logits() is InceptionV3TF's own (pool_3 @ W, without the bias, which is made large and uneven here so that adding it would show)."""

    def __init__(self, pixels):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wp = torch.randn(pixels, 2048, generator=g) / pixels
        self.ws = torch.randn(pixels, 2023, generator=g) / pixels
        self.fc = torch.nn.Linear(2048, 1008)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(1008, 2048, generator=g) * 0.05)
            self.fc.bias.copy_(torch.randn(1008, generator=g) * 3)

    def forward(self, images):
        x = images.float().flatten(1) / 255
        return x @ self.wp, x @ self.ws

    logits = inception.InceptionV3TF.logits


def test_the_command_feeds_softmax_of_the_logits_to_is_and_unbiased_statistics_to_fid(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(1)
    sample, ref = (rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (6, 5))
    np.savez(tmp_path / "s.npz", sample)
    np.savez(tmp_path / "r.npz", ref)
    net = StandIn(48)
    monkeypatch.setattr(evaluate, "load_inception", lambda path, device: (net, "0" * 64))
    seen = {"fd": [], "fd_kw": []}
    monkeypatch.setattr(evaluate, "inception_score", lambda probs, split: seen.update(probs=probs, split=split) or 1.0)
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *a, **k: seen["fd"].append(a) or seen["fd_kw"].append(k)
                        or 0.0)
    monkeypatch.setattr(evaluate, "precision_recall", lambda real, fake, **k: seen.update(pr=k) or (0.5, 0.5))
    evaluate.main([str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), "--device", "cpu", "--batch-size", "4",
                   "--no-cache", "--sqrtm", "scipy", "--pr-fp16", "--k", "2"])
    assert seen["fd_kw"] == [{"sqrtm": "scipy"}] * 2 and (seen["pr"]["k"], seen["pr"]["fp16"]) == (2, True)
    out = capsys.readouterr().out
    assert "warning: 6 samples <= 2048 features: the covariance is singular" in out
    assert "SHA-256 0000000000000000... does not start with 6726825d" in out  # not the published weight file
    a = evaluate.parse_args(["s.npz", "r.npz"])  # ADM's settings by default
    assert (a.k, a.split_size, a.sqrtm, a.pr_fp16) == (3, 5000, "eigh", False)

    def features(images):  # NHWC uint8 -> the stand-in's NCHW input, by hand
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().flatten(1) / 255
        return (x @ net.wp).double().numpy(), (x @ net.ws).double().numpy()

    pool, spatial = features(sample)
    logits = pool @ net.fc.weight.detach().double().numpy().T
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(seen["probs"], e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-9)
    assert seen["split"] == 5000  # ADM's split size

    def stats(f):
        m = f.mean(0)
        return m, (f - m).T @ (f - m) / (len(f) - 1)

    ref_pool, ref_spatial = features(ref)
    fid, sfid = seen["fd"]
    for got, want in zip(fid + sfid, [*stats(pool), *stats(ref_pool), *stats(spatial), *stats(ref_spatial)]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_basic_conv_is_conv_then_batch_norm_with_tf_epsilon_then_relu():
    torch.manual_seed(0)
    block = inception.BasicConv2d(3, 4, 1).eval()
    with torch.no_grad():
        block.bn.running_mean.uniform_(-0.5, 0.5)
        block.bn.running_var.uniform_(1e-4, 2e-3)  # small variances: epsilon 1e-3 vs torch's 1e-5 shows
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 5, 5)
    w = block.conv.weight[:, :, 0, 0]
    conv = torch.einsum("oc,nchw->nohw", w, x)
    bn = block.bn
    shape = (1, -1, 1, 1)
    expected = ((conv - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + 0.001)
                * bn.weight.view(shape) + bn.bias.view(shape)).clamp_min(0)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def _pool_3x3(x, kind):
    """3x3 stride-1 SAME pool written out: max over the valid neighbours, or their mean (TF ignores the padding)."""
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            win = x[:, :, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].flatten(2)
            out[:, :, i, j] = win.amax(2) if kind == "max" else win.mean(2)
    return out


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    net = inception.InceptionV3TF().eval()
    for m in net.modules():  # variance-preserving weights: activations of order 1 down to the last block
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


def test_the_last_block_max_pools_and_the_one_before_averages_over_valid_pixels(net):
    """The graph's quirk: mixed_10 (Mixed_7c) takes a max pool in its pool branch, mixed_9 (Mixed_7b) an average."""
    for block, kind in ((net.Mixed_7b, "avg"), (net.Mixed_7c, "max")):
        seen = {}
        hook = block.branch_pool.register_forward_hook(lambda m, inp, out: seen.setdefault("in", inp[0]))
        x = torch.randn(1, block.branch1x1.conv.in_channels, 8, 8)
        with torch.no_grad():
            block(x)
        hook.remove()
        torch.testing.assert_close(seen["in"], _pool_3x3(x, kind))


def test_pool_3_is_the_mean_of_the_last_blocks_8x8_map(net):
    seen = {}
    hook = net.Mixed_7c.register_forward_hook(lambda m, inp, out: seen.setdefault("out", out))
    with torch.no_grad():
        pool, _ = net(torch.randint(0, 256, (1, 3, 12, 12), dtype=torch.uint8))
    hook.remove()
    out = seen["out"]
    assert out.shape == (1, 2048, 8, 8) and out.std((2, 3)).mean() > 0.1 * out.mean()  # varies over the map
    torch.testing.assert_close(pool, out.sum((2, 3)) / 64)


def test_under_torchrun_each_rank_scores_a_contiguous_slice_and_rank_0_joins_them_in_order(monkeypatch):
    """docs/evaluation.md: `torchrun ... evaluate.py` splits the images over the processes; rank r takes images
    [N r / W, N (r + 1) / W) and rank 0 receives everything in image order (the collective is simulated here)."""
    net = StandIn(48)
    images = np.random.default_rng(2).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    sent = {}
    for rank in (1, 2):
        monkeypatch.setattr(evaluate.dist, "gather_object", lambda obj, parts, dst, r=rank: sent.setdefault(r, obj))
        assert evaluate.inception_activations(net, images, 2, "cpu", rank, 3) is None

    def receive(obj, parts, dst):
        parts[:] = [obj, sent[1], sent[2]]
    monkeypatch.setattr(evaluate.dist, "gather_object", receive)
    pool, spatial = evaluate.inception_activations(net, images, 2, "cpu", 0, 3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().flatten(1) / 255
    np.testing.assert_allclose(pool, (x @ net.wp).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spatial, (x @ net.ws).numpy(), rtol=1e-5, atol=1e-6)
    assert [len(sent[r][0]) for r in (1, 2)] == [6 - 3, 10 - 6]  # 10 images over 3 ranks: 3, 3, 4


def test_the_activation_cache_is_keyed_by_the_file_and_the_weights(tmp_path):
    path = str(tmp_path / "s.npz")
    np.savez(path, np.zeros((2, 4, 4, 3), np.uint8))
    acts = {k: np.full(3, i, np.float32) for i, k in enumerate(("pool", "mu", "sigma", "mu_s", "sigma_s"))}
    evaluate.save_cache(path, "a" * 64, acts)
    assert all(np.array_equal(v, acts[k]) for k, v in evaluate.load_cached(path, "a" * 64).items())
    assert evaluate.load_cached(path, "b" * 64) is None  # other Inception weights
    before = os.stat(path)
    np.savez(path, np.ones((3, 4, 4, 3), np.uint8))  # the batch rewritten, its time stamp put back: the size tells
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert evaluate.load_cached(path, "a" * 64) is None
    np.savez(path, np.zeros((2, 4, 4, 3), np.uint8))  # the same size, a new time stamp
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10 ** 9))
    assert evaluate.load_cached(path, "a" * 64) is None
