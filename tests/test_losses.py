import math

import pytest
import torch

from losses import compute_loss, interpolant, pred_loss, repa_loss, repa_targets, sample_time


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_interpolant_endpoints_and_velocity(path_type):
    x, eps = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)

    def z(t):
        a, s, _, _ = interpolant(torch.tensor(t, dtype=torch.float64), path_type)
        return a * x + s * eps

    torch.testing.assert_close(z(0.0), x)  # t = 0 is data
    torch.testing.assert_close(z(1.0), eps, atol=1e-12, rtol=0)  # t = 1 is noise
    for t in (0.1, 0.5, 0.83):
        h = 1e-6
        _, _, da, ds = interpolant(torch.tensor(t, dtype=torch.float64), path_type)
        finite_diff = (z(t + h) - z(t - h)) / (2 * h)
        torch.testing.assert_close(da * x + ds * eps, finite_diff, atol=1e-7, rtol=1e-6)


def test_interpolant_values_by_hand():
    t = torch.tensor([0.25])
    assert [float(c) for c in interpolant(t, "linear")] == [0.75, 0.25, -1.0, 1.0]
    a, s, da, ds = (float(c) for c in interpolant(t, "cosine"))
    assert a == pytest.approx(math.cos(math.pi / 8)) and s == pytest.approx(math.sin(math.pi / 8))
    assert da == pytest.approx(-math.pi / 2 * math.sin(math.pi / 8))
    assert ds == pytest.approx(math.pi / 2 * math.cos(math.pi / 8))
    with pytest.raises(ValueError, match="path_type"):
        interpolant(t, "edm")


def test_sample_time_distributions():
    g = torch.Generator().manual_seed(0)
    t = sample_time(20000, "uniform", generator=g)
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean() - 0.5) < 0.01
    # lognormal on the linear path: t = s / (1 + s) with log s ~ N(0, 1), so logit(t) ~ N(0, 1).
    t = sample_time(20000, "lognormal", "linear", generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    # cosine: t = 2/pi atan(s), so log tan(pi t / 2) ~ N(0, 1).
    t = sample_time(20000, "lognormal", "cosine", generator=g)
    n = torch.log(torch.tan(math.pi * t / 2))
    assert abs(n.mean()) < 0.03 and abs(n.std() - 1) < 0.03
    with pytest.raises(ValueError, match="weighting"):
        sample_time(3, "beta")


def test_repa_loss_matches_per_sample_loop_and_reaches_minus_one():
    g = torch.Generator().manual_seed(1)
    targets = [torch.randn(4, 7, 5, generator=g), torch.randn(4, 7, 3, generator=g)]
    preds = [torch.randn(4, 7, 5, generator=g), torch.randn(4, 7, 3, generator=g)]
    expected = torch.zeros(4)
    for b in range(4):  # the independent formula: an explicit loop over samples, encoders and tokens
        for z, zt in zip(targets, preds):
            s = 0.0
            for n in range(7):
                s += float(z[b, n] @ zt[b, n] / (z[b, n].norm() * zt[b, n].norm()))
            expected[b] += -s / 7 / len(targets)
    torch.testing.assert_close(repa_loss(targets, preds), expected)
    # Identical directions (any positive scale) give the minimum, -1.
    assert repa_loss(targets, [3 * z for z in targets]).tolist() == pytest.approx([-1.0] * 4)
    with pytest.raises(ValueError):
        repa_loss(targets, preds[:1])


def test_repa_targets_prepends_class_token():
    cls, patches = torch.randn(2, 6), torch.randn(2, 4, 6)
    y = repa_targets(cls, patches, reg=True)
    assert y.shape == (2, 5, 6) and torch.equal(y[:, 0], cls) and torch.equal(y[:, 1:], patches)
    assert repa_targets(cls, patches, reg=False) is patches


class ExactModel(torch.nn.Module):
    """Knows the noise: returns the exact velocity target, the REG class-token target, and given features."""

    def __init__(self, x, cls, feats):
        super().__init__()
        self.x, self.cls, self.feats = x, cls, feats
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, z_t, t, y, cls=None):
        tt = t[:, None, None, None]
        eps = (z_t - (1 - tt) * self.x) / tt  # invert z_t = (1 - t) x + t eps (linear path)
        v = self.w * (eps - self.x)
        cls_v = None
        if cls is not None:
            eps_c = (cls - (1 - t[:, None]) * self.cls) / t[:, None]
            cls_v = eps_c - self.cls
        return v, [f.clone() for f in self.feats], cls_v


def test_pred_loss_zero_for_exact_model_and_total_combines_terms():
    torch.manual_seed(0)
    x, cls, feats = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), [torch.randn(3, 5, 8)]
    out = compute_loss(ExactModel(x, cls, feats), x, torch.zeros(3, dtype=torch.long), feats, cls_target=cls,
                       proj_coeff=0.5, cls_weight=0.03)
    assert float(out["pred"]) < 1e-12 and float(out["cls"]) < 1e-12
    assert float(out["repa"]) == pytest.approx(-1.0)
    assert float(out["loss"].detach()) == pytest.approx(0.5 * -1.0, abs=1e-9)
    assert pred_loss(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [1.0, 1.0]
