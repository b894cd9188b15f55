"""Chat tokenizers and conversations that tests build offline: a byte-level BPE vocabulary trained in a
second with the `tokenizers` library, plus the special tokens and a chat template of one family's
shape (ChatML for Qwen, header tokens for Llama 3). Each template marks the assistant's reply and its
end-of-turn token with {% generation %}, as TRL's assistant-only loss needs; our own mask ignores them.
"""

import contextlib
import importlib.util
import io
import json
import random
import sys
from pathlib import Path
from unittest import mock

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("chat_prepare", REPO / "data" / "chat" / "prepare.py")
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
FAMILIES = {
    # family: (special tokens, the tokenizer config's named ones, template)
    "qwen3": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        CHATML,
    ),
    "llama": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"},
        LLAMA3,
    ),
}
WORDS = (
    "the cat sat on a mat and then it ran to the door because someone was there with food for it "
    "what is two plus three five apples are red the sky is blue please reverse these letters"
).split()


def corpus(rng: random.Random, lines: int = 400) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(lines)]


def save_chat_tokenizer(folder: Path, family: str, vocab_size: int = 300, template: str | None = "") -> Path:
    """A BPE tokenizer of family's special tokens, trained on a word corpus, saved as a Hugging Face
    tokenizer folder. template "" is the family's own; None saves none (a base model's tokenizer)."""
    special, named, family_template = FAMILIES[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(random.Random(0)), trainer)
    chat_template = family_template if template == "" else template
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **named)
    tok.save_pretrained(folder)
    return folder


def conversation(rng: random.Random) -> list[dict]:
    """A varied conversation: with or without a system prompt, one to three exchanges, content from
    one character to a few sentences, some of it only whitespace or with newlines."""

    def text() -> str:
        kind = rng.random()
        if kind < 0.1:
            return rng.choice([" ", "\n", "  x", "?", "a"])
        words = " ".join(rng.choices(WORDS, k=rng.randint(1, 15)))
        return words if kind < 0.8 else words + "\n\n" + words.upper()

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    return messages


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [conversation(rng) for _ in range(n)]


def write_jsonl(path: Path, items: list[list[dict]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for messages in items:
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def prepare_chat_set(folder: Path, family: str = "qwen3", n: int = 40, seed: int = 0, **options) -> Path:
    """A prepared chat set of n conversations (data/chat/prepare.py, in this process) in folder/data,
    with its tokenizer in folder/tokenizer; options are more of the script's flags, e.g. max_tokens=200."""
    tokenizer = save_chat_tokenizer(folder / "tokenizer", family)
    source = write_jsonl(folder / "conversations.jsonl", conversations(n, seed))
    flags = [f"--{key}={value}" for key, value in options.items()]
    argv = ["prepare.py", f"--input={source}", f"--tokenizer={tokenizer}", f"--out_dir={folder / 'data'}"]
    with mock.patch.object(sys, "argv", argv + flags), contextlib.redirect_stdout(io.StringIO()):
        prepare.main()
    return folder / "data"
