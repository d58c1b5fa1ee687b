"""Every script checks its flags before any compute: ranges, NaN / inf, names that must stay inside the output
folder, output files that are folders or of another format. Each bad value is one line `script: error: ...` that
names the flag (no argparse usage dump, no traceback) and exit status 2, and nothing is written."""
import os

import pytest
import torch

import evaluate
import plumbing
import sample
import toy_experiment
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "40", "--batch-size", "8",
        "--enc-type", "tiny-vit", "--projector-dim", "64", "--num-workers", "0", "--device", "cpu",
        "--sample-every", "0", "--mixed-precision", "no", "--max-train-steps", "1"]


def one_line(capsys, prog, run, *argv):
    """run(argv) must end with exit status 2 and one line `prog[ command]: error: ...` on stderr; returns it."""
    with pytest.raises(SystemExit) as e:
        code = run(list(argv))
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(prog) and ": error: " in err and err.count("\n") == 1, err
    assert "Traceback" not in err and "usage:" not in err
    return err


def no_compute(monkeypatch):
    """Any model build or sampling fails the test: the flags must be refused before."""
    def fail(*a, **k):
        pytest.fail("compute started before the flags were checked")
    monkeypatch.setattr(train, "build_training", fail)
    monkeypatch.setattr(sample, "load_for_sampling", fail)
    monkeypatch.setattr(sample, "_sample_batch", fail)
    monkeypatch.setattr(evaluate, "load_toy_model", fail)


