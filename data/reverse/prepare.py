"""A synthetic chat task for showing that chat fine-tuning teaches something: "reverse: q w e r" is
answered "r e w q". Writes, into --out_dir (default: this folder):
  tokenizer/       a byte-level BPE vocabulary of --vocab_size trained on Tiny Shakespeare, with ChatML's
                   special tokens and chat template (<|im_start|>, <|im_end|>: a turn's end to learn)
  text/            Tiny Shakespeare in that vocabulary, to pretrain on (train.bin, val.bin, meta.json)
  train.jsonl      --train conversations of 3 to 7 random letters each
  test.jsonl       --test held-out ones (no letter string of them is in train.jsonl): eval.py's task

python data/reverse/prepare.py [--input PATH] [--out_dir DIR]
then the recipe in docs/chat.md: pretrain on text/, data/chat/prepare.py on train.jsonl, fine-tune,
eval.py --tasks=data/reverse/test.jsonl.
"""

import json
import random
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, from any working dir
from data.common import TokenSetWriter, dtype_for_vocab, read_input_text, split_text, text_parser
from runtime import exit_on_error
from tokenizer import get_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (  # the {% generation %} markers are for TRL's assistant-only loss; our mask does not need them
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def reversal(letters: str) -> list[dict]:
    return [
        {"role": "user", "content": "reverse: " + " ".join(letters)},
        {"role": "assistant", "content": " ".join(reversed(letters))},
    ]


def letter_strings(rng: random.Random, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """n_train + n_test distinct random strings of 3 to 7 lowercase letters."""
    seen: dict[str, None] = {}
    while len(seen) < n_train + n_test:
        seen[("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 7))))] = None
    strings = list(seen)
    return strings[:n_train], strings[n_train:]


def save_tokenizer(text: str, vocab_size: int, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(text.splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = text_parser(__doc__, default_out_dir=Path(__file__).resolve().parent)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--train", type=int, default=20000, help="training conversations")
    parser.add_argument("--test", type=int, default=200, help="held-out conversations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    text = read_input_text(args)
    save_tokenizer(text, args.vocab_size, args.out_dir / "tokenizer")
    entry = {"tokenizer": "hf", "path": str((args.out_dir / "tokenizer").resolve())}
    tokenizer = get_tokenizer(entry)
    train_text, val_text = split_text(text)
    with TokenSetWriter(args.out_dir / "text", dtype_for_vocab(tokenizer.vocab_size)) as writer:
        writer.write("train", tokenizer.encode(train_text))
        writer.write("val", tokenizer.encode(val_text))
        meta = writer.commit({**entry, "vocab_size": tokenizer.vocab_size})
    train, test = letter_strings(random.Random(args.seed), args.train, args.test)
    for name, strings in (("train", train), ("test", test)):
        with open(args.out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"messages": reversal(s)}) + "\n" for s in strings)
    print(
        f"tokenizer of {tokenizer.vocab_size} tokens; text: train {meta['train_tokens']:,} tokens, val "
        f"{meta['val_tokens']:,}; {len(train):,} training and {len(test):,} held-out conversations; "
        f"written to {args.out_dir}"
    )


if __name__ == "__main__":
    exit_on_error(main)
