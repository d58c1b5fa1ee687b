"""The toy experiment (docs/toy.md): SiT vs REPA vs REG on the toy world (toy_world.py), each training a
`python train.py ...` process, with tables of the toy FD and joint accuracy against the step and the steps each
method needs to reach SiT's final value; and what the toy target encoders' patch tokens carry. Run through toy.py:

    python toy.py experiment [--design spatial] [--methods sit repa reg] [--seeds 0 1 2] [--jobs 2] [train.py flags]
    python toy.py encoders [--enc-type toy-vit toy-vit-dense]
"""
import io
import json
import math
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import encoders
import toy_world
from plumbing import ArgumentParser, UsageError, check_name, check_number, run_script, write_atomic

# ------------------------------------------------------------------------------------------------------------------
# What a toy target encoder's patch tokens carry (`python toy.py encoders`)
# ------------------------------------------------------------------------------------------------------------------

def ridge_fit(x_train, y_train, lam=1e-3):
    """A ridge regression y ~ x (with intercept; features standardized with the training split's statistics,
    penalty lam * n): returns predict(x) -> y."""
    mu, sd = x_train.mean(0), x_train.std(0)
    sd = torch.where(sd > 1e-6, sd, 1.0)  # a feature constant in training (e.g. a background pixel) is kept as is
    design = lambda x: torch.cat([(x - mu) / sd, torch.ones(len(x), 1)], 1)
    a = design(x_train)
    w = torch.linalg.solve(a.T @ a + lam * len(a) * torch.eye(a.shape[1]), a.T @ y_train)
    return lambda x: design(x) @ w


def r2(pred, y):
    """Coefficient of determination, per column: 1 - SSE / total sum of squares."""
    return 1 - (pred - y).pow(2).sum(0) / (y - y.mean(0)).pow(2).sum(0)


def ridge_r2(x_train, y_train, x_test, y_test, lam=1e-3):
    """Held-out R^2 (a list, per column of y) of ridge_fit on the training split."""
    return r2(ridge_fit(x_train, y_train, lam)(x_test), y_test).tolist()


def _mean_pair_cosine(f, groups):
    """Mean cosine over pairs of distinct rows of f [M, D] in the same group and in different groups."""
    f = F.normalize(f, dim=-1)
    onehot = F.one_hot(groups).float()  # [M, G]
    sums = onehot.T @ f  # [G, D]
    size = onehot.sum(0)
    within_sum = (sums.pow(2).sum(1) - size).sum()  # sum over ordered pairs i != j of one group
    within_pairs = (size * (size - 1)).sum()
    total_sum, total_pairs = f.sum(0).pow(2).sum() - len(f), len(f) * (len(f) - 1)
    return (within_sum / within_pairs).item(), ((total_sum - within_sum) / (total_pairs - within_pairs)).item()


