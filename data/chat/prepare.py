"""Conversations for chat fine-tuning, rendered with a model's own chat template, with the loss mask of
the assistant's replies (chat.py says which tokens are learned).

python data/chat/prepare.py --input conversations.jsonl --tokenizer out-qwen3 --out_dir data/my_chat
python data/chat/prepare.py --hf_dataset HuggingFaceTB/smoltalk --hf_config all --tokenizer out-qwen3

--input: one {"messages": [{"role": ..., "content": ...}, ...]} per line. --hf_dataset: a Hugging Face
dataset with such a column (downloaded by the datasets library, or a local dataset folder). The last
--val_fraction of the conversations form the val split. Conversations longer than --max_tokens are
dropped and counted (a cut one would teach replies that stop mid-way); train.py also leaves out those
longer than its block_size + 1 and says how many.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, from any working dir
from chat import ChatFormat, Messages, check_messages, read_conversations
from data.common import DataError, TokenSetWriter, dtype_for_vocab
from runtime import exit_on_error


def hf_conversations(name: str, config: str | None, split: str, column: str) -> list[Messages]:
    try:
        import datasets
    except ImportError as e:
        raise DataError("--hf_dataset needs the datasets library: pip install datasets") from e
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the hub unreachable, no such dataset, config or split
        raise DataError(f"cannot load the dataset {name!r} ({type(e).__name__}: {e})") from e
    if column not in rows.column_names:
        raise DataError(
            f"the dataset {name!r} has no column {column!r}; it has {', '.join(rows.column_names)}"
        )
    return [check_messages(messages, f"{name} row {i}") for i, messages in enumerate(rows[column])]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="a JSONL file of conversations")
    source.add_argument("--hf_dataset", help="a Hugging Face dataset name or local dataset folder")
    parser.add_argument("--hf_config", default=None, help="the dataset's configuration (smoltalk: all)")
    parser.add_argument("--hf_split", default="train")
    parser.add_argument("--hf_column", default="messages")
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="a checkpoint folder or Hugging Face model folder"
    )
    parser.add_argument("--chat_template", type=Path, help="a Jinja chat template instead of the tokenizer's")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--max_tokens", type=int, default=4096, help="drop conversations longer than this")
    parser.add_argument(
        "--learn",
        choices=("assistant", "all"),
        default="assistant",
        help="the tokens the loss is on: the assistant's replies, or (to compare against) every token",
    )
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.max_tokens < 2:
        parser.error(f"--max_tokens must be at least 2, got {args.max_tokens}")
    return args


def main() -> None:
    args = parse_args()
    from checkpoint import tokenizer_entry_from_folder  # imports torch: after the arguments are checked
    from tokenizer import get_tokenizer

    entry = tokenizer_entry_from_folder(args.tokenizer)
    tokenizer = get_tokenizer(entry)
    chat = ChatFormat(tokenizer, args.chat_template, source=f"the tokenizer of {args.tokenizer}")
    if args.chat_template:
        entry["chat_template"] = chat.template  # travels with the data set into checkpoints and exports
    if args.input:
        conversations = read_conversations(args.input)
    else:
        conversations = hf_conversations(args.hf_dataset, args.hf_config, args.hf_split, args.hf_column)
    n_val = math.ceil(len(conversations) * args.val_fraction)
    if n_val >= len(conversations):
        raise DataError(f"{len(conversations)} conversation(s) cannot be split into train and val: give more")
    splits = {"train": conversations[:-n_val], "val": conversations[-n_val:]}
    meta = {**entry, "vocab_size": tokenizer.vocab_size, "chat": True, "end_of_turn": chat.end_of_turn}
    meta["learn"] = args.learn
    counts = {}
    with TokenSetWriter(args.out_dir, dtype_for_vocab(tokenizer.vocab_size), chat=True) as writer:
        for split, items in splits.items():
            kept = learned = 0
            for n, messages in enumerate(items, 1):
                ids, mask = chat.encode(messages, f"{split} conversation {n}")
                if args.learn == "all":  # every token but the first, which nothing predicts
                    mask = [0] + [1] * (len(ids) - 1)
                if len(ids) <= args.max_tokens:
                    writer.write(split, ids, mask)
                    kept, learned = kept + 1, learned + sum(mask)
            counts[split] = (kept, len(items) - kept, learned)
            meta |= {f"{split}_conversations": kept, f"{split}_dropped": len(items) - kept}
        meta = writer.commit(meta)
    for split, (kept, dropped, learned) in counts.items():
        print(
            f"{split}: {kept:,} conversations, {meta[f'{split}_tokens']:,} tokens, {learned:,} learned; "
            f"{dropped:,} dropped as longer than {args.max_tokens:,} tokens"
        )
    print(f"written to {args.out_dir}")


if __name__ == "__main__":
    exit_on_error(main)
