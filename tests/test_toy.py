"""The toy experiment's parts: the shape / colour / joint metric, the trained toy target encoder (trained, cached,
read through the normal loading path), the `--smoke METHOD` preset, and what a toy run writes."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import encoders as E
import toy_experiment
import toy_world
import train
from toy_world import TOY_COLORS, TOY_NUM_CLASSES, toy_accuracy, toy_class_examples, toy_images


# --- metric ---------------------------------------------------------------------------------------------------------

def test_toy_accuracy_real_images_score_one_and_chance_otherwise():
    imgs, labels = toy_images(np.arange(40 * TOY_NUM_CLASSES), 32, seed=7)  # not the prototypes' seed
    assert toy_accuracy(imgs, labels) == {"colour": 1.0, "shape": 1.0, "joint": 1.0}
    small = toy_accuracy(*toy_images(np.arange(40 * TOY_NUM_CLASSES), 16, seed=7))  # 16 px: a few shapes blur
    assert min(small.values()) >= 0.96
    noise = torch.randint(0, 256, imgs.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    acc = toy_accuracy(noise, labels)
    assert abs(acc["colour"] - 1 / 3) < 0.06 and abs(acc["shape"] - 1 / 4) < 0.06 and acc["joint"] < 0.15


def test_toy_accuracy_scores_shape_and_colour_separately():
    n_col = len(TOY_COLORS)
    imgs, labels = toy_images(np.arange(20 * TOY_NUM_CLASSES), 32, seed=3)
    # right colour, wrong shape: label each image as the next shape in the same colour
    wrong_shape = (labels + n_col) % TOY_NUM_CLASSES
    assert toy_accuracy(imgs, wrong_shape) == {"colour": 1.0, "shape": 0.0, "joint": 0.0}
    # right shape, wrong colour: the next colour of the same shape
    wrong_colour = labels - labels % n_col + (labels + 1) % n_col
    assert toy_accuracy(imgs, wrong_colour) == {"colour": 0.0, "shape": 1.0, "joint": 0.0}
    half = np.where(np.arange(len(labels)) % 2 == 0, labels, wrong_shape)
    assert toy_accuracy(imgs, half)["joint"] == pytest.approx(0.5)


def test_toy_class_examples_are_real_items_of_those_classes():
    labels = np.array([5, 0, 5, 11, 5])
    imgs = toy_class_examples(labels, 16)
    expect = toy_images([5, 0, 17, 11, 29], 16)[0]  # the k-th use of class c is item c + 12 k
    assert imgs.dtype == np.uint8 and np.array_equal(imgs, expect)


# --- toy target encoder ---------------------------------------------------------------------------------------------

def test_toy_encoder_trained_once_cached_and_read_by_the_normal_path(tmp_path, monkeypatch, tiny_toy_encoders):
    calls = []
    real_train = toy_world.train_toy_encoder
    monkeypatch.setattr(toy_world, "train_toy_encoder", lambda *a, **k: calls.append(a) or real_train(*a, log=lambda m: None))

    def load():  # what train.py and evaluate.py do: make it if missing, then the normal loading path
        toy_world.ensure_toy_encoder("toy-vit", 4)
        return E.load_encoders("toy-vit", "cpu", resolution=16, grid_size=4)[0]

    path = E.toy_encoder_path(4)
    assert path.startswith(str(tmp_path / "cache")) and not os.path.exists(path)
    with pytest.raises(FileNotFoundError, match="not trained yet"):
        E.load_encoders("toy-vit", "cpu", resolution=16, grid_size=4)
    enc = load()
    assert len(calls) == 1 and os.path.isfile(path) and not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "cache"))
    cls, patches = enc(torch.from_numpy(toy_images(np.arange(3), 16)[0]))
    assert cls.shape == (3, E.TOY_DIM) and patches.shape == (3, 16, E.TOY_DIM)  # 4x4 grid of SiT-T/4 at 16 px
    sd = load_file(path)
    assert all(torch.equal(sd[k], v) for k, v in enc.vit.state_dict().items())
    init = E.build_encoder("toy-vit", 4, random_init=True, seed=E.TOY_TRAIN["seed"]).vit.state_dict()  # same init
    moved = [k for k in init if not torch.equal(init[k], sd[k])]
    assert "blocks.3.mlp.fc2.weight" in moved and "patch_embed.proj.0.weight" in moved  # the ViT itself trained
    again = load()  # cached: no second training
    assert len(calls) == 1
    torch.testing.assert_close(again(torch.from_numpy(toy_images([0], 16)[0]))[0], cls[:1])
    monkeypatch.setenv("REPA_REG_CACHE", str(tmp_path / "other"))  # same settings, same seed: same weights
    third = load()
    assert len(calls) == 2 and all(torch.equal(p, q) for p, q in zip(third.parameters(), enc.parameters()))


@pytest.mark.parametrize("style", ["sizes", "varied"])
def test_patch_geometry_is_what_each_patch_of_the_image_shows(style):
    imgs, _ = toy_images(np.arange(24), 16, seed=5, style=style)
    geo = toy_world.toy_patch_geometry(np.arange(24), 16, seed=5, style=style, patch=4)  # [N, 16, 3] row-major tokens
    x = imgs.astype(np.float32) / 255
    chroma = x.max(1) - x.min(1)  # the grey background has none; the shapes' colours have > 0.6
    seen = (chroma / 0.6).clip(0, 1).reshape(24, 4, 4, 4, 4).mean(axis=(2, 4)).reshape(24, 16)
    assert np.abs(seen - geo[..., 2]).max() < 0.1
    # the offset: the coverage-weighted mean offset of a symmetric shape (square, disk, plus) is its centre
    sym = np.isin(np.arange(24) % TOY_NUM_CLASSES // len(TOY_COLORS), [0, 1, 3])
    centre = (geo[sym, :, :2] * geo[sym, :, 2:]).sum(1) / geo[sym, :, 2:].sum(1)
    assert np.abs(centre).max() < 0.15
    assert (np.diff(geo[0, :4, 0]) > 0).all() and (np.diff(geo[0, ::4, 1]) > 0).all()  # x along a row, y down


class _FakeEncoder:
    """Patch tokens made of given per-patch vectors (what encoder_layout reads: grid_size, enc(images))."""
    grid_size = 4

    def __init__(self, make):
        self.make = make

    def __call__(self, images):
        tokens = self.make(len(images))
        return tokens.mean(1), tokens


def test_encoder_layout_tells_geometry_tokens_from_label_tokens():
    n = 240
    geo = torch.from_numpy(toy_world.toy_patch_geometry(np.arange(n), 16, 777, "sizes", 4))
    labels = torch.arange(n) % TOY_NUM_CLASSES
    label_tokens = torch.cat([torch.nn.functional.one_hot(labels, TOY_NUM_CLASSES)[:, None].expand(n, 16, -1),
                              torch.eye(16)[None].expand(n, 16, 16)], -1).float()  # class + position only
    knows = toy_experiment.encoder_layout(_FakeEncoder(lambda m: torch.cat([label_tokens[:m], geo[:m]], -1)), 16, "sizes", n)
    label = toy_experiment.encoder_layout(_FakeEncoder(lambda m: label_tokens[:m]), 16, "sizes", n)
    assert knows["coverage_r2"] > 0.99 and knows["offset_r2"] > 0.99  # geometry in the tokens: read back
    assert abs(label["within_class_cosine"] - 1) < 1e-5 and knows["within_class_cosine"] < 1 - 1e-3
    assert label["between_class_cosine"] < 0.6
    # tokens that hold only class and position explain coverage no better than the label does, and well below 1
    assert label["coverage_r2"] < 0.9 and label["coverage_r2"] <= label["label_coverage_r2"] + 0.02
    assert knows["label_coverage_r2"] == pytest.approx(label["label_coverage_r2"])


def test_dense_toy_encoder_is_its_own_cached_file_and_learns_geometry(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_REG_CACHE", str(tmp_path))
    for k, v in {"steps": 3, "batch_size": 8, "num_images": 48}.items():
        monkeypatch.setitem(E.TOY_TRAIN, k, v)
    toy_world.ensure_toy_encoder("toy-vit-dense", 2)
    assert os.path.isfile(E.toy_encoder_path(2, "dense")) and not os.path.exists(E.toy_encoder_path(2, "class"))
    dense = E.load_encoders("toy-vit-dense", "cpu", resolution=8, grid_size=2)[0]
    toy_world.ensure_toy_encoder("toy-vit", 2)
    plain = E.load_encoders("toy-vit", "cpu", resolution=8, grid_size=2)[0]
    moved = [k for k, v in dense.vit.state_dict().items() if not torch.equal(v, plain.vit.state_dict()[k])]
    assert "blocks.3.mlp.fc2.weight" in moved  # same seed and batches: only the geometry term differs
    with pytest.raises(toy_world.UsageError, match="objective 'jepa'"):
        toy_world.train_toy_encoder(2, objective="jepa")
    with pytest.raises(toy_world.UsageError, match="--enc-type tiny-vit"):
        toy_experiment.encoders_main(["--enc-type", "tiny-vit"])


# --- smoke preset -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, method, enc, reg, coeff", [
    ([], "reg", "toy-vit", True, 0.5), (["sit"], "sit", "none", False, 0.0), (["repa"], "repa", "toy-vit", False, 0.5),
    (["reg"], "reg", "toy-vit", True, 0.5), (["--repa"], "repa", "toy-vit", False, 0.5)])
def test_smoke_takes_the_method(flags, method, enc, reg, coeff):
    args = train.parse_args(["--smoke", *flags])
    assert (train.method_name(args), args.enc_type, args.reg, args.proj_coeff) == (method, enc, reg, coeff)
    assert args.exp_name == f"smoke-{method}" and args.model == "SiT-T/4" and args.data_dir == "toy"
    over = train.parse_args(["--smoke", *flags, "--learning-rate", "5e-4", "--max-train-steps", "7"])
    assert (over.learning_rate, over.max_train_steps, train.method_name(over)) == (5e-4, 7, method)


def test_smoke_and_toy_encoder_bad_input(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--smoke", "dit"])
    assert "--smoke" in capsys.readouterr().err
    args = train.parse_args(["--enc-type", "toy-vit", "--data-dir", "data/imagenet256"])
    with pytest.raises(train.UsageError, match="--enc-type toy-vit .*--data-dir toy"):
        train.check_args(args, 1)
    with pytest.raises(train.UsageError, match="--enc-type toy-vit-dense .*--data-dir toy"):
        train.check_args(train.parse_args(["--enc-type", "dinov2-vit-b,toy-vit-dense", "--data-dir", "d"]), 1)
    with pytest.raises(train.UsageError, match="--repa and --reg"):
        train.check_args(train.parse_args(["--smoke", "--reg", "--repa", "--data-dir", "toy"]), 1)


def test_toy_run_logs_three_accuracies_and_a_real_grid(tmp_path, single_thread):
    out = train.main(["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "16",
                      "--batch-size", "8", "--enc-type", "tiny-vit", "--projector-dim", "32", "--num-workers", "0",
                      "--device", "cpu", "--max-train-steps", "3", "--sample-every", "2", "--num-sample-images", "6",
                      "--sample-steps", "2", "--output-dir", str(tmp_path), "--exp-name", "t"])
    rows = [json.loads(line) for line in open(os.path.join(out["exp_dir"], "metrics.jsonl"))]
    acc = [r for r in rows if "toy_joint" in r]
    assert [r["step"] for r in acc] == [2, 3]  # training goes on after an evaluation (step 3), and ends with one
    assert all(0 <= r[f"toy_{k}"] <= 1 for r in acc for k in ("colour", "shape", "joint"))
    from PIL import Image
    real = np.asarray(Image.open(os.path.join(out["exp_dir"], "samples", "real.png")))
    fake = np.asarray(Image.open(os.path.join(out["exp_dir"], "samples", "0000003.png")))
    assert real.shape == fake.shape  # same layout: one real image per generated one, same classes


def test_smoke_run_trains_the_toy_encoder_on_first_use(tmp_path, monkeypatch, single_thread):
    # a fresh machine: nothing cached; train.py must make toy-vit before loading it (then read it from the cache)
    monkeypatch.setenv("REPA_REG_CACHE", str(tmp_path / "cache"))
    for k, v in {"steps": 2, "batch_size": 8, "num_images": 48}.items():
        monkeypatch.setitem(E.TOY_TRAIN, k, v)
    out = train.main(["--smoke", "repa", "--model", "SiT-T/8", "--toy-samples", "16", "--batch-size", "8",
                      "--projector-dim", "32", "--max-train-steps", "1", "--sample-every", "0",
                      "--output-dir", str(tmp_path / "runs")])
    assert out["steps"] == 1 and os.path.isfile(E.toy_encoder_path(2, style="sizes"))  # SiT-T/8 at 16 px: 2x2 tokens


def test_the_toy_set_renders_at_its_own_resolution_unless_told_and_warns_of_a_slow_one(capsys):
    args = train.parse_args(["--data-dir", "toy"])
    assert train.check_args(args, 1).resolution == toy_world.TOY_RESOLUTION == 32  # not ImageNet's 256
    assert train.check_args(train.parse_args(["--data-dir", "toy", "--resolution", "48"]), 1).resolution == 48
    assert train.check_args(train.parse_args(["--data-dir", "data/imagenet256"]), 1).resolution == 256
    assert capsys.readouterr().err == ""
    train.check_args(train.parse_args(["--data-dir", "toy", "--resolution", "256"]), 1)
    assert "warning: --resolution 256 with --data-dir toy" in capsys.readouterr().err
