"""Grand-Challenge entry point for FuseMyCells: fuse every input view (see ``--help``)."""

import sys

from fmc.signals import (
    Interrupted,
    ignore_signals,
    install_signal_handlers,
    report_interrupted,
    signals_deferred,
)


def run() -> int:
    """Stop signals are handled before torch is imported (held until its import is done), and
    ignored once the run is over: a signal at any moment is one line and exit 128 + N, never a
    traceback."""
    install_signal_handlers()
    try:
        try:
            with signals_deferred():
                from fmc.infer import main

            return main()
        finally:
            ignore_signals()  # nothing may print after the run: a late signal is not a traceback in atexit
    except Interrupted as stop:
        return report_interrupted(stop)


if __name__ == "__main__":
    sys.exit(run())
