"""Metrics log: one record per line (JSON lines) or per row (CSV)."""

from __future__ import annotations

import csv
import json
import math
import os

__all__ = ["MetricsLogger"]


def _plain(value):
    """JSON/CSV-friendly scalars: tensors and numpy numbers become Python floats/ints; NaN becomes None in JSON."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Append records (flat dicts) to ``<directory>/metrics.jsonl`` or ``metrics.csv``.

    JSON lines keep each record as written. A CSV file has one header for all rows: when a record brings a new key
    the file is rewritten with the widened header (rare: training, epoch and evaluation records are all seen within
    the first epoch), and missing cells stay empty. Both formats are flushed after every record, so a crashed run
    keeps its log."""

    def __init__(self, directory: str, log_format: str = "jsonl") -> None:
        if log_format not in ("jsonl", "csv"):
            raise ValueError(f"log_format must be 'jsonl' or 'csv', got {log_format!r}")
        os.makedirs(directory, exist_ok=True)
        self.format = log_format
        self.path = os.path.join(directory, f"metrics.{log_format}")
        self._columns: list[str] = []
        if log_format == "csv" and os.path.exists(self.path):
            with open(self.path, newline="") as handle:
                header = next(csv.reader(handle), [])
            self._columns = header

    def log(self, record: dict) -> None:
        record = {key: _plain(value) for key, value in record.items()}
        if self.format == "jsonl":
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            return
        new_columns = [key for key in record if key not in self._columns]
        if new_columns:
            rows = []
            if os.path.exists(self.path):
                with open(self.path, newline="") as handle:
                    rows = list(csv.DictReader(handle))
            self._columns = self._columns + new_columns
            with open(self.path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self._columns)
                writer.writeheader()
                writer.writerows(rows)
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self._columns).writerow(record)

    def read(self) -> list[dict]:
        """All records so far (CSV cells come back as strings)."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as handle:
            if self.format == "jsonl":
                return [json.loads(line) for line in handle if line.strip()]
            return list(csv.DictReader(handle))
