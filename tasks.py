"""Multiple-choice tasks (HellaSwag, task files of your own) scored as lm-evaluation-harness (lm-eval)
scores them: reading the tasks, splitting each choice's text into tokens as lm-eval does, and the
batched log-probabilities of the continuations. Chat tasks, task files of conversations, are
generative: the exact match of the greedy reply. eval.py scores them on the command line, train.py
at every evaluation (eval_tasks); eval.py's --help describes the scoring."""

import difflib
import json
import math
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from chat import ChatFormat, Messages, read_conversations, reply_tokens
from data.common import download
from generate import generate_tokens
from loss_eval import all_reduce_sum
from model import GPT
from runtime import ConfigError, UserError, world
from tokenizer import Tokenizer, get_tokenizer

TASK_DIR = Path(__file__).resolve().parent / "data" / "tasks"  # downloaded tasks are kept here
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
BUILTIN_TASKS = ("hellaswag",)
TASK_FORMAT = (
    'each line must be {"context": "...", "choices": ["...", "..."], "label": <index of the right one>}'
)


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int  # index of the right choice
    where: str = field(default="", compare=False)  # file and line, for error messages


@dataclass(frozen=True)
class ChatTaskOptions:
    """How chat tasks are scored (eval.py's flags of the same names)."""

    template: str | Path | None = None  # a Jinja chat template (a file, or its text) for the tokenizer's own
    max_new_tokens: int = 256  # a reply is cut after this many tokens (and then most likely wrong)
    normalize: bool = False  # compare replies and answers stripped of surrounding whitespace, case-folded


# --- tasks ----------------------------------------------------------------------------------------


def task_names(tasks: str, allowed: tuple[str, ...] = BUILTIN_TASKS) -> list[str]:
    """The comma-separated tasks, each a name in allowed or a task file (checked when it is read)."""
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    for name in names:
        if name not in allowed and not is_task_file(name):
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown task '{name}': {hint}use {', '.join(allowed)} or a task file (.jsonl)"
            )
    return names


def is_task_file(name: str) -> bool:
    return name.endswith(".jsonl") or os.sep in name or "/" in name or Path(name).is_file()


def task_label(name: str) -> str:
    """hellaswag, or a task file's name without folder and extension: the prefix of its metrics."""
    return Path(name).stem if is_task_file(name) else name


def load_task(name: str, max_examples: int | None = None) -> list[Example]:
    """The first max_examples (None: all) examples of a built-in task or a task file."""
    if name == "hellaswag":
        path = TASK_DIR / "hellaswag_val.jsonl"
        if not path.is_file():
            download(
                HELLASWAG_URL,
                path,
                offline_hint=f"or copy hellaswag_val.jsonl from its source into {TASK_DIR}",
            )
        examples = read_jsonl(path, hellaswag_example)
    else:
        examples = read_jsonl(Path(name), example_from_json)
    return examples[:max_examples]


