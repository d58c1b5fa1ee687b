"""What every script shares: the bad-input error, atomic file writes, reading torch files, the progress line, the
torchrun process / device set-up, and the command-line conventions. It imports nothing of ours (the bottom of the
import graph), so any file may use it.

    UsageError        bad input: a script prints it as one line and exits with status 2 (run_script); anything
                      else is a bug and keeps its traceback
    write_atomic      temp file + rename (+ fsync): a killed run never leaves a half file under a final name; a
                      write the file system refuses is a WriteError (DiskFullError) naming the cause
                      (os_error_advice), also where torch's zip writer hides it (os_error_in)
    load_torch_file   the one torch.load (weights only, memory-mapped); strip_prefixes (`module.`, `_orig_mod.`);
                      state_dict_mismatch: missing / unexpected / mis-shaped keys, for strict loading
    Progress          one line with images/s and ETA (fmt_duration: h:mm:ss)
    setup_distributed torchrun or one process; barrier, all_gather; set_tf32, autocast_ctx
    show_defaults, released_spelling, RefusedFlag   --help defaults and the released scripts' flag spellings
    ArgumentParser, check_number, check_name, check_output_file   one-line flag errors, checked before compute
"""
import argparse
import errno
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------

class UsageError(ValueError):
    """Bad input from the user (flags, files, data): printed as one clear message (no traceback) that says what to
    do, before any compute is spent where it can be checked up front. Every script catches it at its top, and
    only it: any other exception is a bug and keeps its traceback."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file the user named does not exist (also a FileNotFoundError, for callers that catch that)."""


class WriteError(UsageError, OSError):
    """Writing a file failed for a reason outside the program (a full disk, a quota, a read-only or vanished
    folder, an I/O error): one line naming the cause and what to do. Files written before are complete and kept.
    Also an OSError with the cause's errno, for callers that catch those (e.g. a cache that is only a speed-up)."""

    def __init__(self, message, errno_=None, cause=None, todo=None):
        super().__init__(message)
        self.errno, self.cause, self.todo = errno_, cause, todo  # the cause and what to do, in words


class DiskFullError(WriteError):
    """No space left (or over quota) while writing: what was written before is complete and kept."""


# errno -> (the cause in words, what to do about it); os_error_advice falls back to the system's words.
OS_ERROR_ADVICE = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some of your quota (or have it raised)"),
    errno.EROFS: ("the file system is read-only", "make it writable again (remount it read-write)"),
    errno.EACCES: ("permission denied", "make the folder writable again (chmod / chown)"),
    errno.EPERM: ("operation not permitted", "make the folder writable again (chmod / chown)"),
    errno.ENOENT: ("the file or its folder vanished (deleted, moved or unmounted while in use)",
                   "restore it (or remount the file system)"),
    errno.ESTALE: ("stale network file handle (the folder was removed or remounted on the server)",
                   "remount the file system"),
    errno.EIO: ("input/output error on the device", "check the disk or network mount"),
}


