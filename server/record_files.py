"""Rotating record files, written by a background thread from a bounded queue.

The engine thread hands a record over with :meth:`RecordWriter.put`, which never waits: when the
queue is full the record is dropped and counted. The writer thread turns each record into its line
(JSON encoding, hashing: off the engine thread) and appends it to the current file with one
``write`` of the whole line; a crash can leave at most the last line torn, and the reader skips it
(:func:`retrieval.routing_record.read_records`). A file is closed before a line would take it past
``max_bytes`` (a line larger than that gets a file of its own); a new file takes the next number,
and past ``max_files`` the oldest are deleted. A server that starts again never appends to a file
it did not open: it continues with the next number.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from expert_store.errors import TaerError
from retrieval.routing_record import FILE_PATTERN, record_file_name, record_files

logger = logging.getLogger(__name__)

_STOP = object()


class LineSource(Protocol):
    def to_line(self) -> bytes:
        """The record's line, ending in a newline."""
        ...


@dataclass(frozen=True, slots=True)
class RecordOptions:
    """Where and how much `taer serve --record` writes. ``with_text``: store the prompt and the
    retrieval text, not only their SHA-256."""

    directory: Path
    max_bytes: int = 64 * 2**20
    max_files: int = 8
    queue_size: int = 1024
    with_text: bool = False

    def __post_init__(self) -> None:
        if self.max_bytes < 1024:
            raise TaerError(f"--record-max-bytes must be at least 1024, got {self.max_bytes}")
        if self.max_files < 1:
            raise TaerError(f"--record-max-files must be at least 1, got {self.max_files}")
        if self.queue_size < 1:
            raise TaerError(f"the record queue must hold at least 1 record, got {self.queue_size}")


class RecordWriter:
    """See the module docstring. ``on_written()`` and ``on_dropped(reason)`` are called for each
    record (``reason``: ``queue_full`` or ``write_error``)."""

    def __init__(
        self,
        options: RecordOptions,
        on_written: Callable[[], None] = lambda: None,
        on_dropped: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.options = options
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._queue: queue.Queue = queue.Queue(maxsize=options.queue_size)
        self._thread = threading.Thread(target=self._run, name="taer-recorder", daemon=True)
        self._fd: int | None = None
        self._size = 0
        self._number = 0
        self._failing = False

    def start(self) -> None:
        """Create the directory (an error here stops the server from starting) and the thread."""
        directory = self.options.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TaerError(f"cannot create the record directory {directory}: {error}") from None
        if not os.access(directory, os.W_OK):
            raise TaerError(f"the record directory {directory} is not writable")
        existing = record_files(directory)
        self._number = int(FILE_PATTERN.fullmatch(existing[-1].name).group(1)) if existing else 0
        self._thread.start()

    def put(self, record: LineSource) -> bool:
        """Queue ``record`` for writing; never waits. False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._on_dropped("queue_full")
            return False
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread and close the file."""
        if not self._thread.is_alive():
            return
        self._queue.put(_STOP)  # waits for room: the thread is draining the queue
        self._thread.join(timeout)

    @property
    def current_file(self) -> Path | None:
        return self.options.directory / record_file_name(self._number) if self._fd is not None else None

    def _run(self) -> None:
        try:
            while (record := self._queue.get()) is not _STOP:
                self._write_record(record)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _write_record(self, record: LineSource) -> None:
        try:
            line = record.to_line()
            if self._fd is None or (self._size and self._size + len(line) > self.options.max_bytes):
                self._rotate()
            _write_all(self._fd, line)
            self._size += len(line)
        except Exception as error:  # a full disk, a bad record: this record is lost, not the server
            if not self._failing:
                logger.error("cannot write a request record to %s: %s", self.options.directory, error)
            self._failing = True
            self._on_dropped("write_error")
            return
        self._failing = False
        self._on_written()

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._number += 1
        path = self.options.directory / record_file_name(self._number)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
        self._size = 0
        for old in record_files(self.options.directory)[: -self.options.max_files]:
            old.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    """One ``write`` for the whole line (a regular file takes it whole); the loop only guards
    against a short write."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
