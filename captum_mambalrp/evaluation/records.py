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


class ShardedLines:
    """The records of one kind (``results``, ``examples``, ``layers``) of a study folder: this
    process appends to ``<stem><suffix>.jsonl`` (``suffix`` ``""`` for one process, ``".rank<r>"``
    for a rank of a sharded run), and reading returns the lines of every such file, so one
    process resumes or summarises what any number of ranks wrote.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> ShardedLines(folder, "results", ".rank1").append([{"a": 1}])
    >>> ShardedLines(folder, "results").append([{"a": 0}])
    >>> sorted(r["a"] for r in ShardedLines(folder, "results").read())
    [0, 1]
    """

    def __init__(self, folder: str, stem: str, suffix: str = "") -> None:
        self.folder, self.stem = folder, stem
        self.path = os.path.join(folder, f"{stem}{suffix}.jsonl")
        self._own = JsonLines(self.path)

    def paths(self) -> List[str]:
        """Every file of this kind in the folder: the one-process file first, then the ranks'."""
        if not os.path.isdir(self.folder):
            return []
        ranks = sorted(
            (n for n in os.listdir(self.folder) if n.startswith(f"{self.stem}.rank") and n.endswith(".jsonl")),
            key=lambda n: int(n[len(self.stem) + 5 : -6]) if n[len(self.stem) + 5 : -6].isdigit() else -1,
        )
        single = os.path.join(self.folder, f"{self.stem}.jsonl")
        return ([single] if os.path.exists(single) else []) + [os.path.join(self.folder, n) for n in ranks]

    def read(self) -> List[dict]:
        return [row for p in self.paths() for row in JsonLines(p).read()]

    def append(self, rows: Iterable[dict]) -> None:
        self._own.append(rows)

    def remove(self) -> None:
        """Delete every file of this kind (a study started afresh)."""
        for p in self.paths():
            os.remove(p)


class RunFolder:
    """The output folder of a resumable run (study, bias, long-range): ``config.json`` holds the
    settings the saved records depend on (``identity``); a folder made with other settings is
    refused unless ``overwrite``. Constructing it only reads; :meth:`prepare` writes.

    >>> import tempfile, os
    >>> folder = RunFolder(tempfile.mkdtemp(), {"seed": 0}, "bias study")
    >>> folder.prepare(["records.jsonl"], {"meta": {}}); RunFolder(folder.path, {"seed": 0}, "bias study").fresh
    False
    """

    def __init__(self, path: str, identity: dict, what: str = "run", overwrite: bool = False) -> None:
        self.path = path
        self.identity = json.loads(json.dumps(identity))
        self.config_path = os.path.join(path, "config.json")
        self.fresh = overwrite or not os.path.exists(self.config_path)
        #: the folder's ``config.json`` as found (empty for a fresh run)
        self.saved: dict = {}
        if not self.fresh:
            with open(self.config_path, encoding="utf-8") as f:
                saved = json.load(f)
            self.saved = saved
            if saved.get("identity") != self.identity:
                raise ValueError(
                    f"{path} holds a {what} with other settings ({self.config_path}); "
                    "use another output folder or overwrite=True (--overwrite)"
                )

    def prepare(self, records: Iterable[str], extra: dict) -> None:
        """Create the folder and write ``config.json`` (``identity`` plus ``extra``); a fresh
        run first deletes the ``records`` files (names in the folder) left there, once."""
        os.makedirs(self.path, exist_ok=True)
        if self.fresh:
            for name in records:
                if os.path.exists(os.path.join(self.path, name)):
                    os.remove(os.path.join(self.path, name))
            self.fresh = False
        with open(self.config_path, "w", encoding="utf-8") as f:
            json.dump({"identity": self.identity, **extra}, f, indent=1)
