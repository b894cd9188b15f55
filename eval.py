"""Evaluate a checkpoint beyond its val loss: bits per byte, and multiple-choice tasks scored as
lm-evaluation-harness (lm-eval) scores them.

    python eval.py --out_dir=out-shakespeare-char                         # bits per byte (bpb)
    python eval.py --out_dir=out-x --tasks=bpb,hellaswag --max_examples=1000
    torchrun --standalone --nproc_per_node=8 eval.py --out_dir=out-x --tasks=hellaswag
"""

import difflib
import json
import math
import os
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import load_model_and_tokenizer
from configurator import parse_config
from data.common import download
from model import GPT
from runtime import (
    ConfigError,
    UserError,
    atomic_write,
    exit_on_error,
    pick_device,
    pick_dtype,
    print0,
    world,
)
from tokenizer import Tokenizer, tokenizer_entry

DESCRIPTION = """Evaluate out_dir/ckpt.pt on the tasks listed in --tasks (comma-separated):

  bpb          bits per byte over the val split of a prepared data set: the loss of every token but the
               first, in bits, summed, over the number of UTF-8 bytes those tokens decode to. Unlike the
               loss per token, it compares models with different tokenizers.
  hellaswag    HellaSwag's 10,042 validation examples, downloaded on first use from its public source
               into data/tasks/ (offline: put hellaswag_val.jsonl there yourself)
  PATH.jsonl   a task file of your own, one example per line:
               {"context": "The cat sat on the", "choices": ["mat.", "moon."], "label": 0}
               context a non-empty string, choices two or more strings, label the index of the right one

Multiple-choice scoring, as lm-eval's defaults: each choice is scored by the sum of the log-probabilities
of the continuation " " + choice after the context. acc is the fraction of examples whose best-scoring
choice is the label; acc_norm divides each sum by len(choice) in characters first. A tie goes to the
first choice. Text is tokenized as lm-eval does: whitespace ending the context moves to the front of
the continuation, context + continuation is encoded whole, and the continuation is what follows the
context's own tokens. A context too long for the model loses its beginning: the model sees the last
block_size tokens of context + continuation (the very last token is only predicted), as lm-eval
truncates; a continuation of more than block_size tokens is an error.

Under torchrun the examples (bpb: the windows of the val split) are shared out among the processes
and the results summed over them. Errors are one line on stderr: exit 2 for a bad flag or an unknown
task, 1 for bad input (a missing or malformed task file, text the checkpoint's tokenizer cannot encode)."""

REPO_DIR = Path(__file__).resolve().parent
TASK_DIR = REPO_DIR / "data" / "tasks"  # downloaded tasks are kept here
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
BUILTIN_TASKS = ("hellaswag",)
TASK_FORMAT = (
    'each line must be {"context": "...", "choices": ["...", "..."], "label": <index of the right one>}'
)


@dataclass
class EvalConfig:
    out_dir: str = "out"  # folder holding ckpt.pt, as written by train.py
    tasks: str = "bpb"  # comma-separated: bpb, hellaswag, or task files (PATH.jsonl)
    data_dir: str | None = None  # prepared data set for bpb; None = the one the checkpoint was trained on
    max_examples: int | None = None  # score only the first N examples of each multiple-choice task
    batch_size: int = 32  # sequences per forward pass: val windows for bpb, choices for the other tasks
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float16 on GPUs without bf16, else float32) or one of those
    json: str | None = None  # also write the results to this file as a JSON object


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int  # index of the right choice
    where: str = field(default="", compare=False)  # file and line, for error messages


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
    if not isinstance(context, str) or not context:
        raise ValueError("context must be a non-empty string")
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
    right, right_norm = 0, 0
    for example, scores in zip(mine, choice_scores(model, tokenizer, mine, batch_size, device, autocast)):
        per_char = [score / len(choice) for score, choice in zip(scores, example.choices)]
        right += best(scores) == example.label
        right_norm += best(per_char) == example.label
    hits = torch.tensor([right, right_norm], device=device)
    if dist.is_initialized():
        dist.all_reduce(hits)
    acc, acc_norm = (count / len(examples) for count in hits.tolist())
    return {"acc": acc, "acc_norm": acc_norm}