def read_jsonl(path: Path, parse: Callable[[object], Example]) -> list[Example]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except FileNotFoundError:
        raise UserError(f"task file {path} not found: check the path given in tasks") from None
    except UnicodeDecodeError as e:
        raise UserError(f"task file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    examples = []
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            examples.append(replace(parse(json.loads(line)), where=f"{path}, line {line_number}"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {line_number}: not JSON ({e.msg}); {TASK_FORMAT}") from None
        except (KeyError, TypeError, ValueError) as e:
            reason = f"no {e}" if isinstance(e, KeyError) else str(e)
            raise UserError(f"{path}, line {line_number}: {reason}; {TASK_FORMAT}") from None
    if not examples:
        raise UserError(f"task file {path} holds no examples; {TASK_FORMAT}")
    return examples


def example_from_json(record: object) -> Example:
    """An example from a task file's line, refusing anything that could not be scored."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str) or not context.strip():  # a blank one has no tokens once stripped
        raise ValueError("context must be a string with some text in it (not only whitespace)")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise ValueError("choices must be a list of two or more non-empty strings")
    if type(label) is not int or not 0 <= label < len(choices):
        raise ValueError(
            f"label must be the index of the right choice, 0 to {len(choices) - 1}, got {label!r}"
        )
    return Example(context, tuple(choices), label)


def hellaswag_example(record: object) -> Example:
    """A line of HellaSwag's own jsonl, prepared as lm-eval's hellaswag task prepares it."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    context = record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize()
    choices = [hellaswag_text(ending) for ending in record["endings"]]
    return example_from_json(
        {"context": hellaswag_text(context), "choices": choices, "label": int(record["label"])}
    )


def hellaswag_text(text: str) -> str:
    """lm-eval's clean-up of HellaSwag's WikiHow half: " [title]" ends a sentence, other bracketed
    markers ("[header]", "[step]") go, and so does the double space they leave."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


# --- multiple-choice scoring --------------------------------------------------------------------


def encode_choices(tokenizer: Tokenizer, example: Example) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each choice, split as lm-eval splits them."""
    context = example.context.rstrip()
    continuations = [example.context[len(context) :] + " " + choice for choice in example.choices]
    try:
        context_ids = tokenizer.encode(context)
        wholes = [tokenizer.encode(context + continuation) for continuation in continuations]
    except ValueError as e:  # a character-level vocabulary lacks some of the text's characters
        raise UserError(
            f"{example.where}: the text has {e}; this checkpoint's tokenizer cannot read the task: "
            "score it with a model whose tokenizer covers the text (e.g. GPT-2 BPE)"
        ) from None
    rows = [(context_ids, whole[len(context_ids) :]) for whole in wholes]
    if not all(continuation for _, continuation in rows):
        raise UserError(f"{example.where}: a choice encodes to no tokens after the context")
    return rows


@torch.no_grad()
def continuation_logprobs(
    model: GPT,
    rows: list[tuple[list[int], list[int]]],
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> list[float]:
    """Sum of the log-probabilities of each row's continuation given its context, for rows of
    (context ids, continuation ids). Longest rows first, batch_size to a forward pass, so that a batch
    holds rows of similar length; each is padded on the right to the longest (causal attention: the
    padding never changes the positions before it)."""
    block_size = model.config.block_size
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))
    sums = [0.0] * len(rows)
    for first in range(0, len(rows), batch_size):
        indices = order[first : first + batch_size]
        batch = [rows[i] for i in indices]
        windows = [(context + continuation)[-(block_size + 1) :] for context, continuation in batch]
        T = max(len(window) for window in windows) - 1
        x = torch.zeros((len(batch), T), dtype=torch.long)
        y = torch.full((len(batch), T), -1, dtype=torch.long)  # -1: not scored (context, padding)
        for row, (window, (_, continuation)) in enumerate(zip(windows, batch)):
            n = len(window) - 1
            x[row, :n] = torch.tensor(window[:-1])
            y[row, n - len(continuation) : n] = torch.tensor(continuation)
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            logits, _ = model(x, y)  # (B, T, vocab)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up; a float64 model stays
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
        for i, row_sum in zip(indices, (-nll.view(len(batch), T).sum(dim=1)).tolist()):
            sums[i] = row_sum
    return sums


def choice_scores(
    model: GPT,
    tokenizer: Tokenizer,
    examples: list[Example],
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> list[list[float]]:
    """Each example's per-choice sums of continuation log-probabilities; the choices of all examples
    are batched together."""
    block_size = model.config.block_size
    rows = []
    for example in examples:
        encoded = encode_choices(tokenizer, example)
        longest = max(len(continuation) for _, continuation in encoded)
        if longest > block_size:
            raise UserError(
                f"{example.where}: a choice of {longest} tokens is longer than the model's context "
                f"(block_size {block_size}) and cannot be scored"
            )
        rows += encoded
    was_training = model.training
    model.eval()
    flat = continuation_logprobs(model, rows, batch_size, device, autocast)
    model.train(was_training)
    scores, start = [], 0
    for example in examples:
        scores.append(flat[start : start + len(example.choices)])
        start += len(example.choices)
    return scores


def best(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equals, as numpy's argmax


def accuracy(
    model: GPT,
    tokenizer: Tokenizer,
    examples: list[Example],
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> dict[str, float]:
    """acc and acc_norm over examples, shared out among the processes (each scores every world_size-th)."""
    rank, world_size = world()
    mine = examples[rank::world_size]
    passes = math.ceil(sum(len(example.choices) for example in mine) / batch_size)  # one row per choice
    most_passes = max_over_processes(passes, device)  # before any forward pass: collectives keep order
    all_scores = choice_scores(model, tokenizer, mine, batch_size, device, autocast)
    keep_in_step(model, most_passes - passes, device, autocast)
    right, right_norm = 0, 0
    for example, scores in zip(mine, all_scores):
        per_char = [score / len(choice) for score, choice in zip(scores, example.choices)]
        right += best(scores) == example.label
        right_norm += best(per_char) == example.label
    hits = all_reduce_sum(torch.tensor([right, right_norm], device=device))
    acc, acc_norm = (count / len(examples) for count in hits.tolist())
    return {"acc": acc, "acc_norm": acc_norm}


def max_over_processes(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


@torch.no_grad()
def keep_in_step(
    model: GPT, passes: int, device: torch.device, autocast: AbstractContextManager | None = None
) -> None:
    """passes forward passes of one token, results unused. A sharded model's forward is a collective
    (it gathers each block's weights), so every process must make as many as the busiest one: the
    processes' examples may have more choices on one than on another, or one example more."""
    for _ in range(passes):
        with autocast or nullcontext():
            model(torch.zeros((1, 1), dtype=torch.long, device=device))


def score_task(
    model: GPT,
    tokenizer: Tokenizer,
    name: str,
    max_examples: int | None,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
    chat: ChatTaskOptions = ChatTaskOptions(),
) -> tuple[dict[str, float], int]:
    """({"<task>/acc": ..., "<task>/acc_norm": ...}, examples scored) of one multiple-choice task;
    ({"<task>/exact_match": ...}, examples scored) of a chat task."""
    if is_chat_task(name):
        examples = load_chat_task(Path(name), max_examples)
        scores = exact_match(model, ChatFormat(tokenizer, chat.template), examples, chat, device, autocast)
    else:
        examples = load_task(name, max_examples)
        scores = accuracy(model, tokenizer, examples, batch_size, device, autocast)
    return {f"{task_label(name)}/{metric}": value for metric, value in scores.items()}, len(examples)


def score_tasks(
    model: GPT,
    meta: dict,
    tasks: str,
    max_examples: int,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> dict[str, float]:
    """The scores of each of the comma-separated tasks, through the tokenizer of a data set's meta.json
    and its chat template if its prepare had one (training scores them at each evaluation)."""
    tokenizer, chat, scores = get_tokenizer(meta), ChatTaskOptions(template=meta.get("chat_template")), {}
    for name in task_names(tasks):  # draws no random numbers
        scores |= score_task(model, tokenizer, name, max_examples, batch_size, device, autocast, chat)[0]
    return scores


# --- chat tasks: greedy replies, exact match ----------------------------------------------------------


def is_chat_task(name: str) -> bool:
    """Whether name is a task file of conversations, {"messages": [...]}, by its first line (the rest is
    checked when it is read; a file that is neither kind is refused as multiple choice)."""
    if not is_task_file(name) or not Path(name).is_file():
        return False
    try:
        with open(name, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "{}")
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and "messages" in record


def load_chat_task(path: Path, max_examples: int | None = None) -> list[Messages]:
    """The first max_examples (None: all) conversations of a chat task, each ending with the assistant's
    expected answer."""
    conversations = read_conversations(path)[:max_examples]
    for n, messages in enumerate(conversations, 1):
        if messages[-1]["role"] != "assistant":
            raise UserError(
                f"{path}, conversation {n}: the last message must be the assistant's expected answer, "
                f"not a {messages[-1]['role']} message"
            )
    return conversations


@torch.no_grad()
def greedy_reply(
    model: GPT, chat: ChatFormat, messages: Messages, max_new_tokens: int, device: torch.device
) -> list[int]:
    """The tokens of the model's greedy reply to messages, up to its end of turn. A prompt longer than
    block_size keeps its end, as generate_tokens does. A sharded model decodes all max_new_tokens (a
    forward pass each) whatever the reply's length, so that every process makes as many collectives."""
    idx = torch.tensor([chat.prompt(messages)], dtype=torch.long, device=device)
    steps = generate_tokens(model, idx, max_new_tokens, temperature=0.0)
    if isinstance(model, FSDPModule):
        steps = (token for token in list(steps))  # every step taken before the reply is cut
    return [int(token) for token in reply_tokens(steps, chat.stop_ids)]


def exact_match(
    model: GPT,
    chat: ChatFormat,
    examples: list[Messages],
    options: ChatTaskOptions,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> dict[str, float]:
    """The fraction of examples whose greedy reply to all but their last message is that message's
    content, shared out among the processes (each scores every world_size-th)."""
    rank, world_size = world()
    was_training = model.training
    model.eval()
    right = 0
    for messages in examples[rank::world_size]:
        with autocast or nullcontext():
            ids = greedy_reply(model, chat, messages[:-1], options.max_new_tokens, device)
        reply, answer = chat.tok.decode(ids), messages[-1]["content"]
        if options.normalize:
            reply, answer = reply.strip().casefold(), answer.strip().casefold()
        right += reply == answer
    if isinstance(model, FSDPModule) and rank >= len(examples) % world_size > 0:  # one example fewer
        keep_in_step(model, options.max_new_tokens, device, autocast)
    model.train(was_training)
    hits = all_reduce_sum(torch.tensor([right], device=device))
    return {"exact_match": hits.item() / len(examples)}
