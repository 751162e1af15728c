"""TensorBoard event files for a run, written only when the `tensorboard` package is installed.

Uses tensorboard's own event writer (no TensorFlow needed): scalars under `WORKDIR/tensorboard/<split>`.

A resumed run starts each split's new event file with a SessionLog START at the first step it will
log again; TensorBoard then drops the events a killed run wrote after its last checkpoint, so the
curves match metrics.jsonl (which the runner truncates the same way).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

SCALARS = ("nats_per_token", "bits_per_token", "bits_per_char", "accuracy", "learning_rate", "tokens_per_second")


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """Writes the scalars of metrics records; a no-op object when tensorboard is missing."""

    def __init__(self, workdir: Path, resume_step: int | None = None):
        self.root = Path(workdir) / "tensorboard"
        self.writers: dict = {}
        self.enabled = tensorboard_available()
        self.resume_step = resume_step  # events after it (from a killed run) are orphaned

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        split = record.get("split", "train")
        if split not in self.writers:
            (self.root / split).mkdir(parents=True, exist_ok=True)
            self.writers[split] = EventFileWriter(str(self.root / split))
            if self.resume_step is not None:  # TensorBoard purges the events at or after this step
                self.writers[split].add_event(Event(wall_time=time.time(), step=self.resume_step + 1,
                                                    session_log=SessionLog(status=SessionLog.START)))
        values = [Summary.Value(tag=key, simple_value=float(record[key]))
                  for key in SCALARS if isinstance(record.get(key), (int, float))]
        self.writers[split].add_event(Event(wall_time=time.time(), step=int(record["step"]),
                                            summary=Summary(value=values)))

    def flush(self) -> None:
        """Writes the buffered events to disk (the runner does it before each checkpoint, so that the
        events up to a checkpoint survive a kill as the metrics rows do)."""
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}
