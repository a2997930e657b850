"""A study folder (``captum-mambalrp compare --out DIR``) as dashboard data: its summary
tables (CSV, or Markdown pipe tables) and its PNG plots as data URIs."""

from __future__ import annotations

import base64
import csv
import os
from typing import Any, Dict, List, Optional

MAX_ROWS = 200
MAX_COLUMNS = 40
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_FILES = 24
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


FIRST = ("reference_table", "summary", "flipping", "scores")


def _rank(name: str) -> tuple:
    """The reference x replacement table, summaries, then flipping curves and scores, then the
    rest, by name (a reference table's per-replacement studies are its sub-folders)."""
    lower = name.lower()
    return (next((i for i, key in enumerate(FIRST) if key in lower), len(FIRST)), lower)


def _cap(rows: List[List[str]]) -> List[List[str]]:
    return [r[:MAX_COLUMNS] for r in rows[: MAX_ROWS + 1]]


def read_csv_table(path: str) -> List[List[str]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return _cap([row for row in csv.reader(f) if row])


def read_markdown_tables(path: str) -> List[List[List[str]]]:
    """The pipe tables of a Markdown file (header row first, separator rows dropped)."""
    tables: List[List[List[str]]] = []
    current: List[List[str]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in list(f) + [""]:
            line = line.strip()
            if line.startswith("|") and line.endswith("|") and len(line) > 1:
                cells = [c.strip() for c in line[1:-1].split("|")]
                if not all(set(c) <= set("-: ") for c in cells):
                    current.append(cells)
            elif current:
                tables.append(_cap(current))
                current = []
    return tables


def png_data_uri(path: str) -> Optional[str]:
    """``data:image/png;base64,...`` for a real PNG file of acceptable size, else None."""
    if os.path.getsize(path) > MAX_IMAGE_BYTES:
        return None
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(PNG_MAGIC):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def load_study(folder: str) -> Dict[str, Any]:
    """Tables and images of a study folder (searched one level deep), capped in size."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"study folder {folder!r} does not exist")
    files = []
    for root, dirs, names in os.walk(folder):
        if root != folder:
            dirs[:] = []  # one level of sub-folders
        files += [os.path.join(root, n) for n in names]
    files.sort(key=lambda p: _rank(os.path.relpath(p, folder)))
    tables: List[Dict[str, Any]] = []
    images: List[Dict[str, str]] = []
    csv_stems = set()
    for path in files:
        name = os.path.relpath(path, folder)
        lower = name.lower()
        if lower.endswith(".png") and len(images) < MAX_FILES:
            uri = png_data_uri(path)
            if uri:
                images.append({"name": name, "src": uri})
        elif lower.endswith(".csv") and "summary" in lower and len(tables) < MAX_FILES:
            tables.append({"name": name, "rows": read_csv_table(path)})
            csv_stems.add(os.path.splitext(lower)[0])
        elif lower.endswith(".md") and os.path.splitext(lower)[0] not in csv_stems and len(tables) < MAX_FILES:
            tables += [{"name": name, "rows": t} for t in read_markdown_tables(path)]
    return {"folder": folder, "tables": tables[:MAX_FILES], "images": images}
