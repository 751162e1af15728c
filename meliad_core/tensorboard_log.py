"""TensorBoard event files for a run, written only when the `tensorboard` package is installed.

Uses tensorboard's own event writer (no TensorFlow needed): scalars under `WORKDIR/tensorboard/<split>`.
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

    def __init__(self, workdir: Path):
        self.root = Path(workdir) / "tensorboard"
        self.writers: dict = {}
        self.enabled = tensorboard_available()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        split = record.get("split", "train")
        if split not in self.writers:
            (self.root / split).mkdir(parents=True, exist_ok=True)
            self.writers[split] = EventFileWriter(str(self.root / split))
        values = [Summary.Value(tag=key, simple_value=float(record[key]))
                  for key in SCALARS if isinstance(record.get(key), (int, float))]
        self.writers[split].add_event(Event(wall_time=time.time(), step=int(record["step"]),
                                            summary=Summary(value=values)))

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}
