"""Shared pytest setup: import the flat modules from the repository root, keep tests on CPU and offline, and give
every test the process-wide state it found (threads, default dtype, deterministic flags, TF32 flags, signal
handlers, working directory, environment), so that no test changes another's result."""
import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests never touch the network: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _global_state():
    return {
        "threads": torch.get_num_threads(),
        "dtype": torch.get_default_dtype(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "tf32": (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision),
        "signals": (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)),
        "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},  # pytest's own, per phase
    }


def _restore(state, now):
    """Put back each part of `state` that differs from `now`."""
    if now["threads"] != state["threads"]:
        torch.set_num_threads(state["threads"])
    if now["dtype"] != state["dtype"]:
        torch.set_default_dtype(state["dtype"])
    if now["deterministic"] != state["deterministic"]:
        torch.use_deterministic_algorithms(state["deterministic"][0], warn_only=state["deterministic"][1])
    if now["tf32"] != state["tf32"]:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = state["tf32"]
    if now["signals"] != state["signals"]:
        signal.signal(signal.SIGINT, state["signals"][0])
        signal.signal(signal.SIGTERM, state["signals"][1])
    if now["cwd"] != state["cwd"]:
        os.chdir(state["cwd"])
    for k in now["env"].keys() - state["env"].keys():
        del os.environ[k]
    for k, v in state["env"].items():
        if now["env"].get(k) != v:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def restore_global_state():
    """Whatever a test (or the code it runs in-process, e.g. evaluate.py's set_tf32(False)) changes in the
    process-wide torch / os state is put back after it: test_toy.py once left torch at one thread, and a later
    test's bit-exact comparison failed on last-bit differences."""
    state = _global_state()
    yield
    now = _global_state()
    if now != state:
        _restore(state, now)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and OpenMP threads spinning against other busy processes make
    them several times slower: a module that trains in-process uses this (pytestmark usefixtures) to run
    single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def single_thread():
    """one_thread for a single test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_toy_encoders(tmp_path, monkeypatch):
    """An empty toy-encoder cache under tmp_path and a 3-step toy encoder training (batch 8, 48 images), so that a
    test makes a toy encoder in a second through the real training and caching path."""
    import encoders
    monkeypatch.setenv("REPA_REG_CACHE", str(tmp_path / "cache"))
    for k, v in {"steps": 3, "batch_size": 8, "num_images": 48}.items():
        monkeypatch.setitem(encoders.TOY_TRAIN, k, v)
    return tmp_path / "cache"


@pytest.fixture
def train_fails(capsys):
    """train_fails(*argv): train.py in-process must exit 2 with exactly one line on stderr and no traceback;
    returns that line."""
    import train

    def run(*argv):
        with pytest.raises(SystemExit) as e:
            train.main(list(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("train.py: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err
        return err
    return run
