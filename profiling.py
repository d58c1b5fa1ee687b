"""Where a training step's time goes: --profile. The step's parts are marked with torch.profiler.record_function
(train.train_step); StepProfiler records a few steps after the warm-up (and after any --benchmark timing) and
writes PREFIX.md (a table) and PREFIX.json.

    part of the step       the record_function ranges of PARTS, in step order
    busy ms / step         CUDA: kernel, memcpy and memset time launched inside the part (matched through the launch's
                           correlation id, so backward kernels launched from autograd's own thread count for
                           "backward"); CPU: the self time of the torch ops run inside the part
    host ms / step         wall time the host spent inside the part
    idle                   CUDA: time in the profiled steps with no kernel running; CPU: host time in no torch op
                           (Python, the loop)

Works on CPU and CUDA; nothing here changes the step's numerics.
"""
import bisect
import json
import os
import sys
import tempfile
from collections import defaultdict

import torch

from plumbing import write_atomic

# The parts of one training step, in the order they run (gradient accumulation repeats the first three).
BATCH, FORWARD, BACKWARD, CLIP, OPTIMIZER, EMA, STATS = PARTS = (
    "target encoder + batch", "SiT forward + loss", "backward", "grad clipping", "optimizer step", "EMA",
    "stats to host")
STEP = "training step"  # the range around one whole step
PROFILE_STEPS = 5  # steps profiled after the warm-up (and after the --benchmark steps)
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def part(name):
    """Mark a part of the step for the profiler (a few microseconds when no profiler runs)."""
    return torch.profiler.record_function(name)


class StepProfiler:
    """--profile PREFIX: profiles PROFILE_STEPS steps from step count `first` on; rank 0 then writes PREFIX.md /
    .json and prints the table. tick(step) is called before each step with the number of steps done; finish() after
    the loop."""

    def __init__(self, prefix, first, device, rank=0, steps=PROFILE_STEPS):
        self.prefix, self.first, self.steps, self.device, self.rank = prefix, first, steps, device, rank
        self.prof = self.range = None
        self.result = None

    @property
    def end_step(self):
        return self.first + self.steps

    def tick(self, step):
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None
        if step == self.first and self.rank == 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
        if step == self.end_step:
            self.finish()
        elif self.prof is not None:
            self.range = part(STEP)
            self.range.__enter__()

    def finish(self, done=None):
        """Stop (waiting for the device first, so every kernel is in the trace), analyse, write; returns the
        breakdown (None when no step was profiled)."""
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None
        if self.prof is None:
            return self.result
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            self.prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        self.prof = None
        self.result = breakdown(events, self.device.type)
        self.result["command"] = " ".join(["python", *sys.argv])
        self.result["torch"] = torch.__version__
        if self.device.type == "cuda":
            self.result["device_name"] = torch.cuda.get_device_name(self.device)
        write_profile(self.result, self.prefix)
        print(f"profile of {self.result['steps']} steps: {self.prefix}.md, {self.prefix}.json\n"
              + profile_table(self.result), flush=True)
        return self.result


