"""Where a study's texts come from: any format :func:`captum_mambalrp.datasets.load_texts` reads."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..datasets import EMOTION_LABELS, load_texts


def load_split(
    data: Optional[str] = None, split: str = "test", class_names: Optional[Sequence[str]] = None
) -> Tuple[List[str], Optional[List[int]], str]:
    """Texts, label indices and the source read: ``data/<split>.<ext>`` for a folder, ``data``
    itself for a file, a ``datasets`` id, and the package's Emotion demo sample for ``None``
    (see :func:`captum_mambalrp.datasets.load_texts`). Labels are indices into
    ``class_names`` (default: the Emotion labels); an unknown label raises ``DataError``; unlabelled data gives ``None``."""
    loaded = load_texts(data, split)
    return loaded.texts, loaded.label_ids(class_names or EMOTION_LABELS), loaded.source
