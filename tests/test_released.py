"""Coming from the released REPA / REG code: its checkpoints resume here, its command lines (train.sh, eval.sh, the
READMEs) parse with their released meaning or stop with a message naming ours, and no parser prefix-matches.

The checkpoints are built the way the released train.py saves them: {'model', 'ema', 'opt', 'args': Namespace,
'steps'}, the optimizer over *all* parameters (the frozen position embedding included) in the released module
order, after a real AdamW step. CPU, offline, SiT-T on the 16 px toy set."""
import argparse
import copy
import os

import pytest
import torch

import checkpoints
import data
import encoders
import sample
import train
from model import SiT_models, rename_legacy_blocks
from plumbing import UsageError

# SiT-T/8 + REG on 16 px toy images (2x2 tokens + the class token), random tiny-vit target (192-d).
TINY = ["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "40", "--batch-size", "8",
        "--enc-type", "tiny-vit", "--projector-dim", "64", "--num-workers", "0", "--device", "cpu",
        "--log-every", "1", "--sample-every", "0"]

# The released SiT registers its modules in this order (REG: the final layer before the class-token input layers;
# ours registers them the other way round), so its state dict and its optimizer list parameters in this order.
RELEASED_MODULE_ORDER = ["x_embedder", "t_embedder", "y_embedder", "pos_embed", "blocks", "projectors", "final_layer",
                         "cls_projectors2", "wg_norm"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def released_namespace(**over):
    """The Namespace the released REG train.py pickles as 'args' (its flags, REG train.sh values, paths replaced)."""
    ns = dict(output_dir="exps", exp_name="linear-dinov2-b-enc8", logging_dir="logs", report_to="wandb",
              sampling_steps=10000, resume_step=0, model="SiT-XL/2", num_classes=1000, encoder_depth=8,
              fused_attn=True, qk_norm=False, ops_head=16, data_dir="data/imagenet_vae", resolution=256,
              batch_size=256, allow_tf32=True, mixed_precision="fp16", epochs=1400, max_train_steps=1000000,
              checkpointing_steps=10000, gradient_accumulation_steps=1, learning_rate=1e-4, adam_beta1=0.9,
              adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8, max_grad_norm=1.0, seed=0,
              num_workers=4, path_type="linear", prediction="v", cfg_prob=0.1, enc_type="dinov2-vit-b",
              proj_coeff=0.5, weighting="uniform", legacy=False, cls=0.03)
    ns.update(over)
    return argparse.Namespace(**ns)


def write_released_checkpoint(path, reg=True, steps=7):
    """A checkpoint exactly as the released train.py writes it, for SiT-T/8 on the toy set: random weights, the
    state dict in the released module order, AdamW over all parameters (model.parameters(), frozen pos_embed
    included) after one real step, the Namespace of its flags. Returns (checkpoint, released parameter names)."""
    torch.manual_seed(3)
    net = SiT_models["SiT-T/8"](input_size=16, in_channels=3, num_classes=12, encoder_depth=4, z_dims=[192],
                                projector_dim=64, cls_dim=192 if reg else None)
    named = dict(net.named_parameters())
    order = sorted(named, key=lambda n: RELEASED_MODULE_ORDER.index(n.split(".")[0]))  # stable within a module
    assert reg is False or order != list(named)  # the REG orders differ: matching by position would be wrong
    opt = torch.optim.AdamW([named[n] for n in order], lr=1e-4, betas=(0.9, 0.999), weight_decay=0, eps=1e-8)
    loss = sum((p * torch.randn_like(p)).sum() for p in net.parameters() if p.requires_grad)
    loss.backward()
    opt.step()
    ema = {n: (named[n] + 0.01).detach().clone() for n in order}
    ckpt = {"model": {n: named[n].detach().clone() for n in order}, "ema": ema, "opt": opt.state_dict(),
            "args": released_namespace(model="SiT-T/8", encoder_depth=4, enc_type="tiny-vit", resolution=16,
                                       data_dir="toy", num_classes=12),
            "steps": steps}
    torch.save(ckpt, path)  # plain pickle with the Namespace, like the released torch.save
    return ckpt, order


@pytest.mark.parametrize("method", ["reg", "repa"])
def test_released_checkpoint_resumes_for_one_step(tmp_path, monkeypatch, capsys, method):
    path = tmp_path / "0000007.pt"
    ckpt, order = write_released_checkpoint(path, reg=method == "reg")
    seen = {}
    real_step = train.train_step

    def spy(model, raw_model, ema_params, params, opt, *rest):
        if not seen:  # the state right after resuming, before the first step
            names = [n for n, p in raw_model.named_parameters() if p.requires_grad]
            seen.update(names=names, weights={n: p.detach().clone() for n, p in raw_model.state_dict().items()},
                        opt=copy.deepcopy(opt.state_dict()), n_opt=len(opt.param_groups[0]["params"]))
        return real_step(model, raw_model, ema_params, params, opt, *rest)

    monkeypatch.setattr(train, "train_step", spy)
    out = train.main([*TINY, *(["--reg"] if method == "reg" else []), "--output-dir", str(tmp_path), "--exp-name", "r",
                      "--resume", str(path), "--max-train-steps", "8"])
    assert out["steps"] == 8  # continued at the released step 7, one step
    log = capsys.readouterr().out
    assert "released checkpoint" in log and "no RNG state and no data position" in log
    for n, w in ckpt["model"].items():
        assert torch.equal(seen["weights"][n], w), n
    # Our AdamW covers the trainable parameters (not pos_embed) in our order; each state is the released one of the
    # parameter with the same name.
    released_id = dict(zip(order, ckpt["opt"]["param_groups"][0]["params"]))
    assert "pos_embed" not in seen["names"] and seen["n_opt"] == len(order) - 1
    for i, name in enumerate(seen["names"]):
        mine, theirs = seen["opt"]["state"][i], ckpt["opt"]["state"][released_id[name]]
        assert torch.equal(mine["exp_avg"], theirs["exp_avg"]) and torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"])
        assert float(mine["step"]) == 1.0
    assert seen["opt"]["param_groups"][0]["lr"] == 1e-4
    ours = torch.load(tmp_path / "r" / "checkpoints" / "0000008.pt", weights_only=True)
    assert ours["steps"] == 8 and ours["args"]["method"] == method
    for n, w in ckpt["ema"].items():  # the EMA went on from the released EMA: 0.9999 ema + 0.0001 theta
        assert (ours["ema"][n] - w).abs().max() < 1e-3, n


def test_released_checkpoint_of_another_model_or_method_is_refused_and_nothing_written(tmp_path, capsys):
    path = tmp_path / "released.pt"
    write_released_checkpoint(path)

    def error(*flags):
        with pytest.raises(SystemExit) as e:
            train.main([*TINY, "--output-dir", str(tmp_path / "out"), "--exp-name", "x", "--resume", str(path),
                        *flags])
        assert e.value.code == 2
        return capsys.readouterr().err

    err = error("--reg", "--model", "SiT-T/4")
    assert "model: checkpoint 'SiT-T/8' vs now 'SiT-T/4'" in err and "Traceback" not in err
    err = error()  # a REG checkpoint resumed as REPA
    assert "reg: checkpoint True vs now False" in err
    err = error("--reg", "--encoder-depth", "2")
    assert "encoder_depth: checkpoint 4 vs now 2" in err
    assert not (tmp_path / "out").exists()


def test_released_optimizer_state_with_a_wrong_shape_is_refused(tmp_path):
    ckpt, order = write_released_checkpoint(tmp_path / "r.pt")
    net = SiT_models["SiT-T/8"](input_size=16, in_channels=3, num_classes=12, encoder_depth=4, z_dims=[192],
                                projector_dim=64, cls_dim=192)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
    i = order.index("final_layer.linear.weight")
    ckpt["opt"]["state"][i]["exp_avg"] = ckpt["opt"]["state"][i]["exp_avg"][:1]
    with pytest.raises(UsageError, match="final_layer.linear.weight"):
        checkpoints.released_optimizer_state(ckpt["opt"], order, net, opt)


def test_resume_step_is_the_released_way_to_name_a_checkpoint(tmp_path):
    args = train.parse_args([*TINY, "--output_dir", str(tmp_path), "--exp_name", "e", "--resume-step", "50000"])
    train.check_args(args, 1)
    assert args.resume == os.path.join(str(tmp_path), "e", "checkpoints", "0050000.pt")


# ---------------------------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------------------------

# REG's train.sh (accelerate launch ... train.py), paths replaced.
REG_TRAIN_SH = ['--report-to=wandb', '--allow-tf32', '--mixed-precision=fp16', '--seed=0', '--path-type=linear',
                '--prediction=v', '--weighting=uniform', '--model=SiT-XL/2', '--enc-type=dinov2-vit-b',
                '--proj-coeff=0.5', '--encoder-depth=8', '--output-dir=OUT', '--exp-name=linear-dinov2-b-enc8',
                '--batch-size=256', '--data-dir=DATA', '--cls=0.03']
# REG's eval.sh (python -m torch.distributed.launch ... generate.py), paths replaced; the launcher adds --local-rank.
REG_EVAL_SH = ['--local-rank=0', '--model', 'SiT-XL/2', '--num-fid-samples', '50000', '--ckpt', 'CKPT/2400000.pt',
               '--path-type=linear', '--encoder-depth=8', '--projector-embed-dims=768', '--per-proc-batch-size=64',
               '--mode=sde', '--num-steps=250', '--cfg-scale=2.3', '--cls-cfg-scale=2.3', '--guidance-high=0.85',
               '--sample-dir', 'SAMPLES', '--cls=768']
# REPA's README generate.py command (its underscore spellings included).
REPA_README_GENERATE = ['--model', 'SiT-XL/2', '--num-fid-samples', '50000', '--ckpt', 'CKPT', '--path_type=linear',
                        '--encoder_depth=8', '--projector_embed_dims=768', '--per-proc-batch-size=64', '--mode=sde',
                        '--num_steps=250', '--cfg-scale=1.8', '--guidance_high=0.7']


def test_reg_train_sh_parses_with_the_released_meaning():
    a = train.parse_args(REG_TRAIN_SH)
    assert a.reg and a.cls == 0.03  # the released REG train.py is always REG; its --cls is beta
    assert (a.report_to, a.tf32, a.mixed_precision, a.seed) == ("wandb", True, "fp16", 0)
    assert (a.path_type, a.prediction, a.weighting) == ("linear", "v", "uniform")
    assert (a.model, a.enc_type, a.proj_coeff, a.encoder_depth) == ("SiT-XL/2", "dinov2-vit-b", 0.5, 8)
    assert (a.output_dir, a.exp_name, a.batch_size, a.data_dir) == ("OUT", "linear-dinov2-b-enc8", 256, "DATA")
    assert (a.max_train_steps, a.checkpointing_steps) == (1_000_000, 10_000)  # REG's defaults
    assert (a.learning_rate, a.max_grad_norm, a.ema_decay) == (1e-4, 1.0, 0.9999)
    a.report_to = "none"  # wandb is not installed here (check_args would say: pip install wandb)
    train.check_args(a, 8)
    assert (a.batch_size, a.grad_accum, a.micro_batch, train.method_name(a)) == (256, 1, 32, "reg")


def test_reg_eval_sh_and_repa_readme_parse_with_the_released_meaning():
    a = sample.parse_args(REG_EVAL_SH)
    assert a.cls == 768 and a.cls_cfg_scale == 2.3  # not prefix-matched into --cls-cfg-scale 768
    assert (a.model, a.num_fid_samples, a.ckpt, a.path_type, a.encoder_depth) == ("SiT-XL/2", 50000,
                                                                                  "CKPT/2400000.pt", "linear", 8)
    assert (a.projector_embed_dims, a.per_proc_batch_size, a.mode, a.num_steps) == ("768", 64, "sde", 250)
    assert (a.cfg_scale, a.guidance_low, a.guidance_high, a.sample_dir) == (2.3, 0.0, 0.85, "SAMPLES")
    a = sample.parse_args(REPA_README_GENERATE)
    assert (a.path_type, a.encoder_depth, a.projector_embed_dims, a.num_steps, a.cfg_scale, a.guidance_high) == (
        "linear", 8, "768", 250, 1.8, 0.7)


def _tiny_reg_checkpoint(path):
    net = SiT_models["SiT-T/4"](input_size=16, in_channels=3, num_classes=5, z_dims=[32], encoder_depth=2,
                                projector_dim=32, cls_dim=8)
    args = dict(encoder_depth=2, path_type="linear", latent_scale=1.0, pixel_space=True, data_dir="toy")
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "opt": {}, "args": args, "steps": 1}, path)
    return str(path)


