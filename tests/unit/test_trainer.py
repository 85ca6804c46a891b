"""llara_fast/train/trainer.py pieces that need no run: the stop signals. (Runs themselves, with a
real stop and resume, are tests/e2e/test_runs.py.)"""
import os
import signal

import pytest
import torch

from llara_fast.train.trainer import StopSignals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signals_set_a_flag_and_restore_the_handlers(sig):
    """Inside the block either signal only sets the flag agreed() reports (the e2e test sends
    SIGTERM to a real run); outside, the previous handlers are back."""
    before = signal.getsignal(sig)
    with StopSignals() as stop:
        assert stop.agreed(torch.device("cpu")) == 0
        os.kill(os.getpid(), sig)  # the handler runs in this (main) thread before the next line
        assert stop.signum == sig and stop.agreed(torch.device("cpu")) == sig
    assert signal.getsignal(sig) is before
