"""The record files: they rotate at their size bound and keep a bounded number; a crash mid-line
leaves one torn last line, which reading skips and a restarted writer never appends to; a writer
that falls behind drops records (counted) instead of holding up the caller."""

from __future__ import annotations

import threading
import time

from record_helpers import record_line

from retrieval.routing_record import RecordScan, read_records, record_file_name, record_files
from server.metrics import Metrics
from server.record_files import RecordOptions, RecordWriter


class Line:
    """A record source: the line of a record named ``name``, padded to about ``size`` bytes."""

    def __init__(self, name: str, size: int = 600, gate: threading.Event | None = None) -> None:
        self.name, self.size, self.gate = name, size, gate

    def to_line(self) -> bytes:
        if self.gate is not None:
            self.gate.wait(30)
        return record_line(self.name, self.size)


def _written(directory) -> list[str]:
    return [record.request_id for record in read_records(directory)]


def test_files_rotate_at_their_bound_and_the_oldest_go(tmp_path):
    writer = RecordWriter(RecordOptions(tmp_path, max_bytes=2048, max_files=3))
    writer.start()
    for i in range(40):
        writer.put(Line(f"r{i}", size=600))
    writer.close()
    files = record_files(tmp_path)
    assert [f.name for f in files] == [record_file_name(n) for n in (12, 13, 14)]  # 40 lines, 3 a file
    assert all(1700 < f.stat().st_size <= 2048 for f in files[:-1])
    assert _written(tmp_path) == [f"r{i}" for i in range(33, 40)]  # whole lines only, in order


def test_a_line_larger_than_the_bound_gets_a_file_of_its_own(tmp_path):
    writer = RecordWriter(RecordOptions(tmp_path, max_bytes=1024, max_files=8))
    writer.start()
    for name, size in (("small", 200), ("large", 3000), ("after", 200)):
        writer.put(Line(name, size))
    writer.close()
    assert [f.read_bytes().count(b"\n") for f in record_files(tmp_path)] == [1, 1, 1]
    assert _written(tmp_path) == ["small", "large", "after"]


def test_a_torn_last_line_is_skipped_and_a_restart_starts_a_new_file(tmp_path):
    writer = RecordWriter(RecordOptions(tmp_path))
    writer.start()
    for i in range(3):
        writer.put(Line(f"r{i}"))
    writer.close()
    (last,) = record_files(tmp_path)
    with last.open("ab") as handle:  # what a crash in the middle of a write leaves
        handle.write(record_line("torn", 600)[:300])
    scan = RecordScan()
    assert [r.request_id for r in read_records(tmp_path, scan)] == ["r0", "r1", "r2"]
    assert scan.num_skipped == 1

    again = RecordWriter(RecordOptions(tmp_path))
    again.start()
    again.put(Line("r3"))
    again.close()
    assert [f.name for f in record_files(tmp_path)] == [record_file_name(1), record_file_name(2)]
    assert _written(tmp_path) == ["r0", "r1", "r2", "r3"]


def test_a_writer_that_falls_behind_drops_records_and_never_blocks(tmp_path):
    metrics = Metrics()
    engine = metrics.engine
    writer = RecordWriter(RecordOptions(tmp_path, queue_size=4), engine.record_written, engine.record_dropped)
    writer.start()
    gate = threading.Event()  # the writer thread is stuck on the first record (a slow disk)
    started = time.perf_counter()
    accepted = [writer.put(Line(f"r{i}", gate=gate)) for i in range(50)]
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, "put() waited on the writer"
    assert 4 <= sum(accepted) <= 5 and not any(accepted[6:])  # the queue, and the one being written
    gate.set()
    writer.close()
    assert len(_written(tmp_path)) == sum(accepted)
    exposition = metrics.render().decode()
    assert f"taer_records_written_total {float(sum(accepted))}" in exposition
    assert f'taer_records_dropped_total{{reason="queue_full"}} {float(50 - sum(accepted))}' in exposition
