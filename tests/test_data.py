"""data/: the three prepare scripts on local inputs, exact round trips, known counts, and clean failures."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.common import TokenSetWriter, dtype_for_vocab
from dataset import load_meta
from runtime import UserError
from tokenizer import get_tokenizer, tokenizer_entry_from_meta

REPO_ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE_URL = "http://127.0.0.1:9/input.txt"  # the discard port: refused at once, no network touched


def prepare(name: str, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    script = REPO_ROOT / "data" / name / "prepare.py"
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr


def assert_clean_failure(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    for phrase in phrases:
        assert phrase in message


def tokens(data_dir: Path, split: str) -> np.ndarray:
    meta = load_meta(data_dir)
    return np.memmap(data_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")


def decoded_documents(data_dir: Path, split: str) -> list[str]:
    """The documents in a split: each one's tokens end with end-of-text."""
    tokenizer = get_tokenizer(load_meta(data_dir))
    ids = tokens(data_dir, split)
    assert ids[-1] == tokenizer.eot_token
    ends = np.flatnonzero(ids == tokenizer.eot_token)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


def snapshot(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir())}


# --- Shakespeare ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_sets(shakespeare_input, tmp_path_factory) -> dict[str, Path]:
    """Both Shakespeare sets, prepared from another working directory: the scripts run from anywhere."""
    elsewhere = tmp_path_factory.mktemp("cwd")
    out = {}
    for name in ("shakespeare_char", "shakespeare"):
        out[name] = tmp_path_factory.mktemp(name)
        assert_ok(prepare(name, "--input", shakespeare_input, "--out_dir", out[name], cwd=elsewhere))
    return out


def test_shakespeare_char_has_65_characters_and_round_trips_exactly(shakespeare_sets, shakespeare_input):
    data_dir = shakespeare_sets["shakespeare_char"]
    meta = load_meta(data_dir)
    assert (meta["tokenizer"], meta["vocab_size"], len(meta["chars"]), meta["dtype"]) == (
        "char",
        65,
        65,
        "uint16",
    )
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    tokenizer = get_tokenizer(meta)
    text = shakespeare_input.read_text(encoding="utf-8")
    train, val = tokens(data_dir, "train"), tokens(data_dir, "val")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert tokenizer.decode(train.tolist()) + tokenizer.decode(val.tolist()) == text


def test_shakespeare_bpe_gives_338025_tokens_and_round_trips_exactly(shakespeare_sets, shakespeare_input):
    data_dir = shakespeare_sets["shakespeare"]
    meta = load_meta(data_dir)
    assert meta == {
        "tokenizer": "tiktoken",
        "encoding": "gpt2",
        "eot_token": 50256,
        "vocab_size": 50257,
        "dtype": "uint16",
        "train_tokens": 301_966,
        "val_tokens": 36_059,
    }
    tokenizer = get_tokenizer(meta)
    text = shakespeare_input.read_text(encoding="utf-8")
    assert (
        tokenizer.decode(tokens(data_dir, "train").tolist())
        + tokenizer.decode(tokens(data_dir, "val").tolist())
        == text
    )


def test_rerun_from_cached_input_is_byte_identical(shakespeare_sets, shakespeare_input, tmp_path):
    """Without --input the script uses out_dir/input.txt when present, and so never downloads again."""
    out_dir = tmp_path / "set"
    out_dir.mkdir()
    shutil.copy(shakespeare_input, out_dir / "input.txt")
    for _ in range(2):
        assert_ok(prepare("shakespeare_char", "--out_dir", out_dir, "--url", UNREACHABLE_URL))
    expected = snapshot(shakespeare_sets["shakespeare_char"])
    assert snapshot(out_dir) == {**expected, "input.txt": shakespeare_input.read_bytes()}


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_no_input_and_no_network_names_both_options(name, tmp_path):
    result = prepare(name, "--out_dir", tmp_path / "set", "--url", UNREACHABLE_URL)
    assert_clean_failure(result, "network", "--input")
    assert not (tmp_path / "set" / "train.bin").exists()