def os_error_in(e):
    """The OSError behind `e`: e itself, or the first in its __cause__ / __context__ chain (torch's zip writer
    turns a failed write into a RuntimeError "unexpected pos ..." whose context is the OSError); None if none."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def os_error_advice(e, skip_name=()):
    """(cause, what to do) of an OSError in words, e.g. ('no space left on the device', 'free some space').
    An exception re-raised from a DataLoader worker carries no errno, only the worker's traceback as text: its
    last line is the cause."""
    code, name, text = e.errno, e.filename, e.strerror
    if code is None:  # "...\nFileNotFoundError: [Errno 2] No such file or directory: 'x'" from a worker
        text = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        m = re.search(r"\[Errno (\d+)\] [^:]*(?:: '(.*)')?$", text)
        code, name = (int(m.group(1)), m.group(2)) if m else (None, None)
    cause, todo = OS_ERROR_ADVICE.get(code, (text or type(e).__name__, "fix the cause"))
    return (f"{cause}: {name}" if name and name not in skip_name else cause), todo


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write: torch's zip writer calls write() from C++ and
    reports a failure as its own RuntimeError, so that the real cause would otherwise be lost."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------

def write_atomic(path, data, fsync=False):
    """Write `path` via a temp file + os.replace: a killed run never leaves a half file under a final name.

    data: bytes, or a function that writes to the open binary file (torch.save, np.savez: no second copy in
    memory). fsync=True flushes to the disk before the rename (checkpoints). A write the file system refuses
    raises WriteError (DiskFullError for a full disk or quota) naming the cause, also where the writer hid it
    (torch's zip writer); the temp file is removed and files written before stay complete."""
    tmp = f'{path}.{os.getpid()}.tmp'
    f = None
    try:
        with open(tmp, 'wb') as raw:
            f = _RecordingFile(raw)
            if callable(data):
                data(f)
            else:
                f.write(data)
            if fsync:
                raw.flush()
                os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = (os_error_in(e) or (f.error if f is not None else None)) if isinstance(e, Exception) else None
        if cause is None:
            raise
        what, todo = os_error_advice(cause, skip_name=(tmp, path))
        kind = DiskFullError if cause.errno in (errno.ENOSPC, errno.EDQUOT) else WriteError
        raise kind(f'{what} while writing {path}. Every file already written is complete and kept; {todo} and '
                   f'rerun the same command to continue where it stopped.', cause.errno, what, todo) from None


def load_torch_file(path, trust=False, mmap=True):
    """torch.load onto the CPU: the one place checkpoints and weight files are unpickled.

    weights_only unless trust=True (a full pickle can run code: only for files the user trusts), with
    argparse.Namespace allowed, because the released train.py pickles its flags as 'args'. mmap=True maps the file
    instead of reading it (a multi-GB checkpoint on every rank) and falls back to a plain read for the legacy
    non-zip format, which cannot be mapped. Raises what torch.load raises, for the caller to word for its own
    file: pickle.UnpicklingError (refused by weights_only, or not a torch file at all), RuntimeError or EOFError
    (torn or foreign; a TorchScript archive gives a RuntimeError), OSError (unreadable)."""
    def load():
        kwargs = dict(map_location="cpu", weights_only=not trust)
        if mmap:
            try:
                return torch.load(path, mmap=True, **kwargs)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
        return torch.load(path, **kwargs)

    if trust:
        return load()
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load()


def strip_prefixes(state_dict, prefixes=("module.", "_orig_mod.")):
    """State-dict keys without the prefixes that wrappers add (DDP: `module.`, torch.compile: `_orig_mod.`),
    each stripped once, in this order; keys without them pass unchanged."""
    def strip(k):
        for p in prefixes:
            k = k.removeprefix(p)
        return k
    return {strip(k): v for k, v in state_dict.items()}


def state_dict_mismatch(expected, state_dict, optional=()):
    """How `state_dict` differs from `expected` (a state dict, or key -> shape): (missing, unexpected, wrong_shape)
    key lists, missing and wrong_shape in the order of `expected`, unexpected in that of `state_dict`. Keys in
    `optional` may be missing. All three empty: it loads strictly. Callers word the lists for their file."""
    def shape(v):
        return tuple(getattr(v, "shape", v))
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and shape(state_dict[k]) != shape(expected[k])]
    return missing, unexpected, wrong


def show_some(items, limit):
    """The first `limit` items, comma-separated, and how many there are in all when that is more."""
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Progress and time
# ----------------------------------------------------------------------------------------------------------------

def fmt_duration(seconds):
    """h:mm:ss ('?' for an unknown or infinite duration)."""
    if not math.isfinite(seconds):
        return '?'
    s = int(seconds)
    return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