def score_task(
    model: GPT,
    tokenizer: Tokenizer,
    name: str,
    max_examples: int | None,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> tuple[dict[str, float], int]:
    """({"<task>/acc": ..., "<task>/acc_norm": ...}, examples scored) of one multiple-choice task."""
    examples = load_task(name, max_examples)
    scores = accuracy(model, tokenizer, examples, batch_size, device, autocast)
    return {f"{task_label(name)}/{metric}": value for metric, value in scores.items()}, len(examples)


def task_scores(
    model: GPT,
    tokenizer: Tokenizer,
    tasks: str,
    max_examples: int | None,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> dict[str, float]:
    """acc and acc_norm of each multiple-choice task in tasks (comma-separated) on its first max_examples
    examples: what train.py logs at every evaluation. Draws no random numbers."""
    results = {}
    for name in task_names(tasks):
        results.update(score_task(model, tokenizer, name, max_examples, batch_size, device, autocast)[0])
    return results


# --- bits per byte --------------------------------------------------------------------------------


def bits_per_byte(
    model: GPT,
    tokenizer: Tokenizer,
    tokens: np.ndarray,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> tuple[float, int]:
    """(bits per byte, bytes): the loss of every token of tokens but the first, in bits, summed, over
    the UTF-8 bytes those tokens decode to."""
    from train import full_val_loss  # train.py imports this file

    mean_loss = full_val_loss(model, tokens, model.config.block_size, batch_size, device, autocast)  # nats
    n_bytes = len(tokenizer.decode_bytes(np.asarray(tokens[1:], dtype=np.int64).tolist()))
    return mean_loss * (len(tokens) - 1) / math.log(2) / n_bytes, n_bytes


def val_tokens(cfg: EvalConfig, checkpoint: dict) -> tuple[Path, np.ndarray]:
    """The val split bpb is computed on, from a data set prepared with the checkpoint's tokenizer."""
    from train import load_meta

    trained_on = checkpoint.get("config") or {}
    if cfg.data_dir:
        data_dir = Path(cfg.data_dir)
    elif trained_on.get("data_dir") or trained_on.get("dataset"):
        data_dir = Path(trained_on.get("data_dir") or REPO_DIR / "data" / trained_on["dataset"])
    else:
        raise ConfigError("the checkpoint records no data set (an imported model?): pass --data_dir for bpb")
    meta = load_meta(data_dir)
    if tokenizer_entry(meta) != checkpoint["tokenizer"]:
        raise UserError(
            f"{data_dir} was prepared with another tokenizer than the checkpoint's "
            f"({meta.get('tokenizer')} vs {checkpoint['tokenizer'].get('tokenizer')}): bpb needs the val "
            "split in the model's own tokens; pass --data_dir of a data set prepared for this model"
        )
    return data_dir, np.memmap(data_dir / "val.bin", dtype=meta["dtype"], mode="r")


# --- the command line ----------------------------------------------------------------------------


def check_values(cfg: EvalConfig) -> list[str]:
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise ConfigError(f"max_examples must be at least 1 or None, got {cfg.max_examples}")
    names = task_names(cfg.tasks, ("bpb", *BUILTIN_TASKS))
    if not names:
        raise ConfigError("tasks is empty: name at least one of bpb, hellaswag or a task file")
    return names


def evaluate(cfg: EvalConfig) -> dict[str, float]:
    """Every task of cfg.tasks on out_dir's checkpoint; prints each result on rank 0 and returns them all."""
    names = check_values(cfg)
    distributed = "RANK" in os.environ  # started by torchrun
    device = pick_device(cfg.device, int(os.environ["LOCAL_RANK"]) if distributed else None)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        dtype = pick_dtype(cfg.dtype, device)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        model, tokenizer, checkpoint = load_model_and_tokenizer(cfg.out_dir, device)
        results = {}
        for name in names:
            started = time.time()
            if name == "bpb":
                data_dir, tokens = val_tokens(cfg, checkpoint)
                results["bpb"], n_bytes = bits_per_byte(
                    model, tokenizer, tokens, cfg.batch_size, device, autocast
                )
                seconds = time.time() - started
                print0(
                    f"bpb {results['bpb']:.4f}: bits per byte over the val split of {data_dir} "
                    f"({len(tokens) - 1:,} tokens predicted, {n_bytes:,} bytes; {seconds:.1f} s)"
                )
            else:
                scores, n = score_task(
                    model, tokenizer, name, cfg.max_examples, cfg.batch_size, device, autocast
                )
                results.update(scores)
                seconds = time.time() - started
                shown = ", ".join(f"{key.split('/')[1]} {value:.4f}" for key, value in scores.items())
                print0(f"{task_label(name)}: {shown} ({n:,} examples, {seconds:.1f} s, {n / seconds:,.1f}/s)")
        if cfg.json and world()[0] == 0:
            text = json.dumps(results, indent=2) + "\n"
            atomic_write(cfg.json, lambda f: f.write(text.encode()))
        return results
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    def run() -> None:
        evaluate(parse_config(EvalConfig(), argv, prog="eval.py", description=DESCRIPTION))

    exit_on_error(run)


if __name__ == "__main__":
    main()
