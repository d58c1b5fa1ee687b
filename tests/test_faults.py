"""Faults a long run meets from outside the program: a full disk, a quota, a folder that turns read-only, a file
that vanishes, the process killed at any point of a checkpoint write. Each ends in one line naming the cause and
what to do (exit 2), the last good checkpoint stays intact, and the same command continues afterwards.

Where the platform allows (root: mount a small tmpfs) the failures are real; elsewhere they are injected where the
real error comes from: the file's write() that torch.save's zip writer calls, os.fsync, os.replace, os.remove."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch

import checkpoints
import plumbing
import run_folder
import train

# SiT-T/8 on 16 px toy images, 40 items, batch 8: a checkpoint is about 68 MB (model, EMA, AdamW moments).
TINY = ["--model", "SiT-T/8", "--data-dir", "toy", "--resolution", "16", "--toy-samples", "40", "--batch-size", "8",
        "--enc-type", "tiny-vit", "--projector-dim", "64", "--num-workers", "0", "--device", "cpu",
        "--log-every", "1", "--sample-every", "0", "--mixed-precision", "no", "--checkpointing-steps", "1"]
MB = 2 ** 20


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py




def ckpt_files(exp_dir):
    d = os.path.join(exp_dir, "checkpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------------------------
# Real failures on a small file system (root only)
# ----------------------------------------------------------------------------------------------------------------

def mount_tmpfs(path, size_mb):
    """Mount a tmpfs of size_mb at path; skip the test where that is not permitted."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


