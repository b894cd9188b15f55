"""OpenWebText (or any corpus of documents) with GPT-2 BPE and an end-of-text token after each document.

    python data/openwebtext/prepare.py [--input PATH] [--out_dir DIR] [--num_proc N]

Without --input the corpus comes from the Hugging Face hub (~8M documents, ~9B tokens; tens of GB).
--input reads local documents instead:
  .txt      one document per file, read whole (as the original OpenWebText release: a folder of pages)
  .jsonl    one document per line, in the "text" field
  .parquet  one document per row, in the "text" column
  a folder  every such file below it, in sorted path order
  a folder written by datasets' save_to_disk (its "text" column; the "train" split of a DatasetDict)
Empty documents are skipped. Document 0 and every --val_every-th after it go to val.bin (0.05% by
default, spread over the whole corpus); the rest go to train.bin, both in corpus order. The output
depends only on the input, not on --num_proc, and memory stays bounded however large the corpus.
"""

import json
import os
import sys
from argparse import ArgumentParser, Namespace, RawDescriptionHelpFormatter
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, from any working dir
from data.common import DataError, TokenSetWriter, dtype_for_vocab
from runtime import exit_on_error
from tokenizer import load_tiktoken

HF_DATASET = "Skylion007/openwebtext"  # the hub name that "openwebtext" redirects to
ENCODING = "gpt2"
FILE_TYPES = (".txt", ".jsonl", ".parquet")
BATCH_CHARS = (
    1_000_000  # text per worker task: large enough to amortise pickling, small enough to bound memory
)

Documents = tuple[Iterator[str], int | None]  # the texts, and how many there are when cheap to know


# --- reading documents ------------------------------------------------------------------------


def read_txt(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep "\r\n" as written
        yield f.read()


def read_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError) as e:
                raise DataError(f"{path}:{line_no}: not a JSON object ({e})") from e
            if not isinstance(text, str):
                raise DataError(f'{path}:{line_no}: no string field "text" in this record')
            yield text


def parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading .parquet needs pyarrow: pip install pyarrow") from e
    file = pq.ParquetFile(path)
    if "text" not in file.schema_arrow.names:
        raise DataError(f'{path} has no "text" column (columns: {", ".join(file.schema_arrow.names)})')
    return file


def read_parquet(path: Path) -> Iterator[str]:
    for batch in parquet_file(path).iter_batches(batch_size=1024, columns=["text"]):
        yield from batch.column("text").to_pylist()


def count_in_file(path: Path) -> int | None:
    if path.suffix == ".txt":
        return 1
    if path.suffix == ".parquet":
        return parquet_file(path).metadata.num_rows
    return None  # .jsonl: counting would mean reading the file twice


def texts_of_files(paths: list[Path]) -> Iterator[str]:
    readers = {".txt": read_txt, ".jsonl": read_jsonl, ".parquet": read_parquet}
    for path in paths:
        try:
            yield from readers[path.suffix](path)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e})") from e


def import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "this source needs Hugging Face datasets: pip install datasets "
            "(or pass --input with .txt/.jsonl/.parquet files)"
        ) from e
    return datasets


def read_dataset(dataset) -> Documents:
    """Texts of a datasets.Dataset, read in batches. Its Arrow files are memory-mapped: pages read
    show in RSS but are the OS's file cache, which it reclaims under pressure."""
    if "text" not in dataset.column_names:
        raise DataError(f'the dataset has no "text" column (columns: {", ".join(dataset.column_names)})')
    batches = dataset.select_columns(["text"]).iter(batch_size=1024)
    return (text for batch in batches for text in batch["text"]), len(dataset)


def open_corpus(source: Path | None, num_proc: int) -> Documents:
    if source is None:
        datasets = import_datasets()
        try:
            dataset = datasets.load_dataset(HF_DATASET, split="train", num_proc=num_proc)
        except Exception as e:  # network, hub and format failures come as many exception types
            raise DataError(
                f"could not load {HF_DATASET} from the Hugging Face hub ({type(e).__name__}: {e}); "
                "connect to the network, or pass --input PATH to a local corpus"
            ) from e
        return read_dataset(dataset)
    if not source.exists():
        raise DataError(f"--input {source} does not exist")
    if source.is_dir() and any(
        (source / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")
    ):
        datasets = import_datasets()
        dataset = datasets.load_from_disk(str(source))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise DataError(f"{source} holds splits {list(dataset)}, none named 'train'")
            dataset = dataset["train"]
        return read_dataset(dataset)
    paths = [source]
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix in FILE_TYPES and p.is_file())
    if not paths or paths[0].suffix not in FILE_TYPES:
        raise DataError(
            f"--input {source}: expected a {'/'.join(FILE_TYPES)} file, a folder of them, "
            "or a folder written by datasets' save_to_disk"
        )
    counts = [count_in_file(p) for p in paths]
    return texts_of_files(paths), None if None in counts else sum(counts)