class Progress:
    """One progress line with images/s and ETA (redrawn in place on a terminal, every 30 s in a log).

    world: the number of ranks sharing the work when only rank 0 reports (its pace times the ranks);
    quiet: count but print nothing (the other ranks); stream: sys.stderr (default) or sys.stdout."""

    def __init__(self, total, prefix='', world=1, quiet=False, stream=None):
        self.total, self.prefix, self.n, self.t0, self.last, self.shown = total, prefix, 0, time.time(), 0.0, -1
        self.stream = stream or sys.stderr
        self.world, self.quiet, self.tty = world, quiet, self.stream.isatty()

    def rate(self):
        return self.n * self.world / max(time.time() - self.t0, 1e-9)

    def update(self, n, skipped=None, force=False):
        self.n += n
        now = time.time()
        if self.quiet or (not force and now - self.last < (0.5 if self.tty else 30.0)) or (force and self.shown == self.n):
            return
        self.last, self.shown = now, self.n
        done, rate = min(self.n * self.world, self.total), self.rate()
        eta = fmt_duration((self.total - done) / rate if rate > 0 else float('inf'))
        line = (f'{self.prefix}{done}/{self.total} images ({100 * done / max(self.total, 1):.1f}%)  '
                f'{rate:.3g} images/s  elapsed {fmt_duration(now - self.t0)}  ETA {eta}'
                + (f'  skipped {skipped}' if skipped is not None else ''))
        self.stream.write(('\r' + line + '\033[K') if self.tty else line + '\n')
        self.stream.flush()

    def close(self, skipped=None):
        self.update(0, skipped, force=True)
        if self.tty and not self.quiet:
            self.stream.write('\n')


# ----------------------------------------------------------------------------------------------------------------
# Processes and devices
# ----------------------------------------------------------------------------------------------------------------

def setup_distributed(device_arg, timeout=None, backend=None):
    """Start the process group when launched by torchrun (NCCL on GPU, gloo on CPU, or `backend`); a plain
    `python script.py` runs as one process. device_arg: None / 'auto' (GPU if visible), 'cuda', 'cuda:N' or 'cpu'.
    `timeout`: how long a collective may wait (ranks can finish far apart). Returns (rank, world_size, device)."""
    device_arg = device_arg or "auto"
    if device_arg not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device_arg):
        raise UsageError(f"--device {device_arg!r}: use auto, cpu, cuda or cuda:N")
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device_arg} but no CUDA device is visible; use --device cpu")
    n_gpus = torch.cuda.device_count() if use_cuda else 0
    index = int(device_arg.split(":")[1]) if ":" in device_arg else None
    if index is not None and index >= n_gpus:
        raise UsageError(f"--device {device_arg}: only {n_gpus} CUDA device(s) visible (cuda:0..cuda:{n_gpus - 1}); "
                         "check CUDA_VISIBLE_DEVICES")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if index is not None and world_size > 1:
            raise UsageError(f"--device {device_arg} under torchrun: each rank takes cuda:LOCAL_RANK; pass --device "
                             "cuda (or choose GPUs with CUDA_VISIBLE_DEVICES)")
        if use_cuda:
            if local_rank >= n_gpus:
                raise UsageError(f"torchrun started local rank {local_rank} but only {n_gpus} GPU(s) are visible: "
                                 f"use --nproc_per_node={n_gpus} (NCCL needs one GPU per rank)")
            local_rank = index if index is not None else local_rank
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=timeout)
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return rank, world_size, device
    if use_cuda:
        torch.cuda.set_device(index or 0)
        return 0, 1, torch.device("cuda", index or 0)
    return 0, 1, torch.device("cpu")


