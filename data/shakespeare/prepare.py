"""Tiny Shakespeare with GPT-2 BPE (tiktoken "gpt2"); 90/10 split by characters. Or any UTF-8 text
(--input) with the tokenizer of a checkpoint or Hugging Face model folder (--tokenizer), for fine-tuning
that model on it.

python data/shakespeare/prepare.py [--input PATH] [--out_dir DIR] [--tokenizer DIR]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, from any working dir
from data.common import DataError, TokenSetWriter, dtype_for_vocab, read_input_text, split_text, text_parser
from runtime import exit_on_error
from tokenizer import get_tokenizer, load_tiktoken

ENCODING = "gpt2"


def main() -> None:
    parser = text_parser(__doc__, default_out_dir=Path(__file__).resolve().parent)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="a checkpoint folder (the tokenizer its ckpt.pt records) or a Hugging Face model folder to "
        "tokenize with instead of GPT-2 BPE; pass --out_dir too, to keep the GPT-2 set",
    )
    args = parser.parse_args()

    text = read_input_text(args)
    train_text, val_text = split_text(text)
    if args.tokenizer:
        from checkpoint import tokenizer_entry_from_folder  # imports torch: only here

        entry = tokenizer_entry_from_folder(args.tokenizer)
        tokenizer = get_tokenizer(entry)
        encode, meta = tokenizer.encode, {**entry, "vocab_size": tokenizer.vocab_size}
    else:
        enc = load_tiktoken(ENCODING)
        encode = enc.encode_ordinary  # a literal "<|endoftext|>" in the text is text, not the special token
        meta = dict(tokenizer="tiktoken", encoding=ENCODING, eot_token=enc.eot_token, vocab_size=enc.n_vocab)
    try:
        train_ids, val_ids = encode(train_text), encode(val_text)
    except ValueError as e:  # a character-level vocabulary lacks some of the text's characters
        raise DataError(f"the text has {e}") from e
    with TokenSetWriter(args.out_dir, dtype_for_vocab(meta["vocab_size"])) as writer:
        writer.write("train", train_ids)
        writer.write("val", val_ids)
        meta = writer.commit(meta)
    print(
        f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens ({meta['dtype']}); "
        f"written to {args.out_dir}"
    )


if __name__ == "__main__":
    exit_on_error(main)
