"""Pre-emption. Schedulers stop jobs with SIGTERM (and people with Ctrl-C, SIGINT): the first signal asks the
run to stop after the optimizer step in progress, with a checkpoint, and exit with ``STOPPED_EXIT_CODE``; a
second signal stops it at once (the default action of SIGTERM, KeyboardInterrupt for SIGINT)."""

from __future__ import annotations

import signal
import threading

from tqdm.auto import tqdm

SIGNALS = (signal.SIGTERM, signal.SIGINT)
AT_ONCE = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}


class StopRequests:
    """Within ``with``: remembers the first SIGTERM / SIGINT (``received``) and lets a second one act at once."""

    def __init__(self, say=lambda message: tqdm.write(f"posttrain: {message}")):
        self.say, self.received, self.previous = say, None, {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = {sig: signal.signal(sig, self.handle) for sig in SIGNALS}
        return self

    def handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        for sig, action in AT_ONCE.items():
            signal.signal(sig, action)
        self.say(f"{self.received} received: stopping after this optimizer step with a checkpoint "
                 "(send it again to stop at once)")

    def __exit__(self, *exc) -> None:
        for sig, action in self.previous.items():
            signal.signal(sig, action)
