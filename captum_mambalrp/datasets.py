"""Reading the Emotion data set (``TEXT;LABEL`` lines, header ``text;label_name``)."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

EMOTION_LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def default_emotion_dir() -> Optional[str]:
    """``../shared/data/emotion`` beside the project, or ``$EMOTION_DIR``, if it exists."""
    candidates = [os.environ.get("EMOTION_DIR", "")]
    here = os.path.dirname(os.path.abspath(__file__))
    for up in (os.path.join(here, "..", ".."), os.getcwd(), os.path.join(os.getcwd(), "..")):
        candidates.append(os.path.join(up, "shared", "data", "emotion"))
        candidates.append(os.path.join(up, "..", "shared", "data", "emotion"))
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "train.txt")):
            return os.path.abspath(c)
    return None


def read_emotion(path: str) -> Tuple[List[str], List[int]]:
    """Texts and label indices (into :data:`EMOTION_LABELS`) of one split file."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\n")
            if i == 0 and line.startswith("text;"):
                continue
            if not line:
                continue
            text, label = line.rsplit(";", 1)
            texts.append(text)
            labels.append(EMOTION_LABELS.index(label))
    return texts, labels
