"""Tiny Shakespeare, character level: the vocabulary is the set of characters in the text; 90/10 split.

python data/shakespeare_char/prepare.py [--input PATH] [--out_dir DIR]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, from any working dir
from data.common import TokenSetWriter, dtype_for_vocab, read_input_text, split_text, text_parser
from runtime import exit_on_error


def main() -> None:
    parser = text_parser(__doc__, default_out_dir=Path(__file__).resolve().parent)
    args = parser.parse_args()

    text = read_input_text(args)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    train_text, val_text = split_text(text)
    with TokenSetWriter(args.out_dir, dtype_for_vocab(len(chars))) as writer:
        writer.write("train", [stoi[ch] for ch in train_text])
        writer.write("val", [stoi[ch] for ch in val_text])
        meta = writer.commit({"tokenizer": "char", "chars": chars, "vocab_size": len(chars)})
    print(
        f"vocab size {meta['vocab_size']:,} ({meta['dtype']}); train {meta['train_tokens']:,} tokens, "
        f"val {meta['val_tokens']:,} tokens; written to {args.out_dir}"
    )


if __name__ == "__main__":
    exit_on_error(main)
