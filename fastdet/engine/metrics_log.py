"""Metrics log: one record per line (JSON lines) or per row (CSV)."""

from __future__ import annotations

import csv
import json
import math
import os

__all__ = ["MetricsLogger", "json_safe"]


def json_safe(value):
    """``value`` with what strict JSON cannot hold replaced, recursively through dicts, lists and tuples: tensors and
    numpy arrays become (nested) lists of Python numbers, numpy scalars Python numbers, and non-finite floats (NaN,
    +-Inf) become None, i.e. ``null``.

    Python's ``json`` would otherwise write the bare tokens ``NaN`` / ``Infinity``, which are not JSON and which
    strict parsers (JavaScript's ``JSON.parse``, for one) reject. Write the result with ``allow_nan=False`` so that
    anything this misses fails loudly instead of producing such a file."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    elif hasattr(value, "tolist") and hasattr(value, "ndim"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
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
        record = {key: json_safe(value) for key, value in record.items()}  # NaN -> null (JSON), empty cell (CSV)
        if self.format == "jsonl":
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
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