def remount(path, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def test_a_really_full_disk_mid_checkpoint_ends_in_one_line_and_the_same_command_continues(tmp_path, capsys, train_fails):
    # Room for one checkpoint (~68 MB) but not two: the second write fills the disk inside torch's zip writer,
    # which reports it as RuntimeError("unexpected pos ...") with the ENOSPC OSError hidden behind it.
    mnt = tmp_path / "small"
    mount_tmpfs(mnt, 100)
    try:
        cmd = [*TINY, "--output-dir", str(mnt), "--exp-name", "run", "--max-train-steps", "3"]
        err = train_fails(*cmd)
        exp_dir = str(mnt / "run")
        first = os.path.join(exp_dir, "checkpoints", "0000001.pt")
        assert "could not write checkpoint" in err and "0000002.pt (no space left on the device)" in err
        assert f"The previous checkpoint {first} is intact: free some space and rerun the same command" in err
        assert ckpt_files(exp_dir) == ["0000001.pt"]  # no temp file left behind
        assert torch.load(first, map_location="cpu", weights_only=True)["steps"] == 1
        remount(mnt, "size=400m")  # space freed: the same command continues from step 1
        assert train.main(cmd)["steps"] == 3
        assert ckpt_files(exp_dir) == ["0000001.pt", "0000002.pt", "0000003.pt"]
        assert "resumed from " + first in open(os.path.join(exp_dir, "log.txt")).read()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_checkpoint_folder_that_really_turns_read_only_names_that_cause(tmp_path, capsys, monkeypatch, train_fails):
    # checkpoints/ on its own tmpfs, remounted read-only after the first checkpoint (a file system with files
    # open for writing, like log.txt, cannot be remounted read-only, so the folder above stays writable).
    exp_dir = tmp_path / "run"
    mnt = exp_dir / "checkpoints"
    mount_tmpfs(mnt, 200)
    try:
        real_save = train.save_training_state

        def save_then_turn_read_only(exp_dir_, step, *a, **k):
            if step == 2:
                remount(mnt, "ro")
            return real_save(exp_dir_, step, *a, **k)
        monkeypatch.setattr(train, "save_training_state", save_then_turn_read_only)
        cmd = [*TINY, "--output-dir", str(tmp_path), "--exp-name", "run", "--max-train-steps", "3"]
        err = train_fails(*cmd)
        assert "0000002.pt (the file system is read-only)" in err and "remount it read-write" in err
        assert "space" not in err  # not the full disk's advice
        monkeypatch.undo()
        remount(mnt, "rw")
        assert ckpt_files(exp_dir) == ["0000001.pt"]
        assert train.main(cmd)["steps"] == 3
        assert ckpt_files(exp_dir) == ["0000001.pt", "0000002.pt", "0000003.pt"]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ----------------------------------------------------------------------------------------------------------------
# Injected where the real error comes from
# ----------------------------------------------------------------------------------------------------------------

class FailingFile(io.FileIO):
    """The temp file's raw writes (os.write underneath) take `budget` bytes, then fail with `code`, as a file
    system does when it is full (ENOSPC), over quota (EDQUOT), turned read-only (EROFS) or failing (EIO)."""

    def __init__(self, path, mode, budget, code):
        super().__init__(path, mode.replace("b", ""))
        self.budget, self.code = budget, code

    def write(self, b):
        if len(b) > self.budget:
            super().write(bytes(b)[:self.budget])
            self.budget = 0
            raise OSError(self.code, os.strerror(self.code))
        self.budget -= len(b)
        return super().write(b)


def fail_temp_writes(monkeypatch, code, budget):
    """Every temp file that write_atomic opens fails after `budget` bytes with errno `code`."""
    def fake_open(path, mode="r", *a, **k):
        if str(path).endswith(".tmp") and "w" in mode:
            return FailingFile(path, mode, budget, code)
        return open(path, mode, *a, **k)
    monkeypatch.setattr(plumbing, "open", fake_open, raising=False)


CAUSES = [(errno.ENOSPC, "no space left on the device", "free some space"),
          (errno.EDQUOT, "disk quota exceeded", "free some of your quota"),
          (errno.EROFS, "the file system is read-only", "remount it read-write"),
          (errno.EACCES, "permission denied", "make the folder writable again"),
          (errno.EIO, "input/output error on the device", "check the disk")]


@pytest.mark.parametrize("budget", [0, 1000, 5 * MB])
@pytest.mark.parametrize("code, cause, todo", CAUSES)
def test_a_write_failing_inside_torch_save_names_its_cause_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                          code, cause, todo, budget):
    # The failure comes from the file's write(), which torch's zip writer calls from C++ (it then raises its own
    # RuntimeError): at the first byte, inside the header, and inside the tensor data.
    ckpt_dir = tmp_path / "checkpoints"
    good = str(ckpt_dir / "0000010.pt")
    checkpoints.save_checkpoint({"steps": 10, "w": torch.arange(5)}, good)
    before = read_bytes(good)
    fail_temp_writes(monkeypatch, code, budget)
    new = str(ckpt_dir / "0000020.pt")
    with pytest.raises(plumbing.UsageError) as e:
        checkpoints.save_checkpoint({"steps": 20, "w": torch.zeros(2 * MB)}, new)
    monkeypatch.undo()
    msg = str(e.value)
    assert msg == (f"could not write checkpoint {new} ({cause}); nothing was written under that name. The previous "
                   f"checkpoint {good} is intact: {msg.split(' is intact: ')[1]}")
    assert msg.endswith(f"and rerun the same command to continue from it.") and todo in msg
    assert "\n" not in msg and "unexpected pos" not in msg
    assert read_bytes(good) == before and sorted(os.listdir(ckpt_dir)) == ["0000010.pt"]


@pytest.mark.parametrize("code, cause, todo", CAUSES[:3])
def test_a_failing_write_mid_run_exits_2_in_one_line_and_the_same_command_continues(tmp_path, capsys, monkeypatch,
                                                                                     code, cause, todo, train_fails):
    cmd = [*TINY, "--output-dir", str(tmp_path), "--exp-name", "run", "--max-train-steps", "3"]
    real_save = train.save_training_state

    def save(exp_dir, step, *a, **k):
        if step == 2:
            fail_temp_writes(monkeypatch, code, 4096)
        return real_save(exp_dir, step, *a, **k)
    monkeypatch.setattr(train, "save_training_state", save)
    err = train_fails(*cmd)
    monkeypatch.undo()
    exp_dir = str(tmp_path / "run")
    assert f"0000002.pt ({cause})" in err and todo in err and "0000001.pt is intact" in err
    assert ckpt_files(exp_dir) == ["0000001.pt"]
    assert train.main(cmd)["steps"] == 3
    assert ckpt_files(exp_dir) == ["0000001.pt", "0000002.pt", "0000003.pt"]


