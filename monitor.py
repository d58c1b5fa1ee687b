"""What a training run reports and how it stops.

    Logger, Meter       log.txt / metrics.jsonl (and wandb / tensorboard): loss terms, grad norm, images/s/device,
                        MFU (3 x forward FLOPs x images/s / peak), ETA
    save_samples        EMA image grid from fixed noise; on the toy set also its colour / shape / joint accuracy
    StopSignal          SIGTERM / SIGINT: every rank agrees (StepStats carries the flag), checkpoints and exits
    StepStats           a step's loss terms and grad norm, read on the host one step late (no sync per step)
    check_finite        the first non-finite loss stops the run, saving nothing (nan_message says what to do);
                        out_of_memory_message likewise for a CUDA OOM
    BenchmarkTimer      --benchmark: images/s per window of steps after warm-up (median, min-max), MFU, memory
"""
import json
import math
import os
import resource
import signal
import statistics
import time

import torch
import torch.distributed as dist

import encoders
import sample
import toy_world
from checkpoints import latest_checkpoint
from plumbing import UsageError, fmt_duration, write_atomic

# The per-step statistics, in the order they travel through the one all-reduce of a step.
STATS = ("loss", "pred", "repa", "cls", "grad_norm")


# ----------------------------------------------------------------------------------------------------------------
# Logs and metrics
# ----------------------------------------------------------------------------------------------------------------

class Logger:
    """Rank 0 prints and appends to log.txt / metrics.jsonl (and wandb / tensorboard when asked); other ranks
    stay silent."""

    def __init__(self, exp_dir, rank, args, start_step=0):
        self.rank, self.exp_dir, self.writer, self.wandb = rank, exp_dir, None, None
        self.files = None
        if rank != 0 or exp_dir is None:
            return
        os.makedirs(exp_dir, exist_ok=True)
        # Lines of an earlier attempt past the step this run starts from are redone: drop them (no step twice).
        trim_metrics(os.path.join(exp_dir, "metrics.jsonl"), start_step)
        self.files = (open(os.path.join(exp_dir, "log.txt"), "a"), open(os.path.join(exp_dir, "metrics.jsonl"), "a"))
        if args.report_to == "wandb":
            import wandb
            self.wandb = wandb.init(project="repa-reg", name=args.exp_name, config=vars(args), resume="allow")
        elif args.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(exp_dir, "tensorboard"))

    def info(self, msg):
        if self.rank != 0:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.files:
            self.files[0].write(line + "\n")
            self.files[0].flush()

    def metrics(self, step, values):
        if self.rank != 0 or not self.files:
            return
        self.files[1].write(json.dumps({"step": step, **values}) + "\n")
        self.files[1].flush()
        if self.wandb:
            self.wandb.log(values, step=step)
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self):
        for f in self.files or ():
            try:
                f.close()
            except OSError:  # its last flush on a full or read-only disk: the run's own error says so
                pass
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def trim_metrics(path, step):
    """Drop the lines of metrics.jsonl written after `step` (by a run that went on past its last checkpoint),
    so a resumed run's metrics follow on without duplicate steps. Rewritten atomically (write_atomic)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a torn last line from a killed run
    if len(keep) != len(lines):
        write_atomic(path, "".join(keep).encode())


class Meter:
    """Running means of the step STATS between two log lines, and the line itself: loss terms, grad norm,
    images/s/device, MFU (with a known peak) and ETA; the same values go to metrics.jsonl."""

    def __init__(self, log, args, flops, peak, total_steps):
        self.logger, self.args, self.flops, self.peak, self.total_steps = log, args, flops, peak, total_steps
        self.local_images = args.micro_batch * args.grad_accum
        self.sums, self.steps, self.t0 = dict.fromkeys(STATS, 0.0), 0, time.perf_counter()

    def add(self, stats):
        for k, v in stats.items():
            self.sums[k] += v
        self.steps += 1

    def restart_clock(self, now=None):
        self.t0 = now or time.perf_counter()

    def show_first(self, step, stats, now=None):
        """The first step's losses on the console and in log.txt only (metrics.jsonl keeps its --log-every means)."""
        self.logger.info(f"step {step:7d}/{self.total_steps} | loss {stats['loss']:.4f} | first step done in "
                         f"{(now or time.perf_counter()) - self.t0:.1f} s; a line every --log-every "
                         f"{self.args.log_every} steps")

    def log(self, step, epoch, now=None):
        """now: when the last step of the line had run (StepStats.done; its stats are read a step later)."""
        now = now or time.perf_counter()
        dt = now - self.t0
        ips = self.steps * self.local_images / dt
        mean = {k: v / self.steps for k, v in self.sums.items()}
        values = {**mean, "images_per_sec_per_device": ips, "epoch": epoch}
        mfu = model_flops_utilization(self.flops, ips, self.peak)
        if mfu is not None:
            values["mfu"] = mfu
        eta = (self.total_steps - step) * dt / self.steps
        self.logger.info(f"step {step:7d}/{self.total_steps} | loss {mean['loss']:.4f} pred {mean['pred']:.4f} repa "
                      f"{mean['repa']:.4f}" + (f" cls {mean['cls']:.4f}" if self.args.reg else "")
                      + f" | grad {mean['grad_norm']:.3f} | {ips:.1f} img/s/device"
                      + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "") + f" | ETA {fmt_duration(eta)}")
        self.logger.metrics(step, values)
        self.sums, self.steps = dict.fromkeys(STATS, 0.0), 0
        self.restart_clock(now)