def test_generate_flags_are_checked_against_the_weights(tmp_path, capsys):
    ckpt = _tiny_reg_checkpoint(tmp_path / "reg.pt")
    grid = ["--ckpt", ckpt, "--class-labels", "0", "1", "--num-steps", "2", "--device", "cpu"]
    out = sample.main([*grid, "--cls=8", "--projector-embed-dims=32", "--grid-path", str(tmp_path / "ok.png")])
    assert os.path.isfile(out)
    for flags, msg in [(["--cls=768"], "--cls 768: the checkpoint's class token has dimension 8"),
                       (["--projector-embed-dims=768,1024"], r"projectors output \[32\]"),
                       (["--qk-norm"], "no q/k normalization")]:
        with pytest.raises(ValueError, match=msg):
            sample.main([*grid, *flags, "--grid-path", str(tmp_path / "bad.png")])
    assert not (tmp_path / "bad.png").exists()


def test_legacy_checkpoint_samples_with_legacy(tmp_path):
    ckpt = torch.load(_tiny_reg_checkpoint(tmp_path / "new.pt"), weights_only=True)
    for key in ("model", "ema"):  # the early runs' layout: blocks after encoder_depth (2) as decoder_blocks.*
        ckpt[key] = {(f"decoder_blocks.{int(k.split('.')[1]) - 2}." + k.split(".", 2)[2]
                      if k.startswith("blocks.") and int(k.split(".")[1]) >= 2 else k): v for k, v in ckpt[key].items()}
    torch.save(ckpt, tmp_path / "old.pt")
    grid = ["--ckpt", str(tmp_path / "old.pt"), "--class-labels", "0", "--num-steps", "2", "--device", "cpu",
            "--encoder-depth", "2", "--grid-path", str(tmp_path / "g.png")]
    with pytest.raises(ValueError, match="decoder_blocks"):
        sample.main(grid)
    assert os.path.isfile(sample.main([*grid, "--legacy"]))


