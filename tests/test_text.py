"""Text data: the tokenizer, user files (CSV/TSV/JSONL), IMDB trees and archives, safe tar extraction."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dlkit.data import imdb, load_dataset, sources
from dlkit.data.archive import safe_extract
from dlkit.data.sources import RemoteFile
from dlkit.data.textfile import read_table
from dlkit.data.tokenizer import Tokenizer, words
from dlkit.errors import DataError, UsageError
from tests.test_download import Server


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DLKIT_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("DLKIT_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", [tmp_path / "system"])


# --- tokenizer ----------------------------------------------------------------------------------


def test_words_rules():
    assert words("Don't stop -- 10/10!<br /><br />GREAT_film") == ["don't", "stop", "10", "10", "great", "film"]
    assert words("Café déjà-vu") == ["café", "déjà", "vu"]
    assert words("") == []


def test_vocab_order_and_size():
    tok = Tokenizer.build(["b a a", "c b a", "d"], vocab_size=4, max_len=5)
    assert tok.vocab == ["<pad>", "<unk>", "a", "b"]  # a:3, b:2, then c and d (1 each) do not fit
    tok = Tokenizer.build(["d c"], vocab_size=10, max_len=5)
    assert tok.vocab == ["<pad>", "<unk>", "c", "d"]  # ties in alphabetical order


def test_encode_right_pads_truncates_and_marks_unknown():
    tok = Tokenizer(["<pad>", "<unk>", "good", "bad"], max_len=4)
    ids, truncated = tok.encode(["good zzz", "bad bad good good bad", ""])
    assert ids.dtype == np.int64 and ids.shape == (3, 4)
    assert ids.tolist() == [[2, 1, 0, 0], [3, 3, 2, 2], [0, 0, 0, 0]]
    assert truncated == 1


# --- user files ---------------------------------------------------------------------------------

GOOD = ["wonderful", "superb", "great"]
BAD = ["awful", "dreadful", "boring"]
FILLER = "the a movie film plot actor story was is it and of to this that".split()


def reviews(n: int, seed: int = 0, words: tuple[int, int] = (4, 12)) -> tuple[list[str], list[str]]:
    """Texts whose label is whether a word of GOOD (pos) or of BAD (neg) appears: learnable."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        pos = i % 2 == 0
        w = list(rng.choice(FILLER, size=int(rng.integers(*words))))
        w.insert(int(rng.integers(0, len(w) + 1)), str(rng.choice(GOOD if pos else BAD)))
        texts.append(" ".join(w))
        labels.append("pos" if pos else "neg")
    return texts, labels


def write_table(path: Path, texts, labels, *, text_col="text", label_col="label") -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({text_col: t, label_col: lab}) + "\n" for t, lab in zip(texts, labels)))
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        w.writerow(["id", text_col, label_col])
        w.writerows([i, t, lab] for i, (t, lab) in enumerate(zip(texts, labels)))
    return path


def test_csv_tsv_jsonl_give_the_same_bundle(tmp_path):
    texts, labels = reviews(60)
    texts[3] = 'a "quoted, text" with commas\nand a newline'
    bundles = []
    for suffix in (".csv", ".tsv", ".jsonl"):
        f = write_table(tmp_path / f"r{suffix}", texts, labels, text_col="review", label_col="sentiment")
        b = load_dataset("text-csv", options={"data_file": str(f), "text_column": "review",
                                              "label_column": "sentiment", "max_len": 12})
        bundles.append(b)
    for b in bundles[1:]:
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(b, split)[0], getattr(bundles[0], split)[0])
            assert torch.equal(getattr(b, split)[1], getattr(bundles[0], split)[1])
    b = bundles[0]
    assert b.spec.modality == "text" and b.spec.input_shape == (12,) and b.spec.class_names == ("neg", "pos")
    assert b.train[0].dtype == torch.int64
    assert len(b.train[0]) + len(b.val[0]) == 48 and len(b.test[0]) == 12  # 20% of each class
    assert torch.bincount(b.test[1]).tolist() == [6, 6]
    assert b.state["labels"] == ["neg", "pos"] and b.state["tokenizer"]["vocab"][:2] == ["<pad>", "<unk>"]
    assert b.state["text_column"] == "review" and b.state["file"].endswith("r.csv")


