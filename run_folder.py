"""The experiment folder <output-dir>/<exp-name>/: one configuration and one writer at a time.

A `lock` file (pid, host, heartbeat) keeps a second run out of a folder in use, and is taken over when its run is
gone. The same command again continues from the folder's latest good checkpoint (a requeued job); another
configuration is refused naming the differing settings, before anything in the folder is touched; only the
RUN_SETTINGS (how long and where a run goes, how often it reports, the learning rate) may change on resume.
A run that fails before training leaves no stub folder behind.
"""
import json
import os
import re
import shutil
import socket
import threading
import time

import torch.distributed as dist

from checkpoints import check_resume_compatible, checkpoint_steps, latest_checkpoint, read_checkpoint
from plumbing import UsageError, WriteError, os_error_advice, write_atomic


# ----------------------------------------------------------------------------------------------------------------
# Where a run starts
# ----------------------------------------------------------------------------------------------------------------

# Flags that may differ between two runs of one experiment: how long and where it runs, how often it reports, and
# the learning rate. Every other setting defines the experiment; a folder's checkpoints and logs belong to one.
RUN_SETTINGS = {"learning_rate", "max_train_steps", "epochs", "log_every", "checkpointing_steps", "sample_every",
                "num_sample_images", "sample_steps", "sample_cfg_scale", "vae", "resume", "smoke", "report_to",
                "num_workers", "device", "compile", "grad_checkpointing", "tf32", "micro_batch_size", "grad_accum",
                "micro_batch", "peak_tflops", "output_dir", "enc_path", "benchmark", "compile_mode", "profile"}


def rank0_decides(decide, rank, world_size, share=True):
    """Run `decide()` on rank 0 only and share the outcome: every rank gets the result (None with share=False),
    and a UsageError stops every rank alike (instead of leaving the others waiting in a collective)."""
    result, error = None, None
    if rank == 0:
        try:
            result = decide()
        except UsageError as e:
            error = str(e)
    if world_size > 1:
        box = [(result if share else None, error)]
        dist.broadcast_object_list(box, src=0)
        if rank != 0:
            result, error = box[0]
    if error:
        raise UsageError(error)
    return result


def setting_differences(old, args, ignore):
    """[(name, old value, value now)] for each setting known to both that differs, `ignore` left out."""
    new = vars(args)
    return [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys()) if k not in ignore and old[k] != new[k]]


def config_differences(old, args):
    """['name: old (folder) vs new (now)'] for the settings that define an experiment (all but RUN_SETTINGS)."""
    return [f"{k}: {a!r} (folder) vs {b!r} (now)" for k, a, b in setting_differences(old, args, RUN_SETTINGS)]


def changed_settings(ckpt, args):
    """Log lines naming each flag that differs from the resumed checkpoint's run (they take effect now; the
    settings that define the model were refused before, by check_resume_compatible)."""
    if ckpt is None:
        return []
    return [f"changed since the checkpoint: {k} {a!r} -> {b!r}"
            for k, a, b in setting_differences(ckpt.get("args") or {}, args, {"resume", "smoke"})]


def choose_start(args, exp_dir):
    """Where this run starts (rank 0 decides): (checkpoint path or None, lines for the log).

    - A folder with checkpoints continues from its latest readable one, whether or not --resume auto is given, when
      the configuration is the same apart from RUN_SETTINGS (a resubmitted or requeued job). Another configuration
      is refused, naming the differing settings, before anything in the folder is touched; --resume auto accepts it
      where it does not change the model (check_resume_compatible) and logs the changes.
    - --resume PATH never writes over later checkpoints, nor into a folder holding another run's checkpoints.
    - A fresh start in a folder that holds another configuration's logs (args.json) is refused too."""
    ckpt_dir = os.path.join(exp_dir, "checkpoints")
    found = checkpoint_steps(ckpt_dir)
    if args.resume not in (None, "auto"):
        check_resume_path(args.resume, found, ckpt_dir, exp_dir)
        if not found:
            check_fresh_folder(args, exp_dir)
        return args.resume, []
    if not found:
        check_fresh_folder(args, exp_dir)
        return None, []
    notes = []
    for step in reversed(found):  # the latest good one: a file that does not load is passed over, and said so
        try:
            ckpt = read_checkpoint(found[step])
            break
        except UsageError:
            notes.append(f"warning: skipping {found[step]}: it does not load (truncated or corrupt)")
    else:
        raise UsageError(f"none of the {len(found)} checkpoints in {ckpt_dir} loads (truncated or corrupt files); "
                         f"move them away to start over, or pass a good file with --resume PATH")
    if args.resume is None:
        diffs = config_differences(ckpt.get("args") or {}, args)
        if diffs:
            raise UsageError(f"{exp_dir} holds the checkpoints (up to step {int(ckpt['steps'])}) of another "
                             f"configuration: {'; '.join(diffs)}. Nothing in it was changed. To start fresh, pass "
                             f"another --exp-name (or --output-dir) or delete that folder; to continue it with these "
                             f"settings, add --resume auto.")
        notes.append(f"{exp_dir} holds checkpoints of this configuration: continuing from step {int(ckpt['steps'])} "
                     f"(as --resume auto does; another --exp-name starts a new run)")
    check_resume_compatible(ckpt.get("args") or {}, args, found[step])
    return found[step], notes