def test_legacy_weights_rename_decoder_blocks_after_encoder_depth():
    sd = {"blocks.0.attn.qkv.weight": 0, "blocks.1.mlp.fc1.bias": 1, "decoder_blocks.0.attn.proj.weight": 2,
          "decoder_blocks.3.norm1.weight": 3, "final_layer.linear.bias": 4}
    assert rename_legacy_blocks(sd, 2) == {"blocks.0.attn.qkv.weight": 0, "blocks.1.mlp.fc1.bias": 1,
                                           "blocks.2.attn.proj.weight": 2, "blocks.5.norm1.weight": 3,
                                           "final_layer.linear.bias": 4}


def test_no_parser_takes_an_abbreviation(capsys):
    for parse, argv in [(train.parse_args, ["--learning", "1e-3"]), (train.parse_args, ["--enc", "tiny-vit"]),
                        (sample.parse_args, ["--ckpt", "x", "--cls-cfg", "2"]),
                        (data.main, ["--source", "x", "--dest", "y", "--res", "512"])]:
        with pytest.raises(SystemExit) as e:
            parse(argv)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_released_flags_we_do_not_take_stop_naming_ours(capsys):
    for argv, ours in [(["--logging-dir", "logs"], "log.txt"), (["--data-path", "x"], "use --data-dir"),
                       (["--models", "SiT-B/2"], "use --model")]:
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "released code" in err and ours in err
    a = train.parse_args(["--qk-norm", "--data-dir", "toy"])
    with pytest.raises(UsageError, match="no q/k normalization"):
        train.check_args(a, 1)
    a = train.parse_args(["--no-qk-norm", "--no-fused-attn", "--ops-head", "16", "--local_rank=3", "--data-dir", "toy"])
    train.check_args(a, 1)  # accepted: no effect here, none in the release either (SDPA computes the same attention)