# ----------------------------------------------------------------------------------------------------------------
# Sample grids
# ----------------------------------------------------------------------------------------------------------------

def make_monitor(args, rank, device, num_data_classes, bench):
    """Rank 0's fixed sampling noise and labels (own generator) and the VAE for latent data, for the grids of
    save_samples; None when no grids are made."""
    if rank != 0 or bench or args.sample_every <= 0:
        return None
    g = torch.Generator().manual_seed(args.seed)
    n = args.num_sample_images
    noise = (torch.randn(n, args.in_channels, args.input_size, args.input_size, generator=g).to(device),
             torch.randint(0, num_data_classes, (n,), generator=g).to(device),
             torch.randn(n, args.cls_dim, generator=g).to(device) if args.reg else None)
    vae = None
    if not args.pixel_space:
        try:
            vae = encoders.load_vae(args.vae, device)
        except Exception as e:
            raise UsageError(f"cannot load --vae {args.vae} to decode the sample grids ({e}); pass a local "
                             f"--vae path, or --sample-every 0") from None
    return noise, vae


def save_samples(ema, monitor, step, args, ctx, exp_dir, log):
    """samples/<step>.png from the EMA model and the fixed noise; the toy set also logs its colour / shape / joint
    accuracy and writes samples/real.png once: real images of the grid's classes, to compare with."""
    noise, vae = monitor
    path = os.path.join(exp_dir, "samples", f"{step:07d}.png")
    images, labels = sample_grid(ema, noise, args, ctx, vae, path)
    msg = f"saved EMA samples {path}"
    if args.data_dir == "toy":
        style = getattr(args, "toy_style", toy_world.TOY_STYLE)
        fd = toy_world.toy_fd(images, args.resolution, style) if len(images) >= 2 else float("nan")
        if unconditional(args):  # no labels to be right about: the distance only
            log.metrics(step, {"toy_fd": fd})
            msg += f" | toy FD {fd:.3f} (unconditional)"
        else:
            acc = toy_world.toy_accuracy(images, labels)
            log.metrics(step, {"toy_fd": fd, **{f"toy_{k}": v for k, v in acc.items()}})
            msg += (f" | toy FD {fd:.3f}, accuracy: joint {acc['joint']:.3f} (shape {acc['shape']:.3f}, colour "
                    f"{acc['colour']:.3f})")
        real_path = os.path.join(exp_dir, "samples", "real.png")
        if not os.path.exists(real_path):
            real = toy_world.toy_class_examples(labels.cpu(), args.resolution, style=style)
            sample.save_grid(torch.from_numpy(real), real_path, nrow=int(math.ceil(math.sqrt(len(real)))))
    log.info(msg)


def unconditional(args):
    """--cfg-prob 1 drops every label in training: the model is class-unconditional and is sampled with the null
    label, without guidance."""
    return args.cfg_prob >= 1


@torch.no_grad()
def sample_grid(ema, noise, args, ctx, vae, path):
    """EMA image grid from fixed noise and labels (Euler ODE, --sample-cfg-scale); decoded through the VAE for latent
    data. Runs in a forked RNG so that sampling never changes the training random stream. Returns
    (uint8 images, labels)."""
    latents, labels, cls_latents = noise
    cfg_scale = 1.0 if unconditional(args) else args.sample_cfg_scale
    y = torch.full_like(labels, args.num_classes) if unconditional(args) else labels  # the null label
    with torch.random.fork_rng(devices=[latents.device] if latents.device.type == "cuda" else []), ctx:
        z = sample.euler_sampler(ema, latents, y, num_steps=args.sample_steps, path_type=args.path_type,
                                 cfg_scale=cfg_scale, cls_latents=cls_latents,
                                 cls_cfg_scale=cfg_scale if cls_latents is not None else 0)
        x = sample.decode(z, None if args.pixel_space else vae, args.latent_scale)
    images = sample.to_uint8(x).cpu()
    sample.save_grid(images, path, nrow=int(math.ceil(math.sqrt(len(images)))))
    return images, labels.cpu()