def test_a_folder_turning_read_only_ends_in_its_own_line_not_a_second_traceback_from_the_lock(tmp_path, capsys,
                                                                                              monkeypatch, train_fails):
    # From step 2 on the experiment folder refuses every change: creating the checkpoint's temp file, and the
    # lock's removal when the run ends (what the released lock handling turned into a second traceback).
    cmd = [*TINY, "--output-dir", str(tmp_path), "--exp-name", "run", "--max-train-steps", "3"]
    exp_dir = str(tmp_path / "run")
    real_save, real_remove, real_open = train.save_training_state, os.remove, open
    read_only = []

    def refuse(path):
        if read_only and os.path.abspath(str(path)).startswith(exp_dir):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def fake_open(path, mode="r", *a, **k):
        if "w" in mode or "a" in mode:
            refuse(path)
        return real_open(path, mode, *a, **k)

    def fake_remove(path, *a, **k):
        refuse(path)
        return real_remove(path, *a, **k)

    def save(exp_dir_, step, *a, **k):
        if step >= 2:
            read_only.append(True)
        return real_save(exp_dir_, step, *a, **k)
    monkeypatch.setattr(plumbing, "open", fake_open, raising=False)
    monkeypatch.setattr(os, "remove", fake_remove)
    monkeypatch.setattr(train, "save_training_state", save)
    err = train_fails(*cmd)
    monkeypatch.undo()
    assert "0000002.pt (the file system is read-only)" in err and "remount it read-write" in err
    assert "space" not in err
    assert os.path.exists(os.path.join(exp_dir, "lock"))  # could not be removed; its process is gone:
    assert train.main(cmd)["steps"] == 3                  # the same command takes it over and continues
    assert "took over the lock" in open(os.path.join(exp_dir, "log.txt")).read()


def test_a_log_write_on_a_full_disk_ends_in_one_line(tmp_path, capsys, monkeypatch, train_fails):
    # log.txt / metrics.jsonl are appended to, not written atomically: their write fails first on a full disk.
    cmd = [*TINY, "--output-dir", str(tmp_path), "--exp-name", "run", "--max-train-steps", "3"]
    real_metrics = train.Meter.log

    def meter_log(self, step, *a, **k):
        if step == 2:  # the disk is full from now on: the logger's files fail at their next os.write
            self.logger.files = tuple(io.TextIOWrapper(io.BufferedWriter(FailingFile(f.name, "ab", 0, errno.ENOSPC)))
                                      for f in self.logger.files)
        return real_metrics(self, step, *a, **k)
    monkeypatch.setattr(train.Meter, "log", meter_log)
    err = train_fails(*cmd)
    monkeypatch.undo()
    exp_dir = str(tmp_path / "run")
    assert err == (f"train.py: error: no space left on the device. The latest checkpoint "
                   f"{os.path.join(exp_dir, 'checkpoints', '0000001.pt')} is intact: free some space and rerun the "
                   f"same command to continue from it.\n")
    assert train.main(cmd)["steps"] == 3


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_data_file_vanishing_mid_run_names_the_file(tmp_path, capsys, monkeypatch, workers, train_fails):
    # A dataset in the released layout whose latents file is deleted after the run listed it; with a loader
    # worker the error reaches the main process as text (no errno), from which the cause is read.
    from test_train import _write_released_layout
    data_dir = tmp_path / "data"
    _write_released_layout(data_dir, 32)
    real_resolve = train.resolve_data

    def resolve_then_delete(args, bench):
        out = real_resolve(args, bench)
        os.remove(data_dir / "vae-sd" / "00000" / "img-mean-std-00000001.npy")
        return out
    monkeypatch.setattr(train, "resolve_data", resolve_then_delete)
    err = train_fails("--model", "SiT-T/2", "--data-dir", str(data_dir), "--resolution", "32",
                      "--batch-size", "2", "--enc-type", "none", "--proj-coeff", "0", "--num-workers", workers,
                      "--device", "cpu", "--output-dir", str(tmp_path / "out"), "--max-train-steps", "2",
                      "--sample-every", "0", "--mixed-precision", "no")
    assert "the file or its folder vanished" in err and "img-mean-std-00000001.npy" in err
    assert "No checkpoint was written yet: restore it (or remount the file system) and rerun" in err