def check_resume_path(path, found, ckpt_dir, exp_dir):
    """--resume PATH: a file, and no checkpoint of the folder is written over by continuing from it."""
    if os.path.isdir(path):
        raise UsageError(f"--resume {path} is a folder; pass a checkpoint file (e.g. {path}/checkpoints/<step>.pt) "
                         f"or --resume auto for the latest of this experiment")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {path}: no such checkpoint file (pass a file, or 'auto')")
    if not found:
        return
    inside = os.path.samefile(os.path.dirname(os.path.abspath(path)), ckpt_dir)
    if not inside:
        raise UsageError(f"{exp_dir} already holds the checkpoints of its own run (latest {found[max(found)]}); "
                         f"continuing {path} there would mix two runs. Resume it into a new experiment: add "
                         f"--exp-name NEW_NAME")
    m = re.fullmatch(r"(\d+)\.pt", os.path.basename(path))
    later = [p for s, p in found.items() if m and s > int(m.group(1))]
    if later:
        raise UsageError(f"--resume {path} is older than {len(later)} checkpoint(s) of this experiment (latest "
                         f"{later[-1]}); continuing from it would overwrite them. Use --resume auto for the latest, or "
                         f"branch off into a new experiment: --exp-name NEW_NAME --resume {path}")


def check_fresh_folder(args, exp_dir):
    """A run starting from step 0 may reuse a folder whose args.json (if any) describes the same configuration."""
    try:
        with open(os.path.join(exp_dir, "args.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    diffs = config_differences(old, args) if isinstance(old, dict) else []
    if diffs:
        raise UsageError(f"{exp_dir} holds the logs of another configuration ({'; '.join(diffs)}). Nothing in it was "
                         f"changed. Pass another --exp-name (or --output-dir), or delete that folder to reuse it.")


def run_fault_message(e, exp_dir):
    """One line for an OSError that stopped a run from outside the program (a full disk, a quota, a read-only or
    vanished folder, a data file gone): the cause, the latest checkpoint (intact: checkpoints are written
    atomically) and what to do."""
    what, todo = (e.cause, e.todo) if isinstance(e, WriteError) and e.cause else os_error_advice(e)
    latest = latest_checkpoint(os.path.join(exp_dir, "checkpoints")) if exp_dir else None
    return (f"{what}. " + (f"The latest checkpoint {latest} is intact: {todo} and rerun the same command to "
                           f"continue from it." if latest else f"No checkpoint was written yet: {todo} and rerun "
                                                               f"the same command."))


# ----------------------------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------------------------

LOCK_HEARTBEAT_S = 60  # the lock's mtime is refreshed this often while its run lives
LOCK_STALE_S = 600  # a lock of another host without a heartbeat for this long belongs to a dead run


def folder_notes(folder):
    return [folder.note] if folder is not None and folder.note else []


class ExperimentFolder:
    """<output-dir>/<exp-name>/ as one run's own: a lock file `lock` = {"pid", "host", "started"}, created
    atomically (os.link of a finished temp file, which works on NFS too) and kept fresh by a daemon thread that
    touches it every LOCK_HEARTBEAT_S. A lock is stale, and is taken over, when its process is gone (same host) or
    its heartbeat is older than LOCK_STALE_S (another host: a killed job requeued elsewhere). release() removes the
    lock, and the whole folder when this run created it and failed before training (no stub folders)."""

    def __init__(self, exp_dir):
        self.exp_dir, self.path, self.note, self.started = exp_dir, os.path.join(exp_dir, "lock"), None, False
        self.created = []  # the folders this run made, outermost first
        d = os.path.abspath(exp_dir)
        while not os.path.exists(d):
            self.created.insert(0, d)
            d = os.path.dirname(d)
        try:
            os.makedirs(exp_dir, exist_ok=True)
            self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.me, f)
            try:
                self._acquire(tmp)
            finally:
                os.remove(tmp)
        except OSError as e:
            self._remove_created()
            raise UsageError(f"cannot write the experiment folder {exp_dir} ({type(e).__name__}: {e.strerror or e}); "
                             f"pass a writable --output-dir") from None
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def _acquire(self, tmp):
        for _ in range(3):
            try:
                self._create(tmp)
                return
            except FileExistsError:
                pass
            holder, age = self._read_lock()
            why = self._stale(holder, age)
            if why is None:
                self._remove_created()
                raise UsageError(
                    f"{self.exp_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"started {holder.get('started')}, alive {age:.0f} s ago); two runs in one folder would overwrite "
                    f"each other's checkpoints and logs. Wait for it to end, pass another --exp-name, or, if no run "
                    f"uses this folder, delete {self.path}")
            # Rename, then delete: of two runs taking over at once, only one rename succeeds.
            try:
                os.rename(self.path, f"{self.path}.{os.getpid()}.stale")
                os.remove(f"{self.path}.{os.getpid()}.stale")
            except FileNotFoundError:
                continue
            self.note = f"took over the lock of a run that is gone ({why})"
        raise UsageError(f"could not take the lock {self.path} (other runs keep taking it); try again")

    def _create(self, tmp):
        """Create the lock with its content in one step (FileExistsError if there is one)."""
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: an exclusive create, the content a moment later
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)

    def _read_lock(self):
        try:
            age = time.time() - os.stat(self.path).st_mtime
            with open(self.path) as f:
                holder = json.load(f)
            return (holder if isinstance(holder, dict) else {}), age
        except FileNotFoundError:
            return {}, float("inf")
        except (OSError, ValueError):
            return {}, age

    def _stale(self, holder, age):
        """Why the lock's run is gone, or None while it may be alive."""
        pid = holder.get("pid")
        if holder.get("host") == self.me["host"] and isinstance(pid, int):
            if pid == os.getpid():
                return "an earlier run in this process"
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"pid {pid} on this host has exited"
            except PermissionError:
                pass  # alive, under another user
            return None
        return f"no heartbeat for {age:.0f} s" if age > LOCK_STALE_S else None

    def _heartbeat(self):
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def start(self, args, resumed):
        """Training begins: the folder is kept from now on. args.json describes the checkpoints, so a resumed run
        leaves it as it is (its changed settings are in log.txt and in each checkpoint's args)."""
        self.started = True
        ckpt_dir = os.path.join(self.exp_dir, "checkpoints")
        os.makedirs(ckpt_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir):  # half-written temp files of a killed run (the lock is ours: no writer)
            if name.endswith(".tmp"):
                os.remove(os.path.join(ckpt_dir, name))
        if not resumed or not os.path.exists(os.path.join(self.exp_dir, "args.json")):
            write_atomic(os.path.join(self.exp_dir, "args.json"), json.dumps(vars(args), indent=2).encode())

    def release(self):
        self._stop.set()
        try:
            with open(self.path) as f:
                mine = json.load(f) == self.me
        except (OSError, ValueError):
            mine = False
        if mine:
            try:
                os.remove(self.path)
            except OSError:  # the folder turned read-only or vanished: the run's own message says so; the next
                pass         # run takes over a lock whose process is gone
        if not self.started:
            self._remove_created()

    def _remove_created(self):
        """Remove what this run created: its experiment folder (nobody else writes there while the lock is held),
        then the parents it made, only while they are empty (another run may have started beside it)."""
        if self.created:
            shutil.rmtree(self.exp_dir, ignore_errors=True)
        for d in reversed(self.created[:-1]):
            try:
                os.rmdir(d)
            except OSError:
                break