def test_vocab_comes_from_the_training_split_only(tmp_path):
    texts, labels = reviews(40)
    texts = [f"uniq{i} {t}" for i, t in enumerate(texts)]  # one word only this row has
    data = load_dataset("text-csv", val_fraction=0.25,
                        options={"data_file": str(write_table(tmp_path / "r.csv", texts, labels))})
    vocab = data.state["tokenizer"]["vocab"]
    uniq = {w for w in vocab if w.startswith("uniq")}
    train_words = {vocab[i] for i in data.train[0].flatten().tolist()}
    assert uniq and uniq == {w for w in train_words if w.startswith("uniq")}
    assert len(uniq) == len(data.train[0]) == 24  # 40 - 8 test - 8 val
    for held_out in (data.val[0], data.test[0]):
        assert (held_out[:, 0] == 1).all()  # their own word is unknown: never seen in training


def test_numeric_labels_sort_as_numbers(tmp_path):
    texts, _ = reviews(30)
    labels = [str([2, 10, 1][i % 3]) for i in range(30)]
    b = load_dataset("text-csv", options={"data_file": str(write_table(tmp_path / "r.csv", texts, labels))})
    assert b.spec.class_names == ("1", "2", "10") and b.spec.num_classes == 3


def test_state_round_trip_and_other_file(tmp_path):
    texts, labels = reviews(50)
    f = write_table(tmp_path / "r.csv", texts, labels)
    b = load_dataset("text-csv", seed=3, options={"data_file": str(f), "vocab_size": 8})
    assert b.spec.vocab_size == 8
    again = load_dataset("text-csv", state=json.loads(json.dumps(b.state)))
    assert torch.equal(again.train[0], b.train[0]) and torch.equal(again.test[0], b.test[0])
    assert again.spec == b.spec
    other = write_table(tmp_path / "o.jsonl", texts[:7], labels[:7])
    o = load_dataset("text-csv", state=b.state, options={"data_file": str(other)})
    assert len(o.train[0]) == 0 and len(o.test[0]) == 7 and o.spec == b.spec
    ids, _ = Tokenizer(b.state["tokenizer"]["vocab"], b.spec.input_shape[0]).encode(texts[:7])
    assert torch.equal(o.test[0], torch.from_numpy(ids))
    bad = write_table(tmp_path / "bad.csv", texts[:4], ["pos", "neg", "meh", "pos"])
    with pytest.raises(DataError, match="not trained on: 'meh'"):
        load_dataset("text-csv", state=b.state, options={"data_file": str(bad)})


def test_missing_columns_name_the_columns_it_has(tmp_path):
    f = write_table(tmp_path / "r.csv", *reviews(10), text_col="review", label_col="stars")
    with pytest.raises(DataError) as info:
        load_dataset("text-csv", options={"data_file": str(f)})
    msg = info.value.message
    assert "'text' (--text-column)" in msg and "'label' (--label-column)" in msg
    assert "'id', 'review', 'stars'" in msg
    j = write_table(tmp_path / "r.jsonl", *reviews(10), text_col="body")
    with pytest.raises(DataError, match="its columns: 'body', 'label'"):
        read_table(j)


def test_empty_header_only_one_class_and_non_utf8(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="is empty"):
        load_dataset("text-csv", options={"data_file": str(empty)})
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_dataset("text-csv", options={"data_file": str(header)})
    texts, _ = reviews(10)
    one = write_table(tmp_path / "one.csv", texts, ["pos"] * 10)
    with pytest.raises(DataError, match="every label in column 'label' is 'pos'; a classifier needs at least two"):
        load_dataset("text-csv", options={"data_file": str(one)})
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\nnice,pos\ncaf\u00e9 bad,neg\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text: byte 0xe9 on line 3") as info:
        load_dataset("text-csv", options={"data_file": str(latin)})
    assert "iconv" in info.value.hint
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("text-csv", options={"data_file": str(tmp_path / "nope.csv")})
    with pytest.raises(UsageError, match="unknown file type"):
        load_dataset("text-csv", options={"data_file": str(tmp_path / "r.xlsx")})
    with pytest.raises(UsageError, match="needs a file"):
        load_dataset("text-csv")
    with pytest.raises(UsageError, match="takes no data options"):
        load_dataset("digits", options={"max_len": 5})
    with pytest.raises(UsageError, match="--max-len must be an integer >= 1"):
        load_dataset("text-csv", options={"data_file": str(one), "max_len": 0})