# ----------------------------------------------------------------------------------------------------------------
# Killed at any point of a checkpoint write
# ----------------------------------------------------------------------------------------------------------------

def kill_at(point, monkeypatch):
    """SIGKILL this process at `point` of the second checkpoint's write: after part of its bytes, before its fsync,
    before its rename, or right after its rename."""
    state = {"writes": 0}
    real_fsync, real_replace = os.fsync, os.replace

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def fake_open(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        if str(path).endswith(".tmp") and "0000002.pt" in str(path) and point == "mid-write":
            real_write = f.write

            def write(b):
                state["writes"] += 1
                if state["writes"] == 3:
                    real_write(bytes(b)[:len(b) // 2])
                    f.flush()
                    die()
                return real_write(b)
            return type("KilledFile", (), {"write": staticmethod(write), "__getattr__": lambda s, n: getattr(f, n),
                                           "__enter__": lambda s: s, "__exit__": lambda s, *e: f.close()})()
        return f

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if point == "before fsync" and "0000002.pt." in name and name.endswith(".tmp"):
            die()
        return real_fsync(fd)

    def replace(src, dst):
        if str(dst).endswith("0000002.pt") and point == "before rename":
            die()
        real_replace(src, dst)
        if str(dst).endswith("0000002.pt") and point == "after rename":
            die()
    monkeypatch.setattr(plumbing, "open", fake_open, raising=False)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/fd"), reason="needs fork and /proc")
@pytest.mark.parametrize("point", ["mid-write", "before fsync", "before rename", "after rename"])
def test_a_run_killed_at_any_point_of_a_checkpoint_write_continues_from_the_last_good_one(tmp_path, monkeypatch,
                                                                                          point):
    cmd = [*TINY, "--output-dir", str(tmp_path), "--exp-name", "run", "--max-train-steps", "3"]
    exp_dir = str(tmp_path / "run")
    pid = os.fork()
    if pid == 0:  # the child trains and is killed inside the second checkpoint's write
        try:
            kill_at(point, monkeypatch)
            train.main(cmd)
        finally:
            os._exit(3)  # not reached when killed
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    files = ckpt_files(exp_dir)
    done = ["0000001.pt", "0000002.pt"] if point == "after rename" else ["0000001.pt"]
    assert [f for f in files if not f.endswith(".tmp")] == done
    assert all(f.startswith("0000002.pt.") for f in files if f.endswith(".tmp"))  # at most the torn temp file
    latest = checkpoints.latest_checkpoint(os.path.join(exp_dir, "checkpoints"))
    assert torch.load(latest, map_location="cpu", weights_only=True)["steps"] == len(done)
    assert train.main(cmd)["steps"] == 3  # the same command continues from the last good checkpoint
    assert ckpt_files(exp_dir) == ["0000001.pt", "0000002.pt", "0000003.pt"]  # and removed the torn temp file
    log = open(os.path.join(exp_dir, "log.txt")).read()
    assert f"resumed from {latest}" in log and "took over the lock" in log


def test_a_checkpoint_folder_deleted_mid_run_is_made_again_and_said(tmp_path, capsys, monkeypatch):
    # Someone deletes checkpoints/ while the run trains: the next checkpoint still lands (the run's state is only
    # in memory), and the log says the folder had vanished.
    cmd = [*TINY, "--output-dir", str(tmp_path), "--exp-name", "run", "--max-train-steps", "2"]
    real_save = train.save_training_state

    def delete_then_save(exp_dir, step, *a, **k):
        if step == 2:
            shutil.rmtree(os.path.join(exp_dir, "checkpoints"))
        return real_save(exp_dir, step, *a, **k)
    monkeypatch.setattr(train, "save_training_state", delete_then_save)
    assert train.main(cmd)["steps"] == 2
    exp_dir = str(tmp_path / "run")
    assert ckpt_files(exp_dir) == ["0000002.pt"]
    assert f"warning: {os.path.join(exp_dir, 'checkpoints')} vanished during the run" in \
        open(os.path.join(exp_dir, "log.txt")).read()
