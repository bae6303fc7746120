"""fmc.signals: the first stop signal raises once; inside signals_deferred it waits for the block's end."""

import os
import signal

import pytest

from fmc.signals import Interrupted, install_signal_handlers, restore_signal_handlers, signals_deferred


@pytest.fixture
def handlers():
    previous = install_signal_handlers()
    yield
    restore_signal_handlers(previous)


def test_a_signal_raises_at_once_outside_a_deferred_block(handlers):
    with pytest.raises(Interrupted) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.value.exit_code == 128 + signal.SIGTERM


def test_a_deferred_signal_raises_when_the_block_ends_not_inside_it(handlers):
    reached_the_end = False
    with pytest.raises(Interrupted) as stop, signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: still the first one's stop
        reached_the_end = True
    assert reached_the_end
    assert stop.value.signum == signal.SIGINT


def test_a_deferred_block_without_a_signal_raises_nothing_and_stops_deferring(handlers):
    with signals_deferred():
        pass
    with pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGINT)


def test_an_error_inside_the_block_is_not_replaced(handlers):
    with pytest.raises(ValueError), signals_deferred():
        raise ValueError("import failed")
    with pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGINT)