def breakdown(events, device_type):
    """Per-part busy and host time (ms per step) from a Chrome trace's events (torch.profiler's export); see the
    module docstring for what each column means."""
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in spans
                   if e.get("cat") == "user_annotation" and e["name"] == STEP)
    if not steps:
        raise ValueError(f"no {STEP!r} range in the trace")
    n = len(steps)
    parts = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in spans
                   if e.get("cat") == "user_annotation" and e["name"] in PARTS)
    starts = [p[0] for p in parts]

    def part_at(ts):
        i = bisect.bisect_right(starts, ts) - 1
        return parts[i][2] if i >= 0 and ts <= parts[i][1] else None

    host = defaultdict(float)
    for a, b, name in parts:
        host[name] += b - a
    busy, top = defaultdict(float), defaultdict(lambda: defaultdict(float))
    if device_type == "cuda":
        launch = {e["args"]["correlation"]: float(e["ts"]) for e in spans
                  if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
        device = [e for e in spans if e.get("cat") in DEVICE_CATEGORIES]
        for e in device:
            where = part_at(launch.get(e.get("args", {}).get("correlation"), -1.0))
            busy[where] += float(e["dur"])
            top[where][e["name"]] += float(e["dur"])
        intervals = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in device)
        span = (steps[0][0], max([steps[-1][1]] + [b for _, b in intervals]))
        idle = span[1] - span[0] - union_length(intervals, *span)
        busy_means = "kernel + memcpy + memset time launched in the part (CUDA)"
        idle_means = "no kernel running on the GPU (from the first step's start to the last kernel's end)"
    else:
        ops = [e for e in spans if e.get("cat") == "cpu_op" and steps[0][0] <= float(e["ts"]) <= steps[-1][1]]
        for e, self_us in zip(ops, self_times(ops)):
            where = part_at(float(e["ts"]))
            busy[where] += self_us
            top[where][e["name"]] += self_us
        idle = sum(b - a for a, b in steps) - sum(busy.values())
        busy_means = "self time of the torch ops run in the part (CPU)"
        idle_means = "host time in the steps spent in no torch op (Python, the loop)"
    ms = 1e-3 / n  # trace times are in microseconds
    rows = [{"part": p, "busy_ms_per_step": busy.get(p, 0.0) * ms, "host_ms_per_step": host.get(p, 0.0) * ms,
             "top": [[k, v * ms] for k, v in sorted(top[p].items(), key=lambda kv: -kv[1])[:3]]} for p in PARTS]
    return {"device": device_type, "steps": n, "step_ms": sum(b - a for a, b in steps) * ms, "parts": rows,
            "outside_parts_busy_ms_per_step": busy.get(None, 0.0) * ms, "idle_ms_per_step": idle * ms,
            "busy_means": busy_means, "idle_means": idle_means}


def self_times(ops):
    """Self time of each op (its duration minus that of the ops nested in it, on the same thread), in order."""
    order = sorted(range(len(ops)), key=lambda i: (ops[i].get("tid"), float(ops[i]["ts"]), -float(ops[i]["dur"])))
    own = [float(e["dur"]) for e in ops]
    stack, tid = [], None
    for i in order:
        e = ops[i]
        if e.get("tid") != tid:
            stack, tid = [], e.get("tid")
        ts = float(e["ts"])
        while stack and float(ops[stack[-1]]["ts"]) + float(ops[stack[-1]]["dur"]) <= ts:
            stack.pop()
        if stack:
            own[stack[-1]] -= float(e["dur"])
        stack.append(i)
    return own


def union_length(intervals, lo, hi):
    """Total length of the union of sorted (start, end) intervals, clipped to [lo, hi]."""
    total, end = 0.0, lo
    for a, b in intervals:
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total


def write_profile(result, prefix):
    """PREFIX.json (everything) and PREFIX.md (the table), each written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    write_atomic(prefix + ".json", (json.dumps(result, indent=1) + "\n").encode())
    write_atomic(prefix + ".md", profile_table(result).encode())


def profile_table(r):
    """The breakdown as a markdown table, with the command that measured it."""
    lines = [f"`{r.get('command', '')}` ({r.get('device_name', r['device'])}, torch {r.get('torch', '?')}): "
             f"{r['steps']} profiled steps, {r['step_ms']:.2f} ms per step on the host (under the profiler).",
             "", "busy: " + r["busy_means"] + "; idle: " + r["idle_means"] + ".", "",
             "| part of the step | busy ms / step | host ms / step | largest (ms / step) |", "|---|---|---|---|"]
    for row in r["parts"]:
        top = ", ".join(f"{name[:60]} {v:.2f}" for name, v in row["top"])
        lines.append(f"| {row['part']} | {row['busy_ms_per_step']:.2f} | {row['host_ms_per_step']:.2f} | {top} |")
    lines.append(f"| outside the parts | {r['outside_parts_busy_ms_per_step']:.2f} | | |")
    lines.append(f"| idle | {r['idle_ms_per_step']:.2f} | | |")
    return "\n".join(lines) + "\n"
