"""Generate text from a trained checkpoint, streaming it to stdout as it is generated.

python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
"""

import codecs
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from chat import ChatFormat, Messages, chat_template, check_text, read_text_file, reply_tokens
from checkpoint import load_model_and_tokenizer
from configurator import AT_LEAST_1, AT_LEAST_1_OR_NONE, NOT_NEGATIVE, check_values, parse_config
from generate import COMPILE_MIN_TOKENS, compile_decode_step, generate_tokens, kv_cache_length, should_compile
from memory import check_kv_cache_fits
from model import GPT
from runtime import ConfigError, UserError, autocast, exit_on_error, pick_device, pick_dtype
from speculative import Draft, PromptLookup, Stats, check_draft, speculative_tokens
from tokenizer import Tokenizer

DESCRIPTION = f"""Generate text from out_dir/ckpt.pt with the tokenizer recorded in the checkpoint.

Output: each sample is the prompt followed by its continuation, and samples are separated by a line
of dashes. The samples are generated together as one batch: the first is streamed as its tokens are
generated, the others are printed when the batch is done. A one-line summary (tokens generated,
tokens/s, time to first token) goes to stderr, so stdout holds only text. Tokens/s counts the
generation only; compiling, done before it, gets a line of its own.

Compiling (compile): the prompt is prefilled eagerly, then each new token runs one compiled decode
step whose shapes never change (on CUDA replayed as a CUDA graph). By default sample.py compiles
when max_new_tokens is at least {COMPILE_MIN_TOKENS:,}: below that the compile (seconds to tens of seconds
on a CPU, less when torch's on-disk compile cache is warm) costs more time than it saves; bench.py
prints both, and the tokens that repay a compile, for the Shakespeare char model. --compile=True or
--compile=False overrides the rule.

Prompts (start):
  ""          start from the end-of-text token (GPT-2 BPE), the tokenizer's own start token (imported
              Hugging Face models: BOS) or a newline (character-level models; an error if the
              vocabulary has no newline)
  FILE:path   read the prompt from a UTF-8 file; an error if it cannot be read
  longer than the model's context (block_size tokens): the model sees only the last block_size
              tokens, and a note says so on stderr
  characters outside a character-level vocabulary: an error naming them
The KV cache holds num_samples x min(block_size, prompt + max_new_tokens) positions (a sliding-window
model: at most its window); one larger than the memory free on the device is refused.
Speculative decoding (draft, prompt_lookup): a smaller checkpoint with the same tokenizer (draft), or
the tokens that followed the latest earlier occurrence of the context's last n-gram (prompt_lookup=n),
propose draft_tokens tokens, and the model verifies them all in one forward pass. The output is the
same as without: greedy token for token, sampling in distribution. One sample at a time; the summary
adds the share of proposals kept and the tokens per model step.
Chat (chat=True): a conversation with a chat model, one whose Hugging Face tokenizer has a chat
template (its own, the one data/chat/prepare.py --chat_template recorded, or --chat_template=FILE).
Each user message (a line of stdin; a blank line or the end of input ends the chat; with start, its
one message, printed reply and exit) joins the history, with system's message first if given. The
template renders the whole history plus the generation prompt, prefilled afresh every turn: the KV
cache is not carried over, so the model sees exactly what transformers' apply_chat_template gives.
The reply streams to stdout, one line after it, until the end-of-turn token (or end of text), and
joins the history; one that reaches max_new_tokens first is cut there, with a note on stderr. A
history longer than block_size loses its oldest exchanges, with a note; a single message too long is
an error. temperature=0 is greedy, as convert.py export's generate(do_sample=False). One reply at a
time, eagerly: num_samples, compile, draft and prompt_lookup keep their defaults. A tokenizer with no
template, a character-level or a tiktoken one is an error.
A missing, corrupt or tokenizer-less checkpoint is an error. An error prints a message on stderr,
no traceback, and exits with status 1 (2 for an unknown key or a bad value, as in every CLI here)."""

SEPARATOR = "-" * 40


