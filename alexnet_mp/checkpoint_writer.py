"""One checkpoint write at a time on a background thread, so that training goes on meanwhile.

The write handed over must work on its own copy of the state: the training thread changes the
live parameters at the next step. It touches files only, never a collective, which stay on the
training thread. A failed write is kept and raised by the next :meth:`BackgroundWriter.submit`
or :meth:`BackgroundWriter.wait`, on the caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundWriter:
    """Runs one write at a time; the next waits for the one in flight."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """Whether a write was handed over and not yet waited for."""
        return self._thread is not None

    def submit(self, write: Callable[[], None]) -> None:
        """Wait for the write in flight (raising its error), then start ``write``."""
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as exc:  # raised again on the caller's thread
                self._error = exc

        # A daemon: a second Ctrl-C abandons a write stuck on a slow disk instead of the
        # interpreter waiting for it at exit.
        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight has ended; raise its error if it failed."""
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                thread.join()
            except BaseException:  # interrupted: the write is still in flight
                self._thread = thread
                raise
        error, self._error = self._error, None
        if error is not None:
            raise error

    def abandon(self) -> None:
        """Stop waiting for the write in flight: it is left to end or die with the process."""
        self._thread, self._error = None, None