def test_released_gradient_accumulation_trains_the_released_effective_batch(tmp_path):
    # Released: --batch-size is the batch of one accumulation step, so 2 x 4 = 8 images per optimizer step.
    out = train.main([*TINY, "--output-dir", str(tmp_path), "--exp-name", "acc", "--max-train-steps", "2",
                      "--batch-size", "4", "--gradient-accumulation-steps", "2"])
    ckpt = torch.load(os.path.join(out["exp_dir"], "checkpoints", "0000002.pt"), weights_only=True)
    assert (ckpt["args"]["batch_size"], ckpt["args"]["grad_accum"], ckpt["args"]["micro_batch"]) == (8, 2, 4)
    assert ckpt["data"] == [0, 16]  # 2 steps x 2 micro-batches x 4 images of this rank's data consumed
    args = train.parse_args(["--batch-size", "256", "--grad-accum", "2", "--data-dir", "toy"])  # ours: 256 per step
    train.check_args(args, 1)
    assert (args.batch_size, args.micro_batch) == (256, 128)
    args = train.parse_args(["--gradient-accumulation-steps", "2", "--grad-accum", "2", "--data-dir", "toy"])
    with pytest.raises(UsageError, match="one convention"):
        train.check_args(args, 1)


def test_encoder_names_in_the_released_spelling():
    assert encoders.canonical_name("dinov2reg-vit-b") == "dinov2-vit-b-reg"
    assert encoders.canonical_name("DINOv2-ViT-B") == "dinov2-vit-b"
    args = train.parse_args(["--enc-type", "dinov2reg-vit-l,clip-vit-L", "--data-dir", "toy"])
    train.check_args(args, 1)
    assert args.enc_type == "dinov2-vit-l-reg,clip-vit-L"
    args = train.parse_args(["--enc-type", "None", "--data-dir", "toy"])  # the released "no encoder"
    train.check_args(args, 1)
    assert args.enc_type == "none" and train.method_name(args) == "sit"
    with pytest.raises(UsageError, match="unknown encoder 'dinov3-vit-b'"):
        train.check_args(train.parse_args(["--enc-type", "dinov3-vit-b", "--data-dir", "toy"]), 1)