@torch.no_grad()
def encoder_layout(enc, resolution, style=toy_world.TOY_STYLE, num_images=1200, seed=777):
    """What the patch tokens f[n] of a toy target encoder `enc` (encoders.TargetEncoder) carry, on held-out toy
    images of `style`:
      within_class_cosine   mean cos(f_a[n], f_b[n]) over image pairs a != b of one class, same position n
      between_class_cosine  the same for pairs of different classes (the contrast the within-class figure needs)
      coverage_r2           held-out R^2 of a per-patch linear probe f[n] -> the patch's foreground coverage
      offset_r2             the same for the patch's offset from the shape's centre (dx, dy), mean of the two
      label_coverage_r2     R^2 of the best predictor that knows only the class and the position (the mean
                            coverage of that class at that position): what the label alone says about coverage
    Probes: ridge regression on 2/3 of the images, R^2 on the other 1/3. Returns a dict of floats, plus for the
    figure the images, tokens [N, T, D], geometry [N, T, 3] and the probe's coverage for every patch [N, T]."""
    images, labels, geometry = toy_world.toy_images_with_geometry(np.arange(num_images), resolution, seed, style,
                                                        resolution // enc.grid_size)
    geometry = torch.from_numpy(geometry)
    _, tokens = enc(torch.from_numpy(images))
    labels = torch.from_numpy(labels)
    N, T, D = tokens.shape
    position = torch.arange(T).repeat(N)
    groups = labels.repeat_interleave(T) * T + position  # (class, position)
    within, between = [], []
    for n in range(T):  # one position at a time: pairs are formed at the same position only
        w, b = _mean_pair_cosine(tokens[:, n], labels)
        within.append(w)
        between.append(b)
    n_train = N * 2 // 3
    x, y = tokens.reshape(N * T, D), geometry.reshape(N * T, 3)
    cut = n_train * T
    probe = ridge_fit(x[:cut], y[:cut])(x)
    probe_r2 = r2(probe[cut:], y[cut:]).tolist()
    table = torch.zeros(toy_world.TOY_NUM_CLASSES * T).index_add_(0, groups[:cut], y[:cut, 2])
    count = torch.zeros(toy_world.TOY_NUM_CLASSES * T).index_add_(0, groups[:cut], torch.ones(cut))
    label_r2 = r2((table / count.clamp_min(1))[groups[cut:]], y[cut:, 2]).item()
    return {"within_class_cosine": float(np.mean(within)), "between_class_cosine": float(np.mean(between)),
            "coverage_r2": probe_r2[2], "offset_r2": (probe_r2[0] + probe_r2[1]) / 2, "label_coverage_r2": label_r2,
            "tokens": tokens, "labels": labels, "geometry": geometry, "images": images,
            "probe_coverage": probe[:, 2].reshape(N, T)}


def layout_figure(path, results, examples, scale=8):
    """PNG: for a few held-out images (columns), the image, its true patch coverage, then per encoder (rows) the
    per-patch probe's predicted coverage and the first three principal components of its patch tokens as RGB."""
    first = next(iter(results.values()))
    g = int(round(first["tokens"].shape[1] ** 0.5))
    R = first["images"].shape[-1]
    cell = R * scale // 4 * 4
    tiles, names = [], []
    def grid_tile(values):  # [T] or [T, 3] in [0, 1] -> an image of the token grid
        v = np.clip(np.asarray(values, dtype=np.float32), 0, 1).reshape(g, g, -1)
        v = np.repeat(v, 3, -1) if v.shape[-1] == 1 else v
        return Image.fromarray((v * 255).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
    tiles.append([Image.fromarray(first["images"][i].transpose(1, 2, 0)).resize((cell, cell), Image.NEAREST)
                  for i in examples])
    names.append("image")
    tiles.append([grid_tile(first["geometry"][i, :, 2]) for i in examples])
    names.append("coverage")
    for name, r in results.items():
        N, T, D = r["tokens"].shape
        xc = r["tokens"].reshape(N * T, D)
        xc = xc - xc.mean(0)
        _, vecs = torch.linalg.eigh(xc.T @ xc)  # exact and deterministic (pca_lowrank draws random projections)
        v = vecs[:, -3:].flip(1)  # the three largest components, largest first
        v = v * torch.sign(v[v.abs().argmax(0), torch.arange(3)])  # sign: largest loading positive
        pcs = xc @ v
        pcs = ((pcs - pcs.amin(0)) / (pcs.amax(0) - pcs.amin(0)).clamp_min(1e-6)).reshape(N, T, 3)
        tiles.append([grid_tile(r["probe_coverage"][i]) for i in examples])
        names.append(f"{name}: probe")
        tiles.append([grid_tile(pcs[i]) for i in examples])
        names.append(f"{name}: PCA")
    left, pad = 150, 4
    fig = Image.new("RGB", (left + len(examples) * (cell + pad), len(tiles) * (cell + pad)), "white")
    d = ImageDraw.Draw(fig)
    for row, (name, ims) in enumerate(zip(names, tiles)):
        d.text((6, row * (cell + pad) + cell // 2), name, fill="black", anchor="lm")
        for col, im in enumerate(ims):
            fig.paste(im, (left + col * (cell + pad), row * (cell + pad)))
    buf = io.BytesIO()
    fig.save(buf, format="PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, buf.getvalue())


def encoders_main(argv=None):
    p = ArgumentParser(
        prog="toy.py encoders", allow_abbrev=False,
        description="Compare toy target encoders on held-out toy images: within-class cosine of same-position "
                    "patch tokens, per-patch linear probes of foreground coverage and of the offset from the "
                    "shape's centre; writes a table, a JSON file and a figure (probe maps, PCA of patch tokens).")
    p.add_argument("--enc-type", nargs="+", default=list(encoders.TOY_OBJECTIVES.values()))
    p.add_argument("--grid-size", type=int, default=4, help="token grid (4: SiT-T/4 at 16 px, the smoke model)")
    p.add_argument("--toy-style", default=toy_world.TOY_STYLE, choices=list(toy_world.TOY_STYLES),
                   help="the toy set to compare on (the encoders are trained on it)")
    p.add_argument("--num-images", type=int, default=1200)
    p.add_argument("--output-dir", default=None, help="default experiments/toy/STYLE")
    a = p.parse_args(argv)
    check_number("--grid-size", a.grid_size, 1)
    check_number("--num-images", a.num_images, 12)
    a.output_dir = a.output_dir or os.path.join("experiments", "toy", a.toy_style)
    bad = [n for n in a.enc_type if n not in encoders.TOY_OBJECTIVES.values()]
    if bad:
        raise UsageError(f"--enc-type {bad[0]}: the layout comparison is for the toy encoders "
                         f"({', '.join(encoders.TOY_OBJECTIVES.values())})")
    resolution = a.grid_size * encoders.ENCODERS["toy-vit"]["kwargs"]["patch_size"]
    results = {}
    for name in a.enc_type:
        toy_world.ensure_toy_encoder(name, a.grid_size, style=a.toy_style)
        enc = encoders.load_encoders(name, "cpu", resolution=resolution, grid_size=a.grid_size,
                                     toy_style=a.toy_style)[0]
        results[name] = encoder_layout(enc, resolution, a.toy_style, a.num_images)
    keys = ("within_class_cosine", "between_class_cosine", "coverage_r2", "offset_r2", "label_coverage_r2")
    lines = [f"toy style {a.toy_style!r}, {a.num_images} held-out images, {a.grid_size}x{a.grid_size} tokens",
             "", "| encoder | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {n} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for n, r in results.items()]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    os.makedirs(a.output_dir, exist_ok=True)
    write_atomic(os.path.join(a.output_dir, "encoders.md"), text.encode())
    write_atomic(os.path.join(a.output_dir, "encoders.json"), json.dumps(
        {"style": a.toy_style, "num_images": a.num_images, "grid_size": a.grid_size,
         "results": {n: {k: r[k] for k in keys} for n, r in results.items()}}, indent=1).encode())
    labels = next(iter(results.values()))["labels"].numpy()
    examples = [int(i) for c in (1, 5, 8) for i in np.flatnonzero(labels == c)[-3:]]  # held-out part
    layout_figure(os.path.join(a.output_dir, "encoders.png"), results, examples)
    print(f"wrote {os.path.join(a.output_dir, 'encoders.md')}, encoders.json and encoders.png")
    return results


# ------------------------------------------------------------------------------------------------------------------
# Line plots with PIL (no plotting dependency)
# ------------------------------------------------------------------------------------------------------------------

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    span = max(hi - lo, 1e-12)
    raw = span / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(span / s - n))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def plot_lines(path, series, title="", xlabel="", ylabel="", ylim=None, size=(720, 440)):
    """Write a PNG line plot. series: list of dicts {label, x, y[, lo, hi]}: a line with markers and, when lo/hi
    are given, a light band between them (e.g. min..max over seeds). Written atomically (write_atomic)."""
    W, H = size
    left, right, top, bottom = 70, 170, 40, 55
    xs = [v for s in series for v in s["x"]]
    ys = [v for s in series for key in ("y", "lo", "hi") for v in s.get(key, []) if v == v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = ylim or (min(ys), max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img, "RGBA")
    for t in _ticks(y0, y1):
        d.line([(left, py(t)), (W - right, py(t))], fill=(225, 225, 225))
        d.text((left - 8, py(t)), f"{t:g}", fill="black", anchor="rm")
    for t in _ticks(x0, x1, 6):
        d.line([(px(t), H - bottom), (px(t), H - bottom + 5)], fill="black")
        d.text((px(t), H - bottom + 8), f"{t:g}", fill="black", anchor="mt")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text(((left + W - right) / 2, 14), title, fill="black", anchor="mt")
    d.text(((left + W - right) / 2, H - 20), xlabel, fill="black", anchor="mt")
    d.text((8, top - 24), ylabel, fill="black", anchor="la")
    for k, s in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        if s.get("lo") is not None and s.get("hi") is not None:
            band = [(px(x), py(v)) for x, v in zip(s["x"], s["hi"])] + \
                   [(px(x), py(v)) for x, v in reversed(list(zip(s["x"], s["lo"])))]
            d.polygon(band, fill=colour + (45,))
        pts = [(px(x), py(v)) for x, v in zip(s["x"], s["y"])]
        d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 10 + 20 * k
        d.line([(W - right + 12, ly), (W - right + 36, ly)], fill=colour, width=3)
        d.text((W - right + 42, ly), s["label"], fill="black", anchor="lm")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------------------------
# The toy experiment: SiT vs REPA vs REG
# ------------------------------------------------------------------------------------------------------------------

METHODS = ("sit", "repa", "reg")
# Also for the comparison of target encoders: REPA and REG with each toy encoder named, whichever the preset has.
METHOD_FLAGS = {"sit": ["--smoke=sit"], "repa": ["--smoke=repa"], "reg": ["--smoke=reg"],
                **{f"{m}-{obj}": [f"--smoke={m}", "--enc-type", name] for obj, name in encoders.TOY_OBJECTIVES.items()
                   for m in ("repa", "reg")}}


# Target designs of the experiment (--design): train.py flags added to the aligned methods (REPA, REG) on top of
# the smoke preset, whose REPA and REG align to toy-vit's spatially normalized patch tokens ("spatial"); the
# default adds lambda 2 (experiments/toy/pilots.md has the pilots that chose both). "unconditional" applies to SiT
# too.
DESIGNS = {
    "spatial": [],
    "class": ["--target-norm", "none"],  # toy-vit's tokens as they are: ~95 % a class code (the earlier experiment)
    "spatial-lambda2": ["--proj-coeff", "2"],  # the same target, the alignment term weighted 2 instead of 0.5
    "irepa": ["--projector", "conv"],  # iREPA in full: the normalization and the convolutional projector
    "oracle": ["--target-norm", "none", "--enc-type", "toy-oracle"],
    "mae": ["--target-norm", "none", "--enc-type", "toy-vit-mae"],
    "unconditional": ["--cfg-prob", "1", "--target-norm", "none"],
}
DESIGN = "spatial-lambda2"  # the largest gain (docs/toy.md); "spatial" is the smoke preset as it is


def design_flags(design, method):
    if method != "sit":
        return DESIGNS[design]
    return ["--cfg-prob", "1"] if design == "unconditional" else []


def method_label(method):
    """'SiT', 'REPA', 'REG', 'REPA (dense)', ... for tables and plots."""
    base, _, enc = method.partition("-")
    return ("SiT" if base == "sit" else base.upper()) + (f" ({enc})" if enc else "")


def read_curve(exp_dir, key="toy_joint"):
    """[(step, value)] of one metric from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(exp_dir, "metrics.jsonl")) if line.strip()]
    return [(r["step"], r[key]) for r in rows if key in r]


TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def start_training(flags, env=None, name=None):
    """One training run as its own process, `python train.py FLAGS` (what a user would type; memory is freed
    between runs); returns the Popen. With a name, each line it prints is shown as `[name] line` (runs side by
    side would interleave), by a thread that proc.relay holds."""
    if name is None:
        return subprocess.Popen([sys.executable, TRAIN_PY, *flags], env=env)
    proc = subprocess.Popen([sys.executable, TRAIN_PY, *flags], env=dict(env or os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def relay():
        for line in proc.stdout:
            sys.stdout.write(f"[{name}] {line.decode(errors='replace').rstrip()}\n")
            sys.stdout.flush()
    proc.relay = threading.Thread(target=relay, daemon=True)
    proc.relay.start()
    return proc


def run_trainings(runs, jobs=1):
    """Train each (name, flags, done.json path) of `runs`, `jobs` at a time, writing done.json as each finishes.
    With jobs > 1 each run gets OMP_NUM_THREADS = CPUs // jobs (on 2 cores, two one-thread runs train about 1.2x
    the images/s of one two-thread run). A run that fails stops the experiment once the running ones are done;
    its own message is printed above. Bad train.py flags (its exit status 2) end it with that one line and status 2."""
    env = None if jobs == 1 else dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or jobs) // jobs)))
    pending, running, failed = list(runs), [], []
    while (pending and not failed) or running:  # after a failure: no new run, wait for the running ones
        while pending and len(running) < jobs and not failed:
            name, flags, done = pending.pop(0)
            print(f"=== {name}: python train.py {' '.join(flags)}", flush=True)
            running.append((start_training(flags, env, name), flags, done))
        for run in list(running):
            proc, flags, done = run
            if proc.poll() is None:
                continue
            running.remove(run)
            if getattr(proc, "relay", None) is not None:
                proc.relay.join()  # its last lines (the error message of a failed run) before ours
            if proc.returncode == 0:
                write_atomic(done, json.dumps({"flags": flags}, indent=1).encode())
            else:
                failed.append((proc.returncode, f"`python train.py {' '.join(flags)}` exited with status "
                                                f"{proc.returncode}"))
        if running:
            time.sleep(0.5)
    if failed and all(code == 2 for code, _ in failed):
        raise SystemExit(2)  # train.py refused its flags: its own one-line message above says which and why
    if failed:
        failed = [msg for _, msg in failed]
        raise UsageError(f"{'; '.join(failed)} (its message is above); rerun the same command to continue: "
                         f"finished runs are kept")


def prepare_toy_encoders(runs_flags):
    """Train the toy target encoders that these train.py runs need and that are not cached yet, once, before
    they start (runs side by side would each train the same one). The token grid is the smoke preset's
    (SiT-T/4 at 16 px) unless the flags name another --model / --resolution."""
    for flags in runs_flags:
        v = flag_values(flags)
        if v.get("--smoke") == "sit" or v.get("--enc-type", "toy-vit") == "none":
            continue
        grid = int(v.get("--resolution", 16)) // int(str(v.get("--model", "SiT-T/4")).split("/")[-1])
        toy_world.ensure_toy_encoder(str(v.get("--enc-type", "toy-vit")), grid, style=v.get("--toy-style"))


def flag_values(flags):
    """train.py flags as {name: value}: `--name value` and `--name=value`; a bare flag is True."""
    out, name = {}, None
    for f in flags:
        if f.startswith("--"):
            name, _, value = f.partition("=")
            out[name] = value or True
        elif name is not None:
            out[name] = f
    return out


def check_finished_run(done, flags):
    """A finished run is reused only if it was trained with the same train.py flags; another configuration is
    refused, naming the flags that differ (its results would be mixed into this table). Where the folder is
    reached from (--output-dir) is no setting."""
    with open(done) as f:
        old = json.load(f).get("flags")
    if old is None or old == flags:
        return
    a, b = flag_values(old), flag_values(flags)
    try:  # what the finished run resolved a flag it was not given to (its preset's or train.py's default)
        with open(os.path.join(os.path.dirname(done), "args.json")) as f:
            resolved = json.load(f)
    except (OSError, ValueError):
        resolved = {}

    def shown(values, k, who):
        if k in values:
            return f"{values[k]!r} ({who})"
        key = k.lstrip("-").replace("-", "_")
        default = f": {resolved[key]!r}" if who == "finished run" and key in resolved else ""
        return f"not given ({who}; default{default})"
    diff = [f"{k}: {shown(a, k, 'finished run')} vs {shown(b, k, 'now')}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k != "--output-dir"]
    if diff:
        raise UsageError(f"{os.path.dirname(done)} holds a finished run of another configuration ({'; '.join(diff)}); "
                         f"pass the same flags, another --output-dir, or delete that run to retrain it")


def experiment_main(argv=None):
    p = ArgumentParser(
        prog="toy.py experiment", allow_abbrev=False,
        description="Train SiT, REPA and REG on the toy set with the smoke preset (same seed, batch and steps "
                    "for the three), several seeds; write tables and PNG plots of the toy FD and joint accuracy "
                    "against the training step, and the steps each method needs to reach SiT's final values. "
                    "Finished runs are reused, so a killed experiment continues. Other flags go to train.py.")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHOD_FLAGS),
                   help="repa / reg use the smoke preset's target encoder; repa-dense, reg-class, ... name one")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--design", default=DESIGN, choices=list(DESIGNS),
                   help=f"the alignment target's design (default {DESIGN}: toy-vit's patch tokens spatially "
                        f"normalized, as in the smoke preset, and lambda 2); runs go to experiments/toy/STYLE-DESIGN")
    p.add_argument("--eval-images", type=int, default=256, help="EMA samples per evaluation (toy FD and accuracy)")
    p.add_argument("--eval-steps", type=int, default=10, help="Euler steps of the evaluation samples (the smoke "
                   "preset's grids take 25; at 10 a trained toy model scores the same FD and accuracy, at half the "
                   "time: experiments/toy/pilots.md)")
    p.add_argument("--toy-style", default=toy_world.EXPERIMENT_STYLE, choices=list(toy_world.TOY_STYLES),
                   help="the toy set (train.py --toy-style); default the one with sizes the label does not say")
    p.add_argument("--output-dir", default=None, help="one folder per run (default experiments/toy/STYLE-DESIGN, "
                                                      "with any train.py flags appended to the name); metrics, "
                                                      "args, logs and grids are small and meant to be committed")
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time, each with OMP_NUM_THREADS = CPUs / "
                                                         "jobs (2 on a 2-core machine: about 1.2x the throughput)")
    p.add_argument("--tag", default="", help="name the summary files table-TAG.md, curves-TAG.json, "
                                             "joint_accuracy-TAG.png, samples-TAG.png (e.g. for another --methods)")
    p.add_argument("--eval-every", type=int, default=50, help="training steps between evaluations (the smoke "
                                                              "preset's own --sample-every is 200)")
    a, extra = p.parse_known_args(argv)
    if a.jobs < 1:
        raise UsageError(f"--jobs {a.jobs}: give 1 or more trainings to run at a time")
    for seed in a.seeds:
        check_number("--seeds", seed, 0)
    check_number("--eval-every", a.eval_every, 0, what="an integer >= 0 (0 = the preset's --sample-every)")
    check_number("--eval-images", a.eval_images, 2, what="an integer >= 2 (the toy FD needs two samples)")
    check_number("--eval-steps", a.eval_steps, 1)
    if a.tag:
        check_name("--tag", a.tag)
    # Flags for train.py make another configuration than the committed runs': by default its own folder.
    a.output_dir = a.output_dir or os.path.join("experiments", "toy", f"{a.toy_style}-{a.design}" + "".join(
        "-" + re.sub(r"[^A-Za-z0-9.]+", "-", f.lstrip("-")) for f in extra))
    runs, todo = {}, []
    t0 = time.time()
    for seed in a.seeds:  # seed by seed: a cut-short experiment has every method of its first seeds
        for method in a.methods:
            name = f"{method}-seed{seed}"
            exp_dir = os.path.join(a.output_dir, name)
            flags = [*METHOD_FLAGS[method], "--seed", str(seed), "--output-dir", a.output_dir, "--exp-name", name,
                     "--toy-style", a.toy_style, *(["--sample-every", str(a.eval_every)] if a.eval_every else []),
                     *(["--num-sample-images", str(a.eval_images)] if a.eval_images != 64 else []),
                     *(["--sample-steps", str(a.eval_steps)] if a.eval_steps != 25 else []),
                     *design_flags(a.design, method),
                     *extra]
            done = os.path.join(exp_dir, "done.json")
            if os.path.isfile(done):
                check_finished_run(done, flags)
            else:
                todo.append((name, flags, done))
            runs[(method, seed)] = exp_dir
    prepare_toy_encoders([flags for _, flags, _ in todo])
    run_trainings(todo, a.jobs)
    curves = {key: {k: read_curve(exp_dir, k) for k, _, _ in MEASURES} for key, exp_dir in runs.items()}
    print(f"experiment finished in {time.time() - t0:.0f} s", flush=True)
    return summarize(curves, a.methods, a.seeds, a.output_dir, a.tag)


# What the experiment reports: (metrics.jsonl key, name in tables, higher is better). The first is the headline.
MEASURES = (("toy_fd", "toy FD", False), ("toy_joint", "joint accuracy", True))


def reached(value, level, higher):
    return value >= level - 1e-9 if higher else value <= level + 1e-9


def steps_to_level(curve, level, higher=True):
    """First evaluated step whose value reaches `level` (>= it when higher is better, <= it otherwise); None if
    never."""
    return next((s for s, v in curve if reached(v, level, higher)), None)


def evaluated_steps(curves):
    """Every step at which some run was evaluated, in order. curves: {(method, seed): [(step, value)]}."""
    return sorted({s for c in curves.values() for s, _ in c})


def by_seed(curves, method, seeds, steps):
    """[seeds, steps] array of one method's values (nan where a seed has no evaluation at that step)."""
    return np.array([[dict(curves[(method, s)]).get(st, np.nan) for st in steps] for s in seeds])


def summarize(curves, methods, seeds, out_dir, tag=""):
    """Tables (markdown, printed and written), curves and pictures of a finished experiment, in out_dir as
    table.md, curves.json, fd.png, joint_accuracy.png and samples.png (table-TAG.md, ... with a tag).
    curves: {(method, seed): {key: [(step, value)]}} for the keys of MEASURES that the runs logged."""
    def out_file(base, ext):
        return os.path.join(out_dir, f"{base}-{tag}{ext}" if tag else f"{base}{ext}")
    measures = [m for m in MEASURES if all(curves[(me, s)].get(m[0]) for me in methods for s in seeds)]
    text = ""
    for key, name, higher in measures:
        one = {k: c[key] for k, c in curves.items()}
        text += measure_tables(one, methods, seeds, name, higher) + "\n\n"
        steps = evaluated_steps(one)
        series = []
        for m in methods:
            table = by_seed(one, m, seeds, steps)
            table = np.log10(table) if not higher else table  # FD: a log scale (it falls from ~15 to ~0.1)
            series.append({"label": method_label(m), "x": steps, "y": np.nanmean(table, 0).tolist(),
                           "lo": np.nanmin(table, 0).tolist(), "hi": np.nanmax(table, 0).tolist()})
        base = "fd" if key == "toy_fd" else "joint_accuracy"
        plot_lines(out_file(base, ".png"), series, title=f"toy set: {name} of EMA samples (band: min..max over "
                   f"seeds)", xlabel="training step", ylabel=name if higher else f"log10 {name}",
                   ylim=(0, 1) if higher else None)
    print(text, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(out_file("table", ".md"), text.encode())
    write_atomic(out_file("curves", ".json"), json.dumps(
        {f"{m}-seed{s}": curves[(m, s)] for m in methods for s in seeds}).encode())
    steps = evaluated_steps({k: c[measures[0][0]] for k, c in curves.items()}) if measures else []
    shown = [s for s in steps if s % 100 == 0] or steps[::max(1, len(steps) // 4)]  # a few columns, not every step
    samples_figure(out_dir, methods, seeds[0], shown, out_file("samples", ".png"))
    print(f"wrote {out_file('table', '.md')} and the pictures beside it")
    return text


def measure_tables(curves, methods, seeds, name, higher):
    """For one measure: mean ± half the min-max spread over seeds at each evaluated step; then, the papers' way,
    the step at which each method first reaches SiT's final value (the mean over seeds of SiT's LAST evaluation,
    not its best), per seed and on average, the speed-up (SiT's mean steps / the method's) and whether the two
    seed ranges are apart (every seed of the method there before any seed of SiT)."""
    steps = evaluated_steps(curves)
    lines = [f"**{name}** ({'higher' if higher else 'lower'} is better)", "",
             "| method | " + " | ".join(f"{s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for m in methods:
        table = by_seed(curves, m, seeds, steps)
        mean, lo, hi = np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)
        lines.append(f"| {method_label(m)} | " + " | ".join(f"{mu:.3f} ± {(h - l) / 2:.3f}" for mu, l, h in
                                                            zip(mean, lo, hi)) + " |")
    lines.append("")
    lines.append(f"mean ± half the min-max spread over seeds {', '.join(map(str, seeds))}, by training step")
    if "sit" not in methods:
        return "\n".join(lines)
    level = float(np.mean([curves[("sit", s)][-1][1] for s in seeds]))
    last = steps[-1]
    sit_steps = [steps_to_level(curves[("sit", s)], level, higher) for s in seeds]
    sit_mean = np.mean([st or last for st in sit_steps])  # a SiT seed that never gets there counts as `last`
    lines += ["", f"Steps to SiT's final {name} ({level:.3f}, the mean of SiT's last evaluation):", "",
              "| method | per seed | mean | speed-up | seed ranges apart |", "|---|---|---|---|---|"]
    for m in methods:
        per = [steps_to_level(curves[(m, s)], level, higher) for s in seeds]
        cells = ", ".join(str(st) if st is not None else "never" for st in per)
        if None in per:
            lines.append(f"| {method_label(m)} | {cells} | – | – | – |")
            continue
        bound = ">" if None in sit_steps and m != "sit" else ""
        apart = "–" if m == "sit" else ("yes" if max(per) < min(st or last + 1 for st in sit_steps) else "no")
        lines.append(f"| {method_label(m)} | {cells} | {np.mean(per):.0f} | "
                     f"{bound}{sit_mean / np.mean(per):.2f}x | {apart} |")
    if None in sit_steps:
        lines.append("")
        lines.append("'>': some SiT seeds never reach the level; they are counted at the last step, so the "
                     "speed-up is a lower bound")
    return "\n".join(lines)


def samples_figure(out_dir, methods, seed, steps, path):
    """samples.png: the first 8 images of each run's EMA grid (same noise and labels for every method of one seed),
    one row per method, one column per evaluated step, like REPA's Fig. 4. Skipped where a grid is missing."""
    tiles = {}
    for m in methods:
        run = os.path.join(out_dir, f"{m}-seed{seed}")
        for st in steps:
            grid = os.path.join(run, "samples", f"{st:07d}.png")
            if os.path.isfile(grid):
                with open(os.path.join(run, "args.json")) as f:
                    res = int(json.load(f)["resolution"])
                with Image.open(grid) as im:  # the grid's first row: 2 px of padding, the images, 2 px below
                    tiles[(m, st)] = im.convert("RGB").crop((0, 0, min(im.width, 2 + 8 * (res + 2)), res + 4))
    if not tiles:
        return
    tw, th = next(iter(tiles.values())).size
    scale, left, top = 3, 90, 22
    fig = Image.new("RGB", (left + len(steps) * (tw * scale + 8), top + len(methods) * (th * scale + 8)), "white")
    d = ImageDraw.Draw(fig)
    for j, st in enumerate(steps):
        d.text((left + j * (tw * scale + 8) + tw * scale // 2, 6), f"step {st}", fill="black", anchor="mt")
    for i, m in enumerate(methods):
        y = top + i * (th * scale + 8)
        d.text((6, y + th * scale // 2), method_label(m), fill="black", anchor="lm")
        for j, st in enumerate(steps):
            if (m, st) in tiles:
                fig.paste(tiles[(m, st)].resize((tw * scale, th * scale), Image.NEAREST),
                          (left + j * (tw * scale + 8), y))
    buf = io.BytesIO()
    fig.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def main(argv=None):
    """`toy.py experiment ...` or `toy.py encoders ...`; returns 0 for the shell."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"experiment": experiment_main, "encoders": encoders_main}
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    if argv[0] not in commands:
        raise UsageError(f"unknown command {argv[0]!r}: use `python toy.py experiment ...` or `python toy.py "
                         f"encoders ...` (python toy.py --help)")
    commands[argv[0]](argv[1:])
    return 0


HELP = """usage: python toy.py experiment [--methods sit repa reg] [--seeds 0 1 2] [--jobs N] [train.py flags]
       python toy.py encoders [--enc-type toy-vit toy-vit-dense] [--toy-style STYLE]

The offline toy world (docs/toy.md):
  experiment  train SiT, REPA and REG on the toy set with the smoke preset, several seeds; a table and plots
              of joint toy accuracy against the step (python toy.py experiment --help)
  encoders    what the toy target encoders' patch tokens carry (python toy.py encoders --help)"""


if __name__ == "__main__":
    sys.exit(run_script("toy.py", main))
