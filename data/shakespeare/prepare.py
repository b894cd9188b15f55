"""Tiny Shakespeare with GPT-2 BPE (tiktoken "gpt2"); 90/10 split by characters.

python data/shakespeare/prepare.py [--input PATH] [--out_dir DIR]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, from any working dir
from data.common import (
    TokenSetWriter,
    add_text_input_args,
    dtype_for_vocab,
    read_input_text,
    split_text,
)
from runtime import exit_on_error
from tokenizer import load_tiktoken

ENCODING = "gpt2"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_text_input_args(parser, default_out_dir=Path(__file__).resolve().parent)
    args = parser.parse_args()

    text = read_input_text(args)
    enc = load_tiktoken(ENCODING)
    train_text, val_text = split_text(text)
    with TokenSetWriter(args.out_dir, dtype_for_vocab(enc.n_vocab)) as writer:
        # encode_ordinary: a literal "<|endoftext|>" in the text is text, not the special token
        writer.write("train", enc.encode_ordinary(train_text))
        writer.write("val", enc.encode_ordinary(val_text))
        meta = writer.commit(
            {
                "tokenizer": "tiktoken",
                "encoding": ENCODING,
                "eot_token": enc.eot_token,
                "vocab_size": enc.n_vocab,
            }
        )
    print(
        f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens ({meta['dtype']}); "
        f"written to {args.out_dir}"
    )


if __name__ == "__main__":
    exit_on_error(main)