def barrier(device=None):
    """Wait for every rank (a no-op without a process group); NCCL is told which GPU this rank uses."""
    if dist.is_available() and dist.is_initialized():
        if device is not None and device.type == "cuda" and dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def all_gather(obj, world_size):
    """List of `obj` from every rank (a one-element list without a process group)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def set_tf32(enabled):
    """TF32 tensor cores for fp32 matmuls and convolutions (cuBLAS / cuDNN), or full IEEE fp32. Only the new
    fp32_precision API is used: torch refuses a mix of it and the legacy allow_tf32 flags in one process."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def autocast_ctx(device, mixed_precision):
    """The autocast used for the model and the target encoder alike (a no-op for --mixed-precision no)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse without the usage dump on bad input: one line `prog: error: ...` that names the flag, and exit
    status 2 (--help still prints every flag)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_number(flag, value, low=None, high=None, above=False, what=None):
    """A finite number in [low, high] (above=True: > low); else a UsageError naming the flag. None passes."""
    if value is None:
        return value
    bad = (not math.isfinite(value) or (low is not None and (value <= low if above else value < low))
           or (high is not None and value > high))
    if bad:
        if what is None:
            what = ("a number" if isinstance(value, float) else "an integer") + (
                f" in [{low}, {high}]" if low is not None and high is not None else
                f" > {low}" if above else f" >= {low}" if low is not None else f" <= {high}" if high is not None
                else "")
        raise UsageError(f"{flag} must be {what}, got {value}")
    return value


def check_name(flag, name):
    """A single file or folder name (no separators, not '.' or '..', not empty): what a flag that names
    something inside another folder takes, so that the result stays inside it."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or (os.altsep and os.altsep in name)
            or "\0" in name or name != name.strip()):
        raise UsageError(f"{flag} {name!r} must be one plain name (no / or \\, not '.' or '..', no surrounding "
                         f"spaces): it names a folder or file inside the output folder")
    return name


def check_output_file(flag, path, suffixes):
    """A file this run will write: not an existing folder, its folder not a file, a name ending in one of
    `suffixes` (what is written is in that format). Checked before any compute."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; pass a file name ending in {' or '.join(suffixes)}")
    if not path.lower().endswith(tuple(suffixes)) or os.path.basename(path) in suffixes:
        raise UsageError(f"{flag} {path}: the file is written as {suffixes[0]}; give a name ending in "
                         f"{' or '.join(suffixes)}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    return path


def show_defaults(parser):
    """Append '(default: X)' to every flag's --help whose default means something (flags whose default is None say
    in their own help what it resolves to). Unlike ArgumentDefaultsHelpFormatter it also covers flags without help."""
    for a in parser._actions:
        unset = a.default is None or a.default is False or a.default is argparse.SUPPRESS  # 0 is a default to show
        if not unset and "%(default)" not in (a.help or ""):
            a.help = (a.help + " " if a.help else "") + "(default: %(default)s)"
    return parser


def released_spelling(argv):
    """Accept the released scripts' underscore spellings (`--exp_name`, `--guidance_high`, `--local_rank`): every
    `--a_b[=v]` option name becomes `--a-b[=v]`. Values are left alone; the parsers never prefix-match
    (allow_abbrev=False), so `--cls=768` cannot silently become `--cls-cfg-scale 768`."""
    def fix(arg):
        if not arg.startswith("--"):
            return arg
        name, eq, value = arg.partition("=")
        return name.replace("_", "-") + eq + value
    return [fix(a) for a in argv]


class RefusedFlag(argparse.Action):
    """A flag of the released scripts that we do not take: parsing stops with a message naming our equivalent
    (given as `help`), before anything is loaded or written."""

    def __init__(self, option_strings, dest, help, **kwargs):
        self.reason = help
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS, metavar="X",
                         help=f"released flag, refused: {help}")

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} (released code) is not supported here: {self.reason}")


def run_script(prog, main, argv=None, interrupted=None, also=()):
    """The top of a script: returns its exit status. Bad input (UsageError, and the exception types in `also`) is
    one line `prog: error: ...` on stderr and status 2; Ctrl-C is the line `prog: {interrupted}` and status 130
    when `interrupted` is given. Any other exception is a bug: it propagates with its traceback."""
    try:
        status = main(argv)
    except (UsageError, *also) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"{prog}: {interrupted}", file=sys.stderr, flush=True)
        return 130
    return status if isinstance(status, int) else 0
