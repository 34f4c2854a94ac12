"""Signal flags and the save_minutes clock (launch/signals.py), in one process."""
import os
import signal

from launch.signals import StepBoundary, StopSignals, exit_code_for, signal_name


def test_signals_set_a_flag_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as stop:
        assert stop.installed and stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)   # would end the process without the handler
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGUSR1  # the first one is reported
    assert signal.getsignal(signal.SIGUSR1) is before
    assert exit_code_for(signal.SIGTERM) == 143 and exit_code_for(signal.SIGUSR1) == 138
    assert signal_name(signal.SIGTERM) == "SIGTERM"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_save_minutes_is_decided_by_rank_zero_clock_and_restarts_after_a_save():
    import torch
    clock = Clock()
    rank0 = StepBoundary(StopSignals(), save_minutes=2, device=torch.device("cpu"), rank=0, clock=clock)
    rank1 = StepBoundary(StopSignals(), save_minutes=2, device=torch.device("cpu"), rank=1, clock=clock)
    clock.t += 119
    assert not rank0.decide().timed_save
    clock.t += 1
    assert rank0.decide().timed_save and not rank1.decide().timed_save  # (all-reduce MAX shares rank 0's)
    rank0.saved()
    clock.t += 60
    assert not rank0.decide().timed_save
    off = StepBoundary(StopSignals(), save_minutes=0, device=torch.device("cpu"), rank=0, clock=clock)
    clock.t += 10 ** 6
    assert off.decide().timed_save is False and off.decide().stop_signal == 0