@dataclass
class SampleConfig:
    out_dir: str = "out"  # folder holding ckpt.pt, as written by train.py
    start: str = ""  # the prompt, or FILE:path to read it from a file; "" starts from scratch (see above)
    num_samples: int = 1  # samples generated together, as one batch
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 0 is greedy; below 1 sharpens the distribution, above 1 flattens it
    top_k: int | None = 200  # sample only among the k most likely tokens; None for all
    top_p: float | None = None  # sample only within the smallest set of probability >= top_p; None for all
    seed: int = 1337  # the same seed, checkpoint, prompt and device give the same samples
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float16 on GPUs without bf16, else float32) or one of those
    compile: bool | None = None  # torch.compile the decode step; None = by max_new_tokens (see above)
    draft: str | None = None  # a smaller checkpoint with the same tokenizer proposes tokens (see above)
    prompt_lookup: int = 0  # propose what followed the context's last n-gram, n up to this; 0 = off
    draft_tokens: int = 4  # tokens proposed per verification, with draft or prompt_lookup
    chat: bool = False  # a conversation with a chat model: user messages from stdin, or start (see above)
    chat_template: str | None = None  # chat: a Jinja template file in place of the checkpoint's own
    system: str = ""  # chat: the system message the conversation starts with; "" for none


def read_prompt(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    return read_text_file(Path(start.removeprefix("FILE:")), "the prompt file")


def encode_prompt(text: str, tokenizer: Tokenizer) -> list[int]:
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:  # a character-level vocabulary lacks some of the prompt's characters
        raise UserError(f"the prompt has {e}; a character-level model can read no others") from None
    if ids:  # even for "", a tokenizer may add its own start token (Hugging Face Llama: BOS)
        return ids
    if tokenizer.eot_token is not None:  # start where a document starts
        return [tokenizer.eot_token]
    try:
        return tokenizer.encode("\n")
    except ValueError:
        raise UserError(
            "an empty prompt starts from a newline, which this character-level vocabulary lacks; "
            "pass --start=TEXT"
        ) from None


def generate_and_print(
    tokenizer: Tokenizer,
    stream: Callable[[bool], Iterator[torch.Tensor]],
    prompt_text: str,
    cfg: SampleConfig,
    device: torch.device,
    dtype: torch.dtype,
    stats: Stats | None,
) -> list[int]:
    """Print the tokens stream(compile) generates, (num_samples, 1) each, and a summary on stderr;
    the first sample's tokens."""
    # Holds back the bytes of an unfinished character: a BPE token can end in the middle of one.
    first_row = codecs.getincrementaldecoder("utf-8")(errors="replace")
    new_tokens = []  # one (num_samples, 1) tensor per step
    compile = should_compile(cfg.compile, cfg.max_new_tokens)
    with autocast(device, dtype):
        if compile:
            compile_s = compile_decode_step(stream(True))
            print(f"compiled the decode step in {compile_s:.1f} s (not counted below)", file=sys.stderr)
        print(prompt_text, end="", flush=True)
        torch.manual_seed(cfg.seed)  # seeds CUDA too; after loading and compiling, so nothing before counts
        started = time.perf_counter()
        first_token_s = 0.0
        for step, token in enumerate(stream(compile)):
            token = token.cpu()  # waits for the device, so the timings below are real
            if step == 0:
                first_token_s = time.perf_counter() - started
            new_tokens.append(token)
            print(first_row.decode(tokenizer.decode_bytes(token[0].tolist())), end="", flush=True)
    elapsed = time.perf_counter() - started
    print(first_row.decode(b"", final=True))
    rows = torch.cat(new_tokens, dim=1).tolist() if new_tokens else [[]]  # a chat reply may end at once
    for row in rows[1:]:
        print(SEPARATOR)
        print(prompt_text + tokenizer.decode_bytes(row).decode("utf-8", errors="replace"))
    n_tokens = cfg.num_samples * len(new_tokens)
    print(
        f"{n_tokens} tokens ({cfg.num_samples} x {len(new_tokens)}) in {elapsed:.2f} s: "
        f"{n_tokens / elapsed:.1f} tokens/s, time to first token {first_token_s * 1000:.0f} ms"
        + (f"; {stats.summary()}" if stats else ""),
        file=sys.stderr,
    )
    return rows[0]


def token_stream(
    cfg: SampleConfig, model: GPT, checkpoint: dict, prompt_ids: list[int], device: torch.device
) -> tuple[Callable[[bool], Iterator[torch.Tensor]], Stats | None]:
    """stream(compile), the generation to print: plain, or speculative (then with its Stats)."""
    idx = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    sampling = (cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.draft is None and not cfg.prompt_lookup:
        return lambda compile: generate_tokens(model, idx, cfg.max_new_tokens, *sampling, compile), None
    if cfg.draft is not None and cfg.prompt_lookup:
        raise ConfigError("draft and prompt_lookup are two ways of proposing tokens: set one of them")
    if cfg.num_samples != 1:
        raise ConfigError(
            f"speculative decoding generates one sample at a time: num_samples=1, not {cfg.num_samples}"
        )
    draft, same_tokenizer = None, True
    if cfg.draft is not None:
        draft, _, draft_checkpoint = load_model_and_tokenizer(cfg.draft, device)
        same_tokenizer = draft_checkpoint["tokenizer"] == checkpoint["tokenizer"]
    context = min(model.config.block_size, len(prompt_ids) + cfg.max_new_tokens)
    check_draft(model, draft, same_tokenizer, cfg.draft_tokens, context)
    stats = Stats()

    def stream(compile: bool) -> Iterator[torch.Tensor]:
        vars(stats).update(vars(Stats()))  # counts of this stream only
        if draft is None:
            proposer = PromptLookup(cfg.prompt_lookup)
        else:
            length = kv_cache_length(draft.config, len(prompt_ids), cfg.max_new_tokens, cfg.draft_tokens)
            proposer = Draft(draft, length, compile)
        return speculative_tokens(
            model, proposer, idx, cfg.max_new_tokens, cfg.draft_tokens, sampling, compile, stats
        )

    return stream, stats


def user_messages(start: str) -> Iterator[str]:
    """The user's messages of a chat: start's one (text or FILE:path), else stdin's lines up to a blank
    line or the end of input (a "> " prompt on stderr when stdin is a terminal)."""
    if start:
        message = read_prompt(start)
        if not message.strip():
            raise UserError("the chat message in start is empty: give it some text")
        yield check_text(message, "the chat message in start")
        return
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError as e:
            raise UserError(f"the chat's input is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not line.strip():
            return
        yield line.rstrip("\r\n")


def fitted_prompt(chat: ChatFormat, history: Messages, block_size: int) -> list[int]:
    """The tokens of history plus the generation prompt, within block_size: the oldest exchanges (a
    user message and its reply; a system message stays) are dropped from history until they fit, with
    a note on stderr. The latest message alone too long is an error, history untouched: a cut template
    is no prompt."""
    first = 1 if history[0]["role"] == "system" else 0
    if len(alone := chat.prompt([*history[:first], history[-1]])) > block_size:
        raise UserError(
            f"the message{' and the system message take' if first else ' takes'} {len(alone)} tokens in "
            f"the chat template, more than the model's context (block_size {block_size}): send a shorter one"
        )
    dropped = 0
    while len(prompt_ids := chat.prompt(history)) > block_size:
        del history[first : first + 2]
        dropped += 1
    if dropped:
        print(
            f"note: the conversation outgrew the model's context (block_size {block_size}): "
            f"dropped its oldest {dropped} exchange(s)",
            file=sys.stderr,
        )
    return prompt_ids


def check_chat_flags(cfg: SampleConfig) -> None:
    if not cfg.chat and (cfg.chat_template is not None or cfg.system):
        raise ConfigError("chat_template and system are for a chat: add --chat")
    if cfg.chat and (cfg.num_samples != 1 or cfg.compile or cfg.draft is not None or cfg.prompt_lookup):
        raise ConfigError(
            "chat decodes one reply at a time, eagerly: leave num_samples, compile, draft and "
            "prompt_lookup at their defaults"
        )


def converse(
    cfg: SampleConfig, model: GPT, tokenizer: Tokenizer, entry: dict, device: torch.device, dtype: torch.dtype
) -> None:
    """--chat: each user message is added to the history, and the template renders the whole history
    plus the generation prompt, prefilled afresh each turn (no KV cache carried over: a template may
    render earlier turns differently once later ones follow, and a reply's text may encode to other
    tokens than those generated; so the model sees what transformers would). The reply is streamed,
    up to its end-of-turn token (or end of text), and joins the history."""
    cfg = replace(cfg, compile=False)  # each turn has its own cache length: a compile would not pay
    chat = ChatFormat(tokenizer, chat_template(entry, cfg.chat_template), f"the tokenizer of {cfg.out_dir}")
    history = [{"role": "system", "content": check_text(cfg.system, "system")}] if cfg.system else []
    sampling = (cfg.temperature, cfg.top_k, cfg.top_p)
    for message in user_messages(cfg.start):
        history.append({"role": "user", "content": message})
        try:
            prompt_ids = fitted_prompt(chat, history, model.config.block_size)
        except UserError as e:
            if cfg.start:  # the one message of the chat
                raise
            print(f"error: {e}; the chat goes on without it", file=sys.stderr)
            history.pop()
            continue
        check_kv_cache_fits(model.config, 1, len(prompt_ids), cfg.max_new_tokens, device, dtype)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)

        def stream(compile: bool) -> Iterator[torch.Tensor]:
            return reply_tokens(generate_tokens(model, idx, cfg.max_new_tokens, *sampling), chat.stop_ids)

        reply = generate_and_print(tokenizer, stream, "", cfg, device, dtype, None)
        if len(reply) == cfg.max_new_tokens:
            print(
                f"note: the reply reached max_new_tokens={cfg.max_new_tokens} before its end of turn; "
                "it is cut there",
                file=sys.stderr,
            )
        history.append({"role": "assistant", "content": tokenizer.decode(reply)})


def sample(cfg: SampleConfig) -> None:
    check_values(
        cfg,
        {
            "num_samples": AT_LEAST_1,
            "max_new_tokens": AT_LEAST_1,
            "temperature": (lambda v: v >= 0, "must be 0 (greedy) or more"),
            "top_k": AT_LEAST_1_OR_NONE,
            "top_p": (lambda v: v is None or 0 < v <= 1, "must be in (0, 1] or None"),
            "seed": (lambda v: 0 <= v < 2**63, "must be in [0, 2**63)"),
            "prompt_lookup": NOT_NEGATIVE,
        },
    )
    check_chat_flags(cfg)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.chat:
        model, tokenizer, checkpoint = load_model_and_tokenizer(cfg.out_dir, device)
        converse(cfg, model, tokenizer, checkpoint["tokenizer"], device, dtype)
        return
    prompt_text = read_prompt(cfg.start)
    model, tokenizer, checkpoint = load_model_and_tokenizer(cfg.out_dir, device)
    prompt_ids = encode_prompt(prompt_text, tokenizer)
    block_size = model.config.block_size
    if len(prompt_ids) > block_size:
        print(
            f"note: the prompt is {len(prompt_ids)} tokens, longer than the model's context of {block_size}; "
            f"the model sees only its last {block_size} tokens",
            file=sys.stderr,
        )
    check_kv_cache_fits(model.config, cfg.num_samples, len(prompt_ids), cfg.max_new_tokens, device, dtype)
    stream, stats = token_stream(cfg, model, checkpoint, prompt_ids, device)
    generate_and_print(tokenizer, stream, prompt_text, cfg, device, dtype, stats)


def main(argv: list[str] | None = None) -> None:
    exit_on_error(
        lambda: sample(parse_config(SampleConfig(), argv, prog="sample.py", description=DESCRIPTION))
    )


if __name__ == "__main__":
    main()