def test_vocabulary_beyond_uint16_switches_to_uint32(tmp_path):
    chars = [chr(c) for c in range(0x10000, 0x10000 + 70_000)]  # above the surrogates, so all encodable
    random.Random(0).shuffle(chars)
    text = "".join(chars)
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    assert_ok(prepare("shakespeare_char", "--input", tmp_path / "wide.txt", "--out_dir", tmp_path))
    meta = load_meta(tmp_path)
    assert (meta["vocab_size"], meta["dtype"]) == (70_000, "uint32")
    tokenizer = get_tokenizer(meta)
    assert (
        tokenizer.decode(tokens(tmp_path, "train").tolist())
        + tokenizer.decode(tokens(tmp_path, "val").tolist())
        == text
    )


# --- OpenWebText ------------------------------------------------------------------------------


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Documents with the awkward parts of web text: non-ASCII, emoji, blank lines, Windows line ends,
    a literal end-of-text marker, surrounding whitespace, and a few empty ones (which prepare skips)."""
    rng = random.Random(seed)
    words = [
        "the",
        "model",
        "token",
        "naïve",
        "café",
        "日本語",
        "🙂",
        "<|endoftext|>",
        "\n\n",
        "\r\n",
        "  ",
        "GPT-2",
        "42,",
    ]
    return ["" if i % 997 == 5 else " ".join(rng.choices(words, k=rng.randint(1, 300))) for i in range(n)]


def expected_split(documents: list[str], val_every: int) -> dict[str, list[str]]:
    kept = [d for d in documents if d]
    return {"train": [d for i, d in enumerate(kept) if i % val_every], "val": kept[::val_every]}


@pytest.fixture(scope="module")
def web_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """3000 documents: the first half in a .jsonl file, the rest in a .parquet file."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    documents = make_documents(3000)
    folder = tmp_path_factory.mktemp("corpus")
    with open(folder / "a.jsonl", "w", encoding="utf-8") as f:
        for doc in documents[:1500]:
            f.write(json.dumps({"id": len(doc), "text": doc}) + "\n")
    pq.write_table(pa.table({"text": documents[1500:]}), folder / "b.parquet", row_group_size=500)
    (folder / "notes.md").write_text("not a corpus file: ignored")
    return folder, documents