@pytest.mark.parametrize("flags, expected", [
    (["--sample-cfg-scale", "nan"], "--sample-cfg-scale must be a number >= 1 (1 = no guidance), got nan"),
    (["--sample-cfg-scale", "0.5"], "--sample-cfg-scale must be a number >= 1"),
    (["--learning-rate", "inf"], "--learning-rate must be a positive number, got inf"),
    (["--ema-decay", "nan"], "--ema-decay must be a number in [0, 1], got nan"),
    (["--peak-tflops", "-1"], "--peak-tflops must be a positive number, got -1.0"),
    (["--resume-step", "-2"], "--resume-step must be an integer >= 0"),
    (["--exp-name", "../escape"], "--exp-name '../escape' must be one plain name"),
    (["--exp-name", "a/b"], "--exp-name 'a/b' must be one plain name"),
    (["--exp-name", ".."], "--exp-name '..' must be one plain name"),
    (["--exp-name", "/tmp/abs"], "--exp-name '/tmp/abs' must be one plain name"),
    (["--exp-name", ""], "--exp-name '' must be one plain name"),
    (["--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
    (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--encoder-depth", "99"], "--encoder-depth 99: SiT-T/8 has 6 blocks; align after one of blocks 1..6"),
    (["--data-dir", "/nonexistent"], "--data-dir /nonexistent does not exist. Preprocess ImageNet"),
])
def test_train_refuses_each_bad_flag_in_one_line_before_any_compute(tmp_path, capsys, monkeypatch, flags, expected):
    no_compute(monkeypatch)
    monkeypatch.chdir(tmp_path)  # a relative escape would land here
    err = one_line(capsys, "train.py", train.main, *TINY, "--output-dir", str(tmp_path / "out"), *flags)
    assert expected in err
    assert os.listdir(tmp_path) == []  # no run folder, inside --output-dir or out of it


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "0000010.pt"
    from test_sample import _save_ours
    return _save_ours(path)


@pytest.mark.parametrize("flags, expected", [
    (["--cfg-scale", "nan"], "--cfg-scale must be a number >= 1 (1 = no guidance, as the released code), got nan"),
    (["--cfg-scale", "inf"], "--cfg-scale must be a number >= 1"),
    (["--cfg-scale", "0.5"], "--cfg-scale must be a number >= 1"),
    (["--cls-cfg-scale", "nan"], "--cls-cfg-scale must be a number >= 0"),
    (["--guidance-high", "nan"], "--guidance-high must be a number in [0.0, 1.0], got nan"),
    (["--guidance-low", "-0.1"], "--guidance-low must be a number in [0.0, 1.0], got -0.1"),
    (["--nrow", "0"], "--nrow must be a positive integer (images per grid row), got 0"),
    (["--nrow", "-3"], "--nrow must be a positive integer (images per grid row), got -3"),
    (["--num-classes", "0"], "--num-classes must be a positive integer, got 0"),
    (["--resolution", "-16"], "--resolution must be a positive integer, got -16"),
    (["--class-labels", "-1", "2"], "--class-labels -1: class labels are 0 .. num_classes - 1"),
    (["--grid-path", "."], "--grid-path . is a folder; pass a file name ending in .png"),
    (["--grid-path", "grid.jpg"], "--grid-path grid.jpg: the file is written as .png; give a name ending in .png"),
    (["--grid-path", "sample.py/grid.png"], "is a file, not a folder"),
    (["--sample-dir", "sample.py"], "--sample-dir sample.py is a file; pass a folder"),
    (["--num-steps", "nan"], "argument --num-steps: must be a positive integer, got 'nan'"),
    (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
])
def test_sample_refuses_each_bad_flag_in_one_line_before_loading(ckpt, capsys, monkeypatch, flags, expected):
    no_compute(monkeypatch)
    monkeypatch.chdir(ROOT)  # sample.py: a file that exists
    err = one_line(capsys, "sample.py", sample.cli, "--ckpt", ckpt, "--device", "cpu", "--class-labels", "0", "1",
                   *flags)
    assert expected in err


def test_sample_without_a_checkpoint_names_the_flag(capsys, monkeypatch, tmp_path):
    no_compute(monkeypatch)
    err = one_line(capsys, "sample.py", sample.cli, "--ckpt", str(tmp_path / "nope.pt"))
    assert f"--ckpt {tmp_path / 'nope.pt'}: checkpoint not found" in err
    err = one_line(capsys, "sample.py", sample.cli, "--class-labels", "1")
    assert "the following arguments are required: --ckpt" in err


def test_sample_uses_fp32_on_the_cpu_unless_asked(ckpt, tmp_path, monkeypatch):
    # bf16 autocast on a CPU without bf16 units is emulated and several times slower: fp32 there, bf16 on a GPU.
    seen = []
    real = torch.autocast

    def spy(device_type, dtype=None, enabled=True, **k):
        seen.append((device_type, dtype if enabled else None))
        return real(device_type, dtype=dtype, enabled=enabled, **k)
    monkeypatch.setattr(sample.torch, "autocast", spy)
    args = ["--ckpt", ckpt, "--device", "cpu", "--class-labels", "0", "--num-steps", "2", "--mode", "ode"]
    sample.main(args + ["--grid-path", str(tmp_path / "a.png")])
    sample.main(args + ["--grid-path", str(tmp_path / "b.png"), "--precision", "bf16"])
    assert seen == [("cpu", None), ("cpu", torch.bfloat16)]


@pytest.mark.parametrize("argv, expected", [
    (["alignment", "--ckpt", "x.pt", "--t", "nan"], "--t must be a number in [0, 1] (0 = clean data, 1 = pure noise)"),
    (["alignment", "--ckpt", "x.pt", "--t", "1.5"], "--t must be a number in [0, 1]"),
    (["alignment", "--ckpt", "x.pt", "--plot", "."], "--plot . is a folder"),
    (["alignment", "--ckpt", "x.pt", "--plot", "a.svg"], "--plot a.svg: the file is written as .png"),
    (["alignment", "--ckpt", "x.pt", "--json", "out.txt"], "--json out.txt: the file is written as .json"),
    (["alignment", "--ckpt", "x.pt", "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["alignment", "--ckpt", "missing.pt"], "--ckpt missing.pt: no such file"),
    (["alignment", "--ckpt", "x.pt", "--topk", "0"], "--topk 0 must be in 1.."),
    (["alignment"], "the following arguments are required: --ckpt"),
    (["--batch-size", "0", "a.npz", "b.npz"], "--batch-size must be a positive integer, got 0"),
    (["--k", "x"], "argument --k: invalid int value: 'x'"),
])
def test_evaluate_refuses_each_bad_flag_in_one_line(tmp_path, capsys, monkeypatch, argv, expected):
    no_compute(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.pt").write_bytes(b"")
    err = one_line(capsys, "evaluate.py", evaluate.cli, *argv)
    assert expected in err


@pytest.mark.parametrize("argv, expected", [
    (["experiment", "--seeds", "-1"], "--seeds must be an integer >= 0, got -1"),
    (["experiment", "--tag", "../up"], "--tag '../up' must be one plain name"),
    (["experiment", "--eval-every", "-5"], "--eval-every must be an integer >= 0"),
    (["experiment", "--jobs", "0"], "--jobs 0: give 1 or more"),
    (["experiment", "--methods", "dit"], "argument --methods: invalid choice: 'dit'"),
    (["encoders", "--grid-size", "0"], "--grid-size must be an integer >= 1, got 0"),
    (["encoders", "--num-images", "5"], "--num-images must be an integer >= 12, got 5"),
    (["fly"], "unknown command 'fly'"),
])
def test_toy_refuses_each_bad_flag_in_one_line(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(toy_experiment, "run_trainings", lambda *a, **k: pytest.fail("trained with a bad flag"))
    monkeypatch.chdir(tmp_path)
    err = one_line(capsys, "toy.py", lambda a: plumbing.run_script("toy.py", toy_experiment.main, a), *argv)
    assert expected in err
    assert os.listdir(tmp_path) == []


def test_an_argparse_error_is_one_line_and_help_still_lists_every_flag(capsys):
    parser = plumbing.ArgumentParser(prog="x.py")
    parser.add_argument("--n", type=int, help="how many")
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--n", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "x.py: error: argument --n: invalid int value: 'many' (see x.py --help)\n"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--help"])
    assert e.value.code == 0 and "--n N" in capsys.readouterr().out
