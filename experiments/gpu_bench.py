"""One GPU session's training-step comparison (docs/performance.md): the released REG step and each variant of ours,
alternated in rounds in the same run, >= 50 timed steps each, then the per-part profile of each variant of ours.

    python experiments/gpu_bench.py --out OUT                     # on one GPU: SiT-XL/2 + REG, per-GPU batch 32
    python experiments/gpu_bench.py --out /tmp/dry --device cpu --model SiT-B/2 --batch 1 --steps 2 --rounds 1 \
        --variants released,bf16 --released-precision bf16       # CPU dry run of the script itself (minutes)

The released step is timed by the peer script beside the released code (--released, default
../shared/reference/released-reg/bench_released_step.py: MODEL BATCH STEPS fp16 reg, 3 warm-up steps, then STEPS
timed), ours by `train.py --benchmark STEPS` (5 warm-up steps, then STEPS timed in windows of 10; the median window
is its figure) with `--profile` in the first round (5 more steps, not timed). Every run is its own process; the
order within a round is the order of --variants, so drift of the machine spreads over all of them. Results are
written after every run (a killed script keeps what it measured): OUT/gpu_bench.md (the tables for
docs/performance.md, with the command, GPU and torch version), OUT/gpu_bench.json (everything), OUT/profile-*.md /
.json (the per-part breakdowns), OUT/logs/*.txt (each run's output).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = os.path.join(ROOT, "..", "shared", "reference", "released-reg", "bench_released_step.py")
# Our variants: extra train.py flags, and a batch multiplier (per-GPU batch 64 = 2 x the papers' 32).
VARIANTS = {
    "bf16": ([], 1),
    "bf16-compile": (["--compile"], 1),
    "bf16-compile-b64": (["--compile"], 2),
    "bf16-compile-max-autotune-no-cudagraphs": (["--compile", "--compile-mode", "max-autotune-no-cudagraphs"], 1),
    "bf16-compile-max-autotune": (["--compile", "--compile-mode", "max-autotune"], 1),
    "bf16-compile-reduce-overhead": (["--compile", "--compile-mode", "reduce-overhead"], 1),
    "fp16": (["--mixed-precision", "fp16"], 1),
}
DEFAULT_VARIANTS = "released,bf16,bf16-compile,bf16-compile-b64"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("results", "gpu_bench"), help="folder for the results")
    p.add_argument("--model", default="SiT-XL/2", help="SiT size for all runs (a small one for a CPU dry run)")
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch")
    p.add_argument("--steps", type=int, default=50, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=2, help="times each variant runs, alternated")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, in run order: 'released' and any of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="auto", help="train.py --device (auto, cuda, cpu)")
    p.add_argument("--released", default=RELEASED, help="the released step's benchmark script")
    p.add_argument("--released-precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="the released step's precision (fp16: the released runs; fp16 on a CPU crawls, so a dry run "
                        "takes bf16)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip --profile in the first round")
    p.add_argument("--run-timeout", type=float, default=480, help="seconds before one run is given up")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)  # the runs start in the repository root
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v != "released" and v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from released, {', '.join(VARIANTS)}")
    if "released" in args.variants and not os.path.isfile(args.released):
        p.error(f"--released {args.released} does not exist: point it at bench_released_step.py, or drop 'released' "
                f"from --variants")
    return args


def run(cmd, log_path, timeout):
    """Run one benchmark process; its output goes to log_path. Returns (output, seconds, return code or 'timeout')."""
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"), "timeout"
    with open(log_path, "w") as f:
        f.write(" ".join(cmd) + "\n\n" + out)
    return out, time.time() - t0, rc


def our_cmd(args, variant, profile_prefix):
    flags, mult = VARIANTS[variant]
    cmd = [sys.executable, "train.py", "--model", args.model, "--reg", "--batch-size", str(args.batch * mult),
           "--benchmark", str(args.steps), "--device", args.device, *flags]
    return cmd + (["--profile", profile_prefix] if profile_prefix else [])


def measure(args, variant, rnd):
    """One run: {'variant', 'round', 'images_per_sec', ...} (an 'error' entry when it failed)."""
    log = os.path.join(args.out, "logs", f"{variant}-round{rnd}.txt")
    if variant == "released":
        cmd = [sys.executable, args.released, args.model, str(args.batch), str(args.steps), args.released_precision,
               "reg"]
        out, secs, rc = run(cmd, log, args.run_timeout)
        m = re.search(r"([\d.]+) images/s(?:, peak ([\d.]+) GiB)?", out)
        res = {"images_per_sec": float(m.group(1)), "peak_memory_gib": float(m.group(2)) if m.group(2) else None,
               "batch": args.batch, "precision": args.released_precision} if m and rc == 0 else None
    else:
        prefix = os.path.join(args.out, f"profile-{variant}") if args.profile and rnd == 1 else None
        cmd = our_cmd(args, variant, prefix)
        out, secs, rc = run(cmd, log, args.run_timeout)
        lines = [line for line in out.splitlines() if line.startswith("benchmark-json: ")]
        res = None
        if lines and rc == 0:
            b = json.loads(lines[-1][len("benchmark-json: "):])
            res = {"images_per_sec": b["images_per_sec_per_device"], "min": b["images_per_sec_min"],
                   "max": b["images_per_sec_max"], "windows": b["window_images_per_sec"], "mfu": b["mfu"],
                   "peak_memory_gib": b["peak_memory_gib"], "batch": b["micro_batch"],
                   "precision": b["mixed_precision"],
                   "device_name": b["device_name"], "torch": b["torch"], "profile": prefix}
    entry = {"variant": variant, "round": rnd, "command": " ".join(cmd), "seconds": round(secs, 1)}
    if res is None:
        tail = out.strip().splitlines()[-3:]
        entry["error"] = f"exit {rc}: " + " | ".join(tail)
    else:
        entry.update(res)
    return entry


def summary(args, runs, argv):
    """The markdown for docs/performance.md: per variant the median over rounds, the rounds, the windows' range."""
    ok = [r for r in runs if "error" not in r]
    device = next((r["device_name"] for r in ok if "device_name" in r), "?")
    torch_v = next((r["torch"] for r in ok if "torch" in r), "?")
    released = [r["images_per_sec"] for r in ok if r["variant"] == "released"]
    base = statistics.median(released) if released else None
    lines = [f"Command: `python experiments/gpu_bench.py {' '.join(argv)}` on {device}, torch {torch_v}; "
             f"{args.model} + REG, {args.steps} timed steps per run, {args.rounds} round(s), variants alternated in "
             f"the order below.", "",
             "| step | per-GPU batch | images/s (median over rounds) | each round | windows min-max | x released | MFU "
             "| peak memory |", "|---|---|---|---|---|---|---|---|"]
    for v in args.variants:
        rs = [r for r in ok if r["variant"] == v]
        failed = [r for r in runs if r["variant"] == v and "error" in r]
        if not rs:
            lines.append(f"| {v} | | failed: {failed[0]['error'][:120] if failed else 'not run'} | | | | | |")
            continue
        med = statistics.median(r["images_per_sec"] for r in rs)
        each = ", ".join(f"{r['images_per_sec']:.1f}" for r in rs)
        rng = (f"{min(r['min'] for r in rs):.1f}-{max(r['max'] for r in rs):.1f}" if "min" in rs[0] else "-")
        ratio = f"{med / base:.2f}" if base and rs[0]["batch"] == args.batch else "-"
        mfu = statistics.median(r["mfu"] for r in rs) if rs[0].get("mfu") is not None else None
        mem = rs[0]["peak_memory_gib"]
        name = f"released REG step, {args.released_precision}" if v == "released" else f"ours, {v}"
        lines.append(f"| {name} | {rs[0]['batch']} | {med:.1f} | {each} | {rng} | {ratio} | "
                     f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {'-' if mem is None else f'{mem:.1f} GiB'} |")
    for r in ok:
        if r.get("profile") and os.path.exists(r["profile"] + ".md"):
            lines += ["", f"Profile of {r['variant']}:", "", open(r["profile"] + ".md").read().rstrip()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    runs = []
    for rnd in range(1, args.rounds + 1):
        for v in args.variants:
            entry = measure(args, v, rnd)
            runs.append(entry)
            print(json.dumps(entry), flush=True)
            with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
                json.dump({"argv": argv, "runs": runs}, f, indent=1)
            with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
                f.write(summary(args, runs, argv))
    print(open(os.path.join(args.out, "gpu_bench.md")).read(), flush=True)
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