def test_truncation_is_noted_once(tmp_path, caplog):
    texts, labels = reviews(30)
    f = write_table(tmp_path / "r.csv", texts, labels)
    with caplog.at_level(logging.INFO, logger="dlkit"):
        load_dataset("text-csv", options={"data_file": str(f), "max_len": 5})
    notes = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    longer = sum(len(words(t)) > 5 for t in texts)
    assert 0 < longer < 30
    assert len(notes) == 1 and notes[0].startswith(f"{longer} of 30 texts are longer than max_len=5")


# --- imdb ---------------------------------------------------------------------------------------


def write_imdb(root: Path, n: int = 12, seed: int = 0) -> Path:
    """An aclImdb-shaped tree: {train,test}/{neg,pos}/<id>_<rating>.txt, as the real archive."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for lab in ("neg", "pos"):
            d = root / "aclImdb" / split / lab
            d.mkdir(parents=True)
            for i in range(n):
                w = list(rng.choice(FILLER, size=8)) + [str(rng.choice(GOOD if lab == "pos" else BAD))]
                body = " ".join(w[:4]) + "<br /><br />" + " ".join(w[4:])
                if split == "test" and i == 0:
                    body += " unseenword"
                (d / f"{i}_{7 if lab == 'pos' else 2}.txt").write_text(body, encoding="utf-8")
    (root / "aclImdb" / "imdb.vocab").write_text("the\n")
    return root / "aclImdb"


def tar_gz(members: dict[str, bytes], links: dict[str, tuple[str, bytes]] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (target, kind) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def imdb_archive(tree_parent: Path) -> bytes:
    members = {str(p.relative_to(tree_parent)): p.read_bytes()
               for p in sorted((tree_parent / "aclImdb").rglob("*")) if p.is_file()}
    return tar_gz(members)


def test_imdb_from_tree_is_cached(tmp_path, caplog):
    write_imdb(tmp_path / "data")
    opts = {"vocab_size": 20, "max_len": 6}
    with caplog.at_level(logging.INFO, logger="dlkit"):
        b = load_dataset("imdb", data_dir=tmp_path / "data", options=opts)
    assert b.spec.input_shape == (6,) and b.spec.vocab_size == 20 and b.spec.class_names == ("neg", "pos")
    assert len(b.train[0]) + len(b.val[0]) == 24 and len(b.test[0]) == 24
    assert b.test[1].tolist() == [0] * 12 + [1] * 12
    assert "unseenword" not in b.state["tokenizer"]["vocab"] and "br" not in b.state["tokenizer"]["vocab"]
    assert "truncated" in caplog.text and "cached" not in caplog.text
    assert list((tmp_path / "cache" / "imdb" / "tokenized").glob("*.safetensors"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dlkit"):
        again = load_dataset("imdb", data_dir=tmp_path / "data", options=opts)
    assert "using the tokenized reviews cached" in caplog.text
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(again, split)[0], getattr(b, split)[0])
    assert again.state == b.state
    # a damaged cache file is rebuilt, with a warning
    cached = next((tmp_path / "cache" / "imdb" / "tokenized").glob("*.safetensors"))
    cached.write_bytes(b"junk")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dlkit"):
        rebuilt = load_dataset("imdb", data_dir=tmp_path / "data", options=opts)
    assert "damaged token cache" in caplog.text and torch.equal(rebuilt.train[0], b.train[0])
    # a changed tree is not served from the stale cache
    extra = tmp_path / "data" / "aclImdb" / "train" / "pos" / "99_9.txt"
    extra.write_text("wonderful wonderful")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dlkit"):
        changed = load_dataset("imdb", data_dir=tmp_path / "data", options=opts)
    assert "cached" not in caplog.text and len(changed.train[0]) + len(changed.val[0]) == 25
    # the saved state reproduces the encoding with its own vocabulary
    st = load_dataset("imdb", data_dir=tmp_path / "data", state=b.state)
    assert st.state["tokenizer"]["vocab"] == b.state["tokenizer"]["vocab"]


def test_imdb_download_extract_resume_and_checksum(tmp_path, monkeypatch):
    write_imdb(tmp_path / "src")
    blob = imdb_archive(tmp_path / "src")
    md5 = "md5:" + hashlib.md5(blob).hexdigest()
    cache = tmp_path / "cache" / "imdb"
    cache.mkdir(parents=True)
    (cache / "aclImdb_v1.tar.gz.part").write_bytes(blob[: len(blob) // 2])  # an interrupted download
    with Server({"/imdb/aclImdb_v1.tar.gz": blob}) as srv:
        monkeypatch.setattr(imdb, "IMDB", replace(imdb.IMDB, mirrors=(f"{srv.url}/imdb/",),
                                                  files=(RemoteFile("aclImdb_v1.tar.gz", md5, remote="aclImdb_v1.tar.gz"),)))
        got = []
        b = load_dataset("imdb", options={"max_len": 8}, progress=lambda d, t, n: got.append((d, t, n)))
    assert srv.requests == [("/imdb/aclImdb_v1.tar.gz", f"bytes={len(blob) // 2}-")]
    assert got[-1] == (len(blob), len(blob), "aclImdb_v1.tar.gz")
    assert (cache / "aclImdb_v1.tar.gz").read_bytes() == blob
    assert (cache / "aclImdb" / "train" / "pos" / "0_7.txt").is_file()
    assert not (cache / "aclImdb" / "imdb.vocab").exists()  # only the reviews are extracted
    assert len(b.test[0]) == 24 and "downloaded" in b.source
    # the extracted tree now serves offline
    monkeypatch.setenv("DLKIT_OFFLINE", "1")
    assert torch.equal(load_dataset("imdb", options={"max_len": 8}).test[0], b.test[0])


def test_imdb_checksum_mismatch(tmp_path, monkeypatch):
    write_imdb(tmp_path / "src", n=3)
    blob = imdb_archive(tmp_path / "src")
    with Server({"/aclImdb_v1.tar.gz": blob}) as srv:
        monkeypatch.setattr(imdb, "IMDB", replace(imdb.IMDB, mirrors=(f"{srv.url}/",)))  # the real MD5
        with pytest.raises(DataError, match="could not be downloaded") as info:
            load_dataset("imdb")
    assert "checksum mismatch" in info.value.message and "7c2ac02c03563afcf9b574c7e56c153a" in info.value.message
    assert not list((tmp_path / "cache" / "imdb").glob("aclImdb_v1*"))


def test_imdb_archive_with_traversal_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    evil = tar_gz({"aclImdb/train/pos/0_7.txt": b"fine", "aclImdb/../../evil.txt": b"gotcha"})
    (tmp_path / "data" / "aclImdb_v1.tar.gz").write_bytes(evil)
    with pytest.raises(DataError, match=r"'aclImdb/\.\./\.\./evil\.txt' would be written outside .*path traversal"):
        load_dataset("imdb", data_dir=tmp_path / "data")
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (tmp_path / "cache" / "imdb" / "aclImdb").exists()


# --- safe extraction ----------------------------------------------------------------------------


@pytest.mark.parametrize("members,links,needle", [
    ({"/etc/evil": b"x"}, {}, "outside the target folder"),
    ({"a/../../evil": b"x"}, {}, "path traversal"),
    ({"ok": b"x"}, {"link": ("../../outside", tarfile.SYMTYPE)}, "symbolic link to '../../outside'"),
    ({"ok": b"x"}, {"link": ("/etc/passwd", tarfile.SYMTYPE)}, "symbolic link to '/etc/passwd'"),
    ({"ok": b"x"}, {"hard": ("../x", tarfile.LNKTYPE)}, "hard link to '../x'"),
    ({}, {"d": (".", tarfile.SYMTYPE), "d/e": ("..", tarfile.SYMTYPE)}, "beyond the link 'd'"),
    ({}, {"fifo": ("", tarfile.FIFOTYPE)}, "special file"),
])
def test_unsafe_archives_are_refused(tmp_path, members, links, needle):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz(members, links))
    with pytest.raises(DataError, match="refusing the archive") as info:
        safe_extract(archive, tmp_path / "out" / "x")
    assert needle in info.value.message
    assert not (tmp_path / "out" / "x").exists() and not (tmp_path / "out" / "x.partial").exists()


def test_safe_extract_keeps_inner_links_and_selects(tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_gz({"d/a.txt": b"A", "d/b.txt": b"B"}, {"d/l": ("a.txt", tarfile.SYMTYPE)}))
    out = safe_extract(archive, tmp_path / "x")
    assert (out / "d" / "l").read_bytes() == b"A"
    out = safe_extract(archive, tmp_path / "x", select=lambda n: n.endswith("b.txt"))
    assert sorted(p.name for p in out.rglob("*")) == ["b.txt", "d"]
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar at all")
    with pytest.raises(DataError, match="not a readable tar archive"):
        safe_extract(tmp_path / "junk.tar.gz", tmp_path / "y")