# ----------------------------------------------------------------------------------------------------------------
# Stopping: signals, one all-reduce per step, non-finite losses, out of memory
# ----------------------------------------------------------------------------------------------------------------

class StopSignal:
    """SIGTERM / SIGINT (preemption) set `signal` to the signal's name; a second one stops right away.
    restore() puts the previous handlers back."""

    def __init__(self):
        self.signal = None
        self.old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)


class StepStats:
    """One step's STATS on their way to the host, so that reading them never stalls the accelerator: made as soon
    as the step is queued (one small all-reduce: the STATS summed over ranks and the stop flags with them, so that
    all ranks agree to stop; then a non-blocking copy into pinned host memory), and read() once the next step is
    queued. read() waits for this step's kernels only, so the device always has the next step to run.
    (A blocking .cpu() right after the step would leave the device idle while the host queues the next one.)"""

    def __init__(self, stats, stop, step, epoch, world_size, device):
        self.names, self.step, self.epoch, self.world_size = list(stats), step, epoch, world_size
        packed = torch.stack([v.float() for v in stats.values()])
        # new_full launches a fill kernel; torch.tensor(x, device=cuda) would copy from the host and synchronize
        packed = torch.cat([packed, packed.new_full((1,), 1.0 if stop else 0.0)])
        if world_size > 1:
            dist.all_reduce(packed)
        self.ready, self.done = None, None  # done: when the step had run (perf_counter), for the log's images/s
        if device.type == "cuda":
            self.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self.host.copy_(packed, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.done = packed, time.perf_counter()  # a CPU step has run when it returns

    def read(self):
        """({name: float} averaged over ranks, whether any rank was asked to stop)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.done = time.perf_counter()
        values = self.host.double().tolist()
        return {k: v / self.world_size for k, v in zip(self.names, values)}, values[-1] > 0


def check_finite(stats, step, args, exp_dir):
    """Stop at the first non-finite loss term (or grad norm, unless fp16's scaler handles it), saving nothing."""
    names = ["pred", "cls", "repa", "loss"] + (["grad_norm"] if args.mixed_precision != "fp16" else [])
    bad = [n for n in names if not math.isfinite(stats[n])]
    if bad:
        raise FloatingPointError(nan_message(f"{bad[0].replace('_', ' ')} ({stats[bad[0]]})", step, args, exp_dir))


def nan_message(what, step, args, exp_dir):
    """What to do after a non-finite value: continue from the last good checkpoint with a lower learning rate
    (it applies on resume), or leave fp16, whose range overflows first."""
    latest = latest_checkpoint(os.path.join(exp_dir, "checkpoints")) if exp_dir else None
    lower = f"--learning-rate {args.learning_rate / 2:g}"
    where = (f"The latest checkpoint, {latest}, is the last good one: continue from it with a lower learning rate, "
             f"e.g. the same command with {lower}" if latest else
             f"No checkpoint was written yet: rerun with a lower learning rate, e.g. {lower}")
    fp16 = " or with --mixed-precision bf16 (fp16 overflows first)" if args.mixed_precision == "fp16" else ""
    return f"non-finite {what} at step {step}; stopping without saving. {where}{fp16}."


def out_of_memory_message(args, device, exp_dir, step):
    """What to do when a step runs out of GPU memory (nothing is saved: the last checkpoint stays the latest)."""
    total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if device.type == "cuda" else None
    half = max(args.micro_batch // 2, 1)
    where = os.path.join(exp_dir, "checkpoints") if exp_dir else None
    return (f"CUDA out of memory in step {step + 1} with a per-device micro-batch of {args.micro_batch} on {device}"
            + (f" ({total:.0f} GiB)" if total else "") + f". Lower it with --micro-batch-size {half} (same global "
            f"batch through gradient accumulation)" + ("" if args.grad_checkpointing else " or add --grad-checkpointing")
            + (f"; nothing was saved, resume from the latest checkpoint in {where} with --resume auto" if where else "")
            + ". `--benchmark 5 --batch-size B` tells quickly whether a batch B fits.")


# ----------------------------------------------------------------------------------------------------------------
# --benchmark timing and MFU
# ----------------------------------------------------------------------------------------------------------------

# --benchmark: steps before the clock starts (compilation, autotuning, the allocator, CUDA graph recording), and
# timed steps per window. One run's windows spread as much as two runs on two machines of the same kind can differ,
# so the report gives the median window with the min-max, and --benchmark defaults to 5 windows.
BENCHMARK_WARMUP = 5
BENCHMARK_WINDOW = 10
BENCHMARK_DEFAULT = 50


class BenchmarkTimer:
    """--benchmark N: after BENCHMARK_WARMUP steps, times N steps in windows of BENCHMARK_WINDOW (the last window
    takes the remainder), synchronizing the device only at window edges; reports images/s/device (median window,
    min-max), MFU and peak memory. A no-op without --benchmark."""

    def __init__(self, args, start_step, device):
        self.args, self.device, self.timed = args, device, args.benchmark
        self.first = start_step + BENCHMARK_WARMUP  # the step count at which the clock starts
        window = min(BENCHMARK_WINDOW, self.timed) if self.timed > 0 else 1
        self.edges = [i * window for i in range(self.timed // window)] + [self.timed]  # in timed steps
        self.marks, self.peak_memory = {}, None

    @property
    def end_step(self):
        """The step count after the last timed step."""
        return self.first + self.timed

    def tick(self, step):
        """Called before each step with the number of steps done: a window edge reads the clock."""
        k = step - self.first
        if self.timed <= 0 or k not in self.edges or k in self.marks:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks[k] = time.perf_counter()
        if k == 0 and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if k == self.timed:
            self.peak_memory = peak_memory_gib(self.device)

    def report(self, step, world_size, flops, peak, peak_desc, rank):
        args = self.args
        self.tick(min(step, self.end_step))
        if len(self.marks) < len(self.edges):
            raise UsageError(f"--benchmark {args.benchmark}: the run ended after {step} steps, before the "
                             f"{BENCHMARK_WARMUP} warm-up and {self.timed} timed steps (check --max-train-steps)")
        images = args.micro_batch * args.grad_accum
        rates = [(b - a) * images / (self.marks[b] - self.marks[a]) for a, b in zip(self.edges, self.edges[1:])]
        ips = statistics.median(rates)
        mfu = model_flops_utilization(flops, ips, peak)
        result = {"model": args.model, "method": args.method, "mixed_precision": args.mixed_precision,
                  "compile": bool(getattr(args, "compile", False)), "compile_mode": getattr(args, "compile_mode", None),
                  "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "world_size": world_size,
                  "images_per_sec_per_device": ips, "images_per_sec_min": min(rates),
                  "images_per_sec_max": max(rates), "window_images_per_sec": rates, "mfu": mfu,
                  "mfu_min": model_flops_utilization(flops, min(rates), peak),
                  "mfu_max": model_flops_utilization(flops, max(rates), peak), "peak": peak_desc,
                  "peak_memory_gib": self.peak_memory, "forward_gflops_per_image": flops / 1e9,
                  "timed_steps": self.timed, "warmup_steps": BENCHMARK_WARMUP, "windows": len(rates),
                  "torch": torch.__version__,
                  "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"}
        if rank == 0:
            pct = (lambda m: "n/a" if m is None else f"{100 * m:.1f}%")
            print("benchmark windows (images/s/device): " + " ".join(f"{r:.2f}" for r in rates), flush=True)
            print(f"benchmark: {args.model} {args.method.upper()} {args.mixed_precision}"
                  f"{' compiled (' + str(result['compile_mode']) + ')' if result['compile'] else ''} | "
                  f"{args.micro_batch}/device x accum {args.grad_accum} x {world_size} ranks | {ips:.2f} "
                  f"images/s/device (median of {len(rates)} windows; min {min(rates):.2f}, max {max(rates):.2f}) | "
                  f"MFU {pct(mfu)} ({pct(result['mfu_min'])}-{pct(result['mfu_max'])}; {peak_desc}) | peak memory "
                  f"{self.peak_memory:.2f} GiB ({'GPU allocated' if self.device.type == 'cuda' else 'process RSS'})"
                  f" | {self.timed} timed steps after {BENCHMARK_WARMUP} warm-up", flush=True)
            print("benchmark-json: " + json.dumps(result), flush=True)
        return result


def model_flops_utilization(flops, images_per_sec, peak):
    """MFU = 3 x forward FLOPs (forward + backward) x images/s / peak FLOP/s; None without a known peak."""
    return 3 * flops * images_per_sec / (peak * 1e12) if peak else None


# Peak dense bf16/fp16 tensor-core TFLOPs (vendor data sheets, without sparsity), matched against
# torch.cuda.get_device_name(). First match wins, so the more specific names come first.
PEAK_TFLOPS = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("RTX 4090", 165.0), ("V100", 125.0),
]


def device_peak_tflops(device, override=None):
    """(peak TFLOPs or None, description) used for MFU: --peak-tflops, else the table for known GPUs."""
    if override:
        return override, f"--peak-tflops {override:g}"
    if device.type != "cuda":
        return None, "no peak known for CPU (pass --peak-tflops to get MFU)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops, f"{name}: {tflops:g} TFLOPs dense bf16/fp16"
    return None, f"{name}: peak unknown (pass --peak-tflops to get MFU)"


def peak_memory_gib(device):
    """Peak allocated GPU memory, or this process's peak resident memory on the CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux
