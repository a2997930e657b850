"""The study's records on disk: append-only JSON lines that survive an interruption."""

from __future__ import annotations

import json
import os
from typing import Iterable, List


class JsonLines:
    """Append-only JSON lines; a line cut short by an interruption is skipped on reading.

    >>> import tempfile, os
    >>> lines = JsonLines(os.path.join(tempfile.mkdtemp(), "r.jsonl"))
    >>> lines.append([{"a": 1}]); lines.read()
    [{'a': 1}]
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> List[dict]:
        if not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not text:
            return
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