def test_defaults_per_method_follow_each_release(capsys):
    repa, reg = train.parse_args([]), train.parse_args(["--reg"])
    assert (repa.max_train_steps, repa.checkpointing_steps) == (400_000, 50_000)  # REPA's train.py
    assert (reg.max_train_steps, reg.checkpointing_steps) == (1_000_000, 10_000)  # REG's train.py
    assert train.parse_args(["--reg", "--max-train-steps", "5"]).max_train_steps == 5
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "400000 (REPA release), 1000000 with --reg (REG release)" in help_text
    assert "50000 (REPA release), 10000 with --reg (REG release)" in help_text


def test_legacy_drops_labels_a_second_time_in_the_loop(tmp_path, monkeypatch):
    seen = []
    real = train.compute_loss

    def spy(model, x, y, *a, **k):
        seen.append(y.clone())
        return real(model, x, y, *a, **k)

    monkeypatch.setattr(train, "compute_loss", spy)
    common = [*TINY, "--output-dir", str(tmp_path), "--max-train-steps", "1", "--cfg-prob", "1.0"]
    train.main([*common, "--exp-name", "plain"])
    train.main([*common, "--exp-name", "legacy", "--legacy"])
    assert (seen[0] < 12).all()  # without --legacy the loop passes the labels; only the model drops them
    assert (seen[1] == 12).all()  # --legacy: the loop itself already replaced them by the null label
    torch.manual_seed(0)
    frac = (train.drop_labels(torch.zeros(100_000, dtype=torch.long), 0.1, 7) == 7).float().mean()
    assert abs(frac - 0.1) < 0.005, frac
