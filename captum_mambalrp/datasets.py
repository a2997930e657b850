"""Reading labelled texts for a study: local files and folders, Hugging Face ``datasets``, and
the demo sample of the Emotion data set shipped with the package.

:func:`load_texts` takes

- nothing: the demo sample :data:`DEMO_DATA` (96 examples of the Emotion test split, 16 per
  class; Saravia et al., *CARER*, EMNLP 2018, distributed for research use);
- a file: ``.txt`` in the Emotion format (``TEXT;LABEL`` lines, an optional header
  ``text;label...``), ``.csv``, ``.tsv``, ``.jsonl`` (one JSON object per line), ``.json`` (a
  list of objects) or ``.parquet`` (needs ``pyarrow``);
- a folder: ``<split>.<ext>`` in it (the first of the extensions above that exists), or a
  data set written by ``datasets``' ``save_to_disk``;
- a Hugging Face ``datasets`` id (``owner/name``, needs ``datasets``): read from the local
  cache when ``HF_HUB_OFFLINE`` is set or the hub cannot be reached.

Columns: the text is ``--text-column`` (default: the first of :data:`TEXT_COLUMNS` present),
the label ``--label-column`` (default: the first of :data:`LABEL_COLUMNS`; none: a study
without labels). Labels are kept as the data has them (names or integers) and mapped to the
model's classes by :meth:`TextData.label_ids`. The library never looks for data outside what
it is given (and its own demo sample).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

EMOTION_LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEMO_DATA = os.path.join(DATA_DIR, "emotion_demo.txt")

EXTENSIONS = (".txt", ".csv", ".tsv", ".jsonl", ".json", ".parquet")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "label_name", "labels", "class", "emotion", "sentiment")

Label = Union[str, int]


class DataError(ValueError):
    """The data cannot be read as labelled texts; the message says why in one line."""


@dataclass
class TextData:
    """Texts, their labels as the data gives them (names or ints; ``None``: unlabelled) and
    where they came from. ``label_names``: the names of integer labels when the data
    declares them (a ``datasets`` ``ClassLabel``)."""

    texts: List[str]
    labels: Optional[List[Label]]
    source: str
    label_names: Optional[List[str]] = None

    def label_ids(self, class_names: Optional[Sequence[str]], n_classes: Optional[int] = None) -> Optional[List[int]]:
        """The labels as the model's class indices.

        Integer labels (and numeric strings) are class indices; names are looked up in
        ``class_names`` (the model's ``config.id2label`` in index order; exact match first,
        then ignoring case). Integer labels of a ``ClassLabel`` go through their names when the
        model has names.

        Returns:
            one class index per text, or ``None`` for unlabelled data.

        Raises:
            DataError: a label the model does not know (the message lists its classes), or a
                named label for a model without class names.

        >>> TextData(["a", "b"], ["joy", "sadness"], "x").label_ids(EMOTION_LABELS)
        [1, 0]
        """
        if self.labels is None:
            return None
        names = list(class_names) if class_names else None
        labels: List[Label] = list(self.labels)
        if names and self.label_names:  # ClassLabel ints: map through their names
            labels = [self.label_names[v] if isinstance(v, int) and 0 <= v < len(self.label_names) else v for v in labels]
        lookup: Dict[str, int] = {}
        if names:
            lookup = {n.lower(): i for i, n in reversed(list(enumerate(names)))}
            lookup.update({n: i for i, n in enumerate(names)})
        n = len(names) if names else n_classes
        out = []
        for row, value in enumerate(labels):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit() and value.strip() not in lookup:
                value = int(value)
            if isinstance(value, int):
                if n is not None and not 0 <= value < n:
                    raise DataError(
                        f"label {value} (example {row + 1} of {self.source}) is out of range: the model has {n} classes"
                    )
                out.append(value)
                continue
            key = str(value)
            if not names:
                raise DataError(
                    f"the labels of {self.source} are names ({key!r}, ...) but the model has no class names in "
                    "config.id2label: give integer labels, or set id2label on the model"
                )
            if key not in lookup and key.strip().lower() not in lookup:
                raise DataError(
                    f"label {key!r} (example {row + 1} of {self.source}) is not a class of the model; "
                    f"its classes are: {', '.join(names)}"
                )
            out.append(lookup.get(key, lookup.get(key.strip().lower(), -1)))
        return out


def load_texts(
    data: Optional[str] = None,
    split: str = "test",
    text_column: Optional[str] = None,
    label_column: Optional[str] = None,
) -> TextData:
    """Labelled texts from a file, a folder, a ``datasets`` id, or the demo sample (``None``).

    Returns:
        a :class:`TextData`.

    Raises:
        DataError: no such file, folder or data set; an unknown format; a missing column; a
            malformed line; an empty file; ``pyarrow`` / ``datasets`` missing for a format
            that needs them.

    >>> d = load_texts()
    >>> len(d.texts), d.labels[0]
    (96, 'anger')
    """
    if data is None:
        return _read_file(DEMO_DATA, text_column, label_column)
    path = os.path.expanduser(str(data))
    if os.path.isdir(path):
        return _read_folder(path, split, text_column, label_column)
    if os.path.isfile(path):
        return _read_file(path, text_column, label_column)
    from .models.loading import looks_like_path

    if looks_like_path(str(data)) or os.path.splitext(path)[1].lower() in EXTENSIONS:
        raise DataError(f"no such file or folder: {data}")
    return _read_hub(str(data), split, text_column, label_column)


def _read_folder(folder: str, split: str, text_column: Optional[str], label_column: Optional[str]) -> TextData:
    for ext in EXTENSIONS:
        path = os.path.join(folder, split + ext)
        if os.path.isfile(path):
            return _read_file(path, text_column, label_column)
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        datasets = _import_datasets()
        loaded = datasets.load_from_disk(folder)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"the data set in {folder} has no split {split!r}; its splits: {', '.join(loaded)}")
            loaded = loaded[split]
        return _from_dataset(loaded, f"{folder} [{split}]", text_column, label_column)
    raise DataError(
        f"folder {folder} has no {split} split: expected {split}.txt, .csv, .tsv, .jsonl, .json or .parquet "
        "(or a data set saved with save_to_disk); choose the split with --split"
    )


def _read_file(path: str, text_column: Optional[str], label_column: Optional[str]) -> TextData:
    ext = os.path.splitext(path)[1].lower()
    source = os.path.abspath(path)
    if ext == ".txt":
        if text_column or label_column:
            raise DataError(
                f"{path} is in the TEXT;LABEL format, which has no columns to choose: drop --text-column/--label-column"
            )
        texts, labels = _read_semicolon(path)
        return TextData(texts, labels, source)
    if ext in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
    elif ext == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        raise DataError(f"line {i + 1} of {path} is not JSON: {err}") from None
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except ValueError as err:
                raise DataError(f"{path} is not JSON: {err}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path} must hold a JSON list of objects (one per example); use .jsonl for one object per line")
    elif ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading .parquet needs pyarrow: pip install pyarrow (or captum-mambalrp[data])") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise DataError(f"cannot read {path}: unknown format {ext or '(no extension)'}; use one of {', '.join(EXTENSIONS)}")
    return _from_rows(rows, source, text_column, label_column)


def _read_semicolon(path: str) -> Tuple[List[str], List[Label]]:
    texts: List[str] = []
    labels: List[Label] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\r\n")
            if i == 0 and line.lower().startswith("text;"):
                continue  # the header
            if not line.strip():
                continue
            if ";" not in line:
                raise DataError(f"line {i + 1} of {path} is not TEXT;LABEL: {line[:60]!r}")
            text, label = line.rsplit(";", 1)
            texts.append(text)
            labels.append(label.strip())
    if not texts:
        raise DataError(f"{path} has no examples")
    return texts, labels


def _pick(columns: Sequence[str], wanted: Optional[str], defaults: Sequence[str], what: str, source: str) -> Optional[str]:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{source} has no column {wanted!r} (--{what}-column); its columns: {', '.join(columns)}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    if what == "text":
        raise DataError(
            f"{source} has no text column ({', '.join(defaults)}); its columns: {', '.join(columns)}; choose with --text-column"
        )
    return None


def _from_rows(rows: List[dict], source: str, text_column: Optional[str], label_column: Optional[str]) -> TextData:
    if not rows:
        raise DataError(f"{source} has no examples")
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{source}: every example must be an object with a text field")
    columns = list(rows[0])
    tcol = _pick(columns, text_column, TEXT_COLUMNS, "text", source)
    lcol = _pick(columns, label_column, LABEL_COLUMNS, "label", source)
    texts, labels = [], []
    for i, r in enumerate(rows):
        text = r.get(tcol)
        if not isinstance(text, str):
            raise DataError(f"example {i + 1} of {source} has no text in column {tcol!r}")
        texts.append(text)
        if lcol is not None:
            labels.append(_label(r.get(lcol), i, source))
    return TextData(texts, labels if lcol is not None else None, source)


def _label(value: object, row: int, source: str) -> Label:
    if isinstance(value, bool) or value is None:
        raise DataError(f"example {row + 1} of {source} has no usable label ({value!r})")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return value.strip()
    raise DataError(f"example {row + 1} of {source}: label {value!r} is neither a name nor an integer")


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading a Hugging Face data set needs the datasets package: pip install datasets (or captum-mambalrp[data])"
        ) from None
    return datasets


def _from_dataset(ds, source: str, text_column: Optional[str], label_column: Optional[str]) -> TextData:
    columns = list(ds.column_names)
    tcol = _pick(columns, text_column, TEXT_COLUMNS, "text", source)
    lcol = _pick(columns, label_column, LABEL_COLUMNS, "label", source)
    texts = list(ds[tcol])
    if not texts:
        raise DataError(f"{source} has no examples")
    labels, names = None, None
    if lcol is not None:
        labels = [_label(v, i, source) for i, v in enumerate(ds[lcol])]
        names = getattr(ds.features.get(lcol), "names", None)
    return TextData(texts, labels, source, list(names) if names else None)


def _read_hub(name: str, split: str, text_column: Optional[str], label_column: Optional[str]) -> TextData:
    """A ``datasets`` id: from the cache when offline or when the hub cannot be reached."""
    from .models.loading import hub_endpoint, hub_offline, hub_reachable

    datasets = _import_datasets()
    offline = hub_offline() or not hub_reachable()
    flags = [f for f in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(datasets.config, f)]  # by version
    saved = {f: getattr(datasets.config, f) for f in flags}
    try:
        for f in flags:
            setattr(datasets.config, f, saved[f] or offline)
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:
        why = (
            "HF_HUB_OFFLINE is set"
            if hub_offline()
            else f"the hub ({hub_endpoint()}) cannot be reached"
            if offline
            else " ".join(str(err).split())[:200]
        )
        raise DataError(
            f"no such file or folder: {name}; as a Hugging Face data set it could not be loaded ({why})"
            + ("; it is not in the local cache" if offline else "")
        ) from None
    finally:
        for f in flags:
            setattr(datasets.config, f, saved[f])
    return _from_dataset(ds, f"{name} [{split}]", text_column, label_column)


def read_emotion(path: str) -> Tuple[List[str], List[int]]:
    """Texts and label indices (into :data:`EMOTION_LABELS`) of one Emotion split file.

    Raises:
        DataError: a malformed line or a label outside :data:`EMOTION_LABELS`.
    """
    data = _read_file(path, None, None)
    return data.texts, data.label_ids(EMOTION_LABELS) or []
