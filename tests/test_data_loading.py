"""Reading labelled texts: every local format, folders, ``datasets`` (local files and
save_to_disk, no network), the demo sample, labels mapped through the model's id2label, and
compare on a data set whose labels are not the Emotion ones."""

from __future__ import annotations

import csv
import json
import os
import time

import pytest
from cli_fixtures import save_tiny_classifier

from captum_mambalrp.datasets import DEMO_DATA, EMOTION_LABELS, DataError, TextData, load_texts, read_emotion

ROWS = [("i feel happy today", "positive"), ("i feel sad and alone", "negative"), ("so happy and loved", "positive")]
CLASSES = ["negative", "positive"]


def write(path, fmt: str, rows=ROWS, text="text", label="label") -> str:
    path = str(path)
    if fmt == "txt":
        with open(path, "w", encoding="utf-8") as f:
            f.write("text;label_name\n" + "".join(f"{t};{lab}\n" for t, lab in rows))
    elif fmt in ("csv", "tsv"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            w.writerow([text, label])
            w.writerows(rows)
    elif fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({text: t, label: lab}) + "\n" for t, lab in rows)
    elif fmt == "json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{text: t, label: lab} for t, lab in rows], f)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({text: [t for t, _ in rows], label: [lab for _, lab in rows]}), path)
    return path


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "jsonl", "json", "parquet"])
def test_every_file_format(tmp_path, fmt):
    data = load_texts(write(tmp_path / f"d.{fmt}", fmt))
    assert data.texts == [t for t, _ in ROWS] and data.labels == [lab for _, lab in ROWS]
    assert data.label_ids(CLASSES) == [1, 0, 1] and data.source == str(tmp_path / f"d.{fmt}")


def test_folder_split_columns_and_integer_labels(tmp_path):
    write(tmp_path / "validation.csv", "csv", [("one", 1), ("two", 0)], text="sentence", label="y")
    with pytest.raises(DataError, match="no test split: expected test.txt"):
        load_texts(str(tmp_path))
    data = load_texts(str(tmp_path), split="validation", text_column="sentence", label_column="y")
    assert data.texts == ["one", "two"] and data.labels == ["1", "0"]
    assert data.label_ids(None, n_classes=2) == [1, 0] and data.label_ids(CLASSES) == [1, 0]
    with pytest.raises(DataError, match=r"label 5 \(example 1 of .*\) is out of range: the model has 2 classes"):
        TextData(["a"], [5], "x").label_ids(CLASSES)
    unlabelled = load_texts(write(tmp_path / "u.jsonl", "jsonl", label="other"), label_column=None)
    assert unlabelled.labels is None and unlabelled.label_ids(CLASSES) is None


def test_label_errors_name_the_classes(tmp_path):
    data = load_texts(write(tmp_path / "d.csv", "csv"))
    with pytest.raises(
        DataError, match=r"^label 'positive' \(example 1 of .*d.csv\) is not a class of the model; its classes are: "
    ):
        data.label_ids(EMOTION_LABELS)
    with pytest.raises(DataError, match="are names .* but the model has no class names"):
        data.label_ids(None, n_classes=2)
    assert TextData(["a"], ["Positive"], "x").label_ids(CLASSES) == [1]  # case is forgiven


def test_malformed_inputs(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("text;label\nno separator here\n")
    with pytest.raises(DataError, match=r"line 2 of .* is not TEXT;LABEL"):
        load_texts(str(bad))
    with pytest.raises(DataError, match="no such file or folder: .*nothing.csv"):
        load_texts(str(tmp_path / "nothing.csv"))
    with pytest.raises(DataError, match="has no text column"):
        load_texts(write(tmp_path / "d.csv", "csv", text="body"))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match="unknown format .xlsx"):
        load_texts(str(tmp_path / "x.xlsx"))
    (tmp_path / "l.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 of .* is not JSON"):
        load_texts(str(tmp_path / "l.jsonl"))


def test_demo_sample_and_emotion_reader():
    data = load_texts()
    assert data.source == DEMO_DATA and len(data.texts) == 96
    ids = data.label_ids(EMOTION_LABELS)
    assert sorted(ids) == sorted(list(range(6)) * 16)  # 16 examples of each class
    texts, labels = read_emotion(DEMO_DATA)
    assert texts == data.texts and labels == ids


def test_datasets_local_files_and_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    csv_path = write(tmp_path / "d.csv", "csv")
    ds = datasets.load_dataset("csv", data_files={"test": csv_path}, cache_dir=str(tmp_path / "cache"))
    ds = ds.cast_column("label", datasets.ClassLabel(names=CLASSES))
    ds.save_to_disk(str(tmp_path / "saved"))
    data = load_texts(str(tmp_path / "saved"))
    assert data.texts == [t for t, _ in ROWS] and data.labels == [1, 0, 1] and data.label_names == CLASSES
    # ClassLabel integers map through their names when the model has names, in another order too
    assert data.label_ids(["positive", "negative"]) == [0, 1, 0]
    with pytest.raises(DataError, match="has no split 'validation'; its splits: test"):
        load_texts(str(tmp_path / "saved"), split="validation")
    ds["test"].save_to_disk(str(tmp_path / "one"))  # a single Dataset, not a DatasetDict
    assert load_texts(str(tmp_path / "one")).texts == data.texts


def test_datasets_id_without_hub_fails_fast(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"^no such file or folder: someone/no-such-data; .*cannot be reached.*local cache"):
        load_texts("someone/no-such-data")
    assert time.perf_counter() - start < 10


def test_compare_on_other_labels(tmp_path, capsys):
    """A two-class data set with its own label names runs end to end (was: 'positive' is not in list)."""
    from captum_mambalrp.cli import main

    ckpt = save_tiny_classifier(str(tmp_path / "ckpt"), labels=CLASSES)
    data = write(tmp_path / "reviews.jsonl", "jsonl")
    out = tmp_path / "study"
    argv = ["compare", "--model", ckpt, "--data", data, "--methods", "mambalrp,ig", "--ig-steps", "2", "--out", str(out)]
    assert main([*argv, "--n", "3", "--batch-size", "3", "--no-layers", "--no-figures", "--no-progress"]) == 0
    examples = [json.loads(line) for line in open(os.path.join(out, "examples.jsonl"))]
    assert sorted(e["label"] for e in examples) == [0, 1, 1]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["methods"]) == {"mambalrp", "integrated_gradients"}
    assert "reviews.jsonl" in capsys.readouterr().out


def test_datasets_id_with_hub_offline_fails_fast(monkeypatch):
    pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"^no such file or folder: someone/no-such-data; .*\(HF_HUB_OFFLINE is set\)"):
        load_texts("someone/no-such-data")
    assert time.perf_counter() - start < 10


def test_missing_optional_package(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match=r"reading .parquet needs pyarrow: pip install pyarrow"):
        load_texts(str(path))