# --- tokenising in parallel -------------------------------------------------------------------


def batches_of(texts: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) with about BATCH_CHARS of text each; empty ones dropped."""
    batch, batch_chars, first = [], 0, 0
    for text in texts:
        if not text:
            continue
        batch.append(text)
        batch_chars += len(text)
        if batch_chars >= BATCH_CHARS:
            yield first, batch
            first += len(batch)
            batch, batch_chars = [], 0
    if batch:
        yield first, batch


_worker = {}  # per-process state set by init_worker: the encoding and the split rule


def init_worker(val_every: int, dtype: str) -> None:
    _worker.update(enc=load_tiktoken(ENCODING), val_every=val_every, dtype=dtype)


def encode_batch(task: tuple[int, list[str]]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Token ids for train and for val, each document followed by end-of-text; and the document counts."""
    first, texts = task
    enc, val_every = _worker["enc"], _worker["val_every"]
    ids = {"train": [], "val": []}
    n_docs = {"train": 0, "val": 0}
    for index, text in enumerate(texts, first):
        split = "val" if index % val_every == 0 else "train"
        ids[split] += enc.encode_ordinary(text)  # ordinary: a literal "<|endoftext|>" in a page is text
        ids[split].append(enc.eot_token)
        n_docs[split] += 1
    dtype = _worker["dtype"]
    return np.array(ids["train"], dtype), np.array(ids["val"], dtype), n_docs["train"], n_docs["val"]


def encode_in_order(
    tasks: Iterable[tuple[int, list[str]]], num_proc: int, val_every: int, dtype: str
) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """encode_batch over tasks, results in input order. At most 2 * num_proc tasks are in flight:
    Pool.imap would read ahead without limit and could hold the whole corpus in memory."""
    if num_proc == 1:
        init_worker(val_every, dtype)
        yield from map(encode_batch, tasks)
        return
    with Pool(num_proc, initializer=init_worker, initargs=(val_every, dtype)) as pool:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(encode_batch, (task,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def parse_args() -> Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="local corpus (see above); default: download from the hub")
    parser.add_argument(
        "--out_dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="where train.bin, val.bin and meta.json go (default: %(default)s)",
    )
    parser.add_argument(
        "--num_proc",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenising processes (default: %(default)s)",
    )
    parser.add_argument(
        "--val_every", type=int, default=2000, help="every N-th document goes to val (default: %(default)s)"
    )
    args = parser.parse_args()
    if args.num_proc < 1 or args.val_every < 2:
        parser.error("--num_proc must be at least 1 and --val_every at least 2")
    return args


def main() -> None:
    args = parse_args()
    enc = load_tiktoken(ENCODING)  # fail here, before any work, if the encoding is unavailable offline
    dtype = dtype_for_vocab(enc.n_vocab)
    texts, n_total = open_corpus(args.input, args.num_proc)
    n_docs = {"train": 0, "val": 0}
    meta = dict(tokenizer="tiktoken", encoding=ENCODING, eot_token=enc.eot_token, vocab_size=enc.n_vocab)
    with (
        TokenSetWriter(args.out_dir, dtype) as writer,
        tqdm(total=n_total, unit="doc", desc="tokenising") as progress,
    ):
        for train_ids, val_ids, n_train, n_val in encode_in_order(
            batches_of(texts), args.num_proc, args.val_every, dtype
        ):
            writer.write("train", train_ids)
            writer.write("val", val_ids)
            n_docs["train"] += n_train
            n_docs["val"] += n_val
            progress.update(n_train + n_val)
        if n_docs["train"] + n_docs["val"] == 0:
            raise DataError(f"no documents with text found in {args.input or HF_DATASET}")
        meta = writer.commit(meta)
    print(
        f"train {n_docs['train']:,} documents, {meta['train_tokens']:,} tokens; "
        f"val {n_docs['val']:,} documents, "
        f"{meta['val_tokens']:,} tokens ({meta['dtype']}); written to {args.out_dir}"
    )


if __name__ == "__main__":
    exit_on_error(main)
