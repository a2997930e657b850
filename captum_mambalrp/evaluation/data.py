"""Where a study's texts come from: an Emotion-format folder or file (``TEXT;LABEL`` lines)."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from ..datasets import default_emotion_dir, read_emotion


def load_split(data: Optional[str] = None, split: str = "test") -> Tuple[List[str], List[int], str]:
    """Texts, label indices and the file read: ``data/<split>.txt`` for a folder, ``data``
    itself for a file, and the shared Emotion data (:func:`default_emotion_dir`) for ``None``."""
    data = data or default_emotion_dir()
    if not data:
        raise FileNotFoundError("no data given and no Emotion data found (../shared/data/emotion or $EMOTION_DIR)")
    path = os.path.join(data, f"{split}.txt") if os.path.isdir(data) else data
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {split} split at {path}")
    texts, labels = read_emotion(path)
    return texts, labels, os.path.abspath(path)
