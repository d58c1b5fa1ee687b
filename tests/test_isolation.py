"""conftest.py's restore_global_state: a test that changes process-wide state (threads, default dtype, environment,
working directory, signal handlers) does not pass it on to the next test. The two tests run in file order."""
import os
import signal

import torch

BEFORE = {}


def test_a_test_that_changes_global_state_and_does_not_restore_it(tmp_path):
    BEFORE.update(threads=torch.get_num_threads(), cwd=os.getcwd(), sigterm=signal.getsignal(signal.SIGTERM))
    torch.set_num_threads(BEFORE["threads"] + 1)
    torch.set_default_dtype(torch.float64)
    os.environ["REPA_REG_TEST_LEAK"] = "1"
    os.chdir(tmp_path)
    signal.signal(signal.SIGTERM, lambda *a: None)


def test_the_next_test_finds_the_state_as_it_was():
    assert BEFORE, "run with the previous test"
    assert torch.get_num_threads() == BEFORE["threads"] and torch.get_default_dtype() == torch.float32
    assert "REPA_REG_TEST_LEAK" not in os.environ and os.getcwd() == BEFORE["cwd"]
    assert signal.getsignal(signal.SIGTERM) == BEFORE["sigterm"]