@pytest.fixture(scope="module")
def web_set(web_corpus, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("openwebtext")
    assert_ok(prepare("openwebtext", "--input", web_corpus[0], "--out_dir", out_dir, "--num_proc", 2))
    return out_dir


def test_openwebtext_round_trips_every_document_in_order(web_set, web_corpus):
    expected = expected_split(web_corpus[1], val_every=2000)
    assert len(expected["val"]) == 2
    for split in ("train", "val"):
        assert decoded_documents(web_set, split) == expected[split]
    meta = load_meta(web_set)
    assert (meta["tokenizer"], meta["encoding"], meta["eot_token"], meta["dtype"]) == (
        "tiktoken",
        "gpt2",
        50256,
        "uint16",
    )
    assert meta["train_tokens"] == len(tokens(web_set, "train")) and meta["val_tokens"] == len(
        tokens(web_set, "val")
    )


def test_openwebtext_output_does_not_depend_on_process_count(web_set, web_corpus, tmp_path):
    assert_ok(prepare("openwebtext", "--input", web_corpus[0], "--out_dir", tmp_path, "--num_proc", 1))
    assert snapshot(tmp_path) == snapshot(web_set)


def test_openwebtext_reads_txt_files_and_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    documents = make_documents(12, seed=1)
    txt_dir = tmp_path / "pages"
    txt_dir.mkdir()
    for i, doc in enumerate(documents):
        (txt_dir / f"{i:03d}.txt").write_text(doc, encoding="utf-8", newline="")
    datasets.Dataset.from_dict({"text": documents}).save_to_disk(str(tmp_path / "saved"))
    expected = expected_split(documents, val_every=3)
    for source in (txt_dir, tmp_path / "saved"):
        out_dir = tmp_path / f"out_{source.name}"
        assert_ok(
            prepare("openwebtext", "--input", source, "--out_dir", out_dir, "--num_proc", 1, "--val_every", 3)
        )
        assert [decoded_documents(out_dir, split) for split in ("train", "val")] == [
            expected["train"],
            expected["val"],
        ]


@pytest.mark.parametrize(
    "name, content, phrase",
    [
        ("empty.jsonl", "", "no documents"),
        ("one.jsonl", '{"text": "a single document"}\n', "too small"),
        ("bad.jsonl", '{"text": "fine"}\n{"body": "no text field"}\n', "bad.jsonl:2"),
        ("broken.jsonl", '{"text": "fine"}\n{"text": \n', "broken.jsonl:2"),
        ("corpus.csv", "text\nhello\n", "expected a .txt/.jsonl/.parquet file"),
    ],
)
def test_openwebtext_bad_input_fails_clearly(tmp_path, name, content, phrase):
    (tmp_path / name).write_text(content, encoding="utf-8")
    result = prepare(
        "openwebtext", "--input", tmp_path / name, "--out_dir", tmp_path / "set", "--num_proc", 1
    )
    assert_clean_failure(result, phrase)
    assert not (tmp_path / "set" / "train.bin").exists()
    assert not list(tmp_path.glob("set/*.tmp"))


def test_tokenizer_of_a_checkpoint_gives_the_ids_of_the_set_it_was_trained_on(
    shakespeare_sets, shakespeare_input, tmp_path
):
    from checkpoint import CKPT_NAME, save_checkpoint  # torch: only this test needs it

    char_set = shakespeare_sets["shakespeare_char"]
    (tmp_path / "run").mkdir()
    save_checkpoint(
        {"tokenizer": tokenizer_entry_from_meta(load_meta(char_set))}, tmp_path / "run" / CKPT_NAME
    )
    result = prepare(
        "shakespeare",
        "--input",
        shakespeare_input,
        "--tokenizer",
        tmp_path / "run",
        "--out_dir",
        tmp_path / "set",
    )
    assert_ok(result)
    assert load_meta(tmp_path / "set")["tokenizer"] == "char"
    for split in ("train", "val"):
        assert np.array_equal(tokens(tmp_path / "set", split), tokens(char_set, split))
    (tmp_path / "other.txt").write_text("Not in Shakespeare: é", encoding="utf-8")
    other = ("--input", tmp_path / "other.txt", "--out_dir", tmp_path / "other")
    assert_clean_failure(prepare("shakespeare", *other, "--tokenizer", tmp_path / "run"), "'é'")


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_empty_text_fails_clearly(name, tmp_path):
    (tmp_path / "input.txt").write_text("")
    result = prepare(name, "--input", tmp_path / "input.txt", "--out_dir", tmp_path / "set")
    assert_clean_failure(result, "empty")
    assert not (tmp_path / "set" / "train.bin").exists()


def test_failed_rerun_leaves_the_previous_set_intact(web_set, web_corpus, tmp_path):
    """A corpus that goes bad after many batches were written: the old set must survive untouched."""
    out_dir = tmp_path / "set"
    shutil.copytree(web_set, out_dir)
    before = snapshot(out_dir)
    lines = [json.dumps({"text": doc}) for doc in web_corpus[1]] + ["{not json"]
    (tmp_path / "late_error.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = prepare(
        "openwebtext", "--input", tmp_path / "late_error.jsonl", "--out_dir", out_dir, "--num_proc", 2
    )
    assert_clean_failure(result, f"late_error.jsonl:{len(lines)}")
    assert snapshot(out_dir) == before


# --- data.common ------------------------------------------------------------------------------


def test_load_meta_of_unprepared_set_names_the_prepare_command(tmp_path):
    with pytest.raises(UserError, match="python data/shakespeare_char/prepare.py"):
        load_meta(tmp_path / "shakespeare_char")
    with pytest.raises(UserError, match="--out_dir"):
        load_meta(tmp_path / "my_corpus")


def test_dtype_is_uint16_exactly_while_ids_fit():
    assert dtype_for_vocab(65) == dtype_for_vocab(2**16) == "uint16"
    assert dtype_for_vocab(2**16 + 1) == "uint32"


def test_interrupted_writer_leaves_the_folder_as_it_was(tmp_path):
    with TokenSetWriter(tmp_path, "uint16") as writer:
        writer.write("train", [1, 2, 3])
        writer.write("val", [4])
        writer.commit({"tokenizer": "char", "chars": list("abcde"), "vocab_size": 5})
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with TokenSetWriter(tmp_path, "uint16") as writer:
            writer.write("train", [4, 3, 2, 1])
            raise KeyboardInterrupt
    assert snapshot(tmp_path) == before
    assert load_meta(tmp_path)["train_tokens"] == 3
