"""Generate text from a trained checkpoint, streaming it to stdout as it is generated.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
"""
import codecs
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional

import torch

from checkpoint import CheckpointError, load_model_and_tokenizer
from configurator import cli_config
from data.common import DataError, Tokenizer
from model import GPT

DESCRIPTION = """Generate text from out_dir/ckpt.pt with the tokenizer recorded in the checkpoint.

Output: each sample is the prompt followed by its continuation, and samples are separated by a line
of dashes. The samples are generated together as one batch: the first is streamed as its tokens are
generated, the others are printed when the batch is done. A one-line summary (tokens generated,
tokens/s, time to first token) goes to stderr, so stdout holds only text.

Prompts (start):
  ""          start from the end-of-text token (GPT-2 BPE), the tokenizer's own start token (imported
              Hugging Face models: BOS) or a newline (character-level models; an error if the
              vocabulary has no newline)
  FILE:path   read the prompt from a UTF-8 file; an error if it cannot be read
  longer than the model's context (block_size tokens): the model sees only the last block_size
              tokens, and a note says so on stderr
  characters outside a character-level vocabulary: an error naming them
A missing, corrupt or tokenizer-less checkpoint is an error. An error prints a message on stderr,
no traceback, and exits with status 1 (2 for an unknown key or a bad value)."""

SEPARATOR = "-" * 40
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SampleConfig:
    out_dir: str = "out"  # folder holding ckpt.pt, as written by train.py
    start: str = ""  # the prompt, or FILE:path to read it from a file; "" starts from scratch (see above)
    num_samples: int = 1  # samples generated together, as one batch
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 0 is greedy; below 1 sharpens the distribution, above 1 flattens it
    top_k: Optional[int] = 200  # sample only among the k most likely tokens; None for all
    top_p: Optional[float] = None  # sample only within the smallest set of probability >= top_p; None for all
    seed: int = 1337  # the same seed, checkpoint, prompt and device give the same samples
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bfloat16 on CUDA if supported, else float32), float32, bfloat16 or float16
    compile: bool = False  # torch.compile the model: a slow first token, faster ones after


def fail(message: str, status: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def check_values(cfg: SampleConfig) -> None:
    checks = [
        (cfg.num_samples >= 1, f"num_samples must be at least 1, got {cfg.num_samples}"),
        (cfg.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}"),
        (cfg.temperature >= 0, f"temperature must be 0 (greedy) or more, got {cfg.temperature}"),
        (cfg.top_k is None or cfg.top_k >= 1, f"top_k must be at least 1 or None, got {cfg.top_k}"),
        (cfg.top_p is None or 0 < cfg.top_p <= 1, f"top_p must be in (0, 1] or None, got {cfg.top_p}"),
        (cfg.dtype == "auto" or cfg.dtype in DTYPES, f"dtype must be auto, {', '.join(DTYPES)}; got {cfg.dtype!r}"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message, status=2)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps", status=2)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        fail(f"device {name!r} is not available on this machine; use --device=auto or --device=cpu", status=2)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def read_prompt(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    path = Path(start.removeprefix("FILE:"))
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        fail(f"cannot read the prompt file {path}: {e.strerror or e}")
    except UnicodeDecodeError as e:
        fail(f"the prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})")


def encode_prompt(text: str, tokenizer: Tokenizer) -> list[int]:
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:  # a character-level vocabulary lacks some of the prompt's characters
        fail(f"the prompt has {e}; a character-level model can read no others")
    if ids:  # even for "", a tokenizer may add its own start token (Hugging Face Llama: BOS)
        return ids
    if tokenizer.eot_token is not None:  # start where a document starts
        return [tokenizer.eot_token]
    try:
        return tokenizer.encode("\n")
    except ValueError:
        fail("an empty prompt starts from a newline, which this character-level vocabulary lacks; "
             "pass --start=TEXT")


def generate_and_print(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], prompt_text: str,
                       cfg: SampleConfig, device: torch.device, dtype: torch.dtype) -> None:
    idx = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    # Holds back the bytes of an unfinished character: a BPE token can end in the middle of one.
    first_row = codecs.getincrementaldecoder("utf-8")(errors="replace")
    new_tokens = []  # one (num_samples, 1) tensor per step
    print(prompt_text, end="", flush=True)
    torch.manual_seed(cfg.seed)  # seeds CUDA too; after loading, so the draws depend on nothing before
    started = time.perf_counter()
    first_token_s = 0.0
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        steps = model.generate_tokens(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
        for step, token in enumerate(steps):
            token = token.cpu()  # waits for the device, so the timings below are real
            if step == 0:
                first_token_s = time.perf_counter() - started
            new_tokens.append(token)
            print(first_row.decode(tokenizer.decode_bytes(token[0].tolist())), end="", flush=True)
    elapsed = time.perf_counter() - started
    print(first_row.decode(b"", final=True))
    for row in torch.cat(new_tokens, dim=1).tolist()[1:]:
        print(SEPARATOR)
        print(prompt_text + tokenizer.decode_bytes(row).decode("utf-8", errors="replace"))
    n_tokens = cfg.num_samples * len(new_tokens)
    print(f"{n_tokens} tokens ({cfg.num_samples} x {len(new_tokens)}) in {elapsed:.2f} s: "
          f"{n_tokens / elapsed:.1f} tokens/s, time to first token {first_token_s * 1000:.0f} ms", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> None:
    cfg = cli_config(SampleConfig(), argv, prog="sample.py", description=DESCRIPTION)
    check_values(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    prompt_text = read_prompt(cfg.start)
    try:
        model, tokenizer, _ = load_model_and_tokenizer(cfg.out_dir, device)
    except (CheckpointError, DataError, ValueError) as e:  # ValueError: an unknown tokenizer or bad model_args
        fail(str(e))
    prompt_ids = encode_prompt(prompt_text, tokenizer)
    block_size = model.config.block_size
    if len(prompt_ids) > block_size:
        print(f"note: the prompt is {len(prompt_ids)} tokens, longer than the model's context of {block_size}; "
              f"the model sees only its last {block_size} tokens", file=sys.stderr)
    if cfg.compile:
        model.compile()  # in place, so the calls generate_tokens makes to the model run compiled
    generate_and_print(model, tokenizer, prompt_ids, prompt_text, cfg, device, dtype)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit-time flush fails again
        sys.exit(1)
