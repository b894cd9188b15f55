"""Evaluate a checkpoint beyond its val loss: bits per byte, multiple-choice tasks scored as
lm-evaluation-harness (lm-eval) scores them, and chat tasks scored by the exact match of greedy replies.

    python eval.py --out_dir=out-shakespeare-char                         # bits per byte (bpb)
    python eval.py --out_dir=out-x --tasks=bpb,hellaswag --max_examples=1000
    torchrun --standalone --nproc_per_node=8 eval.py --out_dir=out-x --tasks=hellaswag
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chat import chat_template
from checkpoint import load_model_and_tokenizer
from configurator import AT_LEAST_1, AT_LEAST_1_OR_NONE, check_values, parse_config
from dataset import load_meta, read_checked_tokens, resolve_data_dir
from distributed import processes
from loss_eval import bits_per_byte
from runtime import ConfigError, UserError, atomic_write, autocast, exit_on_error, pick_dtype, print0, world
from tasks import BUILTIN_TASKS, ChatTaskOptions, score_task, task_label, task_names
from tokenizer import tokenizer_entry_from_meta

DESCRIPTION = """Evaluate out_dir/ckpt.pt on the tasks listed in --tasks (comma-separated):

  bpb          bits per byte over the val split of a prepared data set: the loss of every token but the
               first, in bits, summed, over the number of UTF-8 bytes those tokens decode to. Unlike the
               loss per token, it compares models with different tokenizers.
  hellaswag    HellaSwag's 10,042 validation examples, downloaded on first use from its public source
               into data/tasks/ (offline: put hellaswag_val.jsonl there yourself)
  PATH.jsonl   a task file of your own, one example per line:
               {"context": "The cat sat on the", "choices": ["mat.", "moon."], "label": 0}
               context a non-empty string, choices two or more strings, label the index of the right one
  CHAT.jsonl   a chat task: a task file of conversations, told apart by its first line's "messages":
               {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]}
               whose last message is the assistant's expected answer (chat.py checks the rest)

Multiple-choice scoring, as lm-eval's defaults: each choice is scored by the sum of the log-probabilities
of the continuation " " + choice after the context. acc is the fraction of examples whose best-scoring
choice is the label; acc_norm divides each sum by len(choice) in characters first. A tie goes to the
first choice. Text is tokenized as lm-eval does: whitespace ending the context moves to the front of
the continuation, context + continuation is encoded whole, and the continuation is what follows the
context's own tokens. A context too long for the model loses its beginning: the model sees the last
block_size tokens of context + continuation (the very last token is only predicted), as lm-eval
truncates; a continuation of more than block_size tokens is an error.

Chat scoring (generative): the chat template (the checkpoint's, or chat_template=FILE) renders every
message but the last plus the generation prompt; the model decodes greedily until its end-of-turn
token (or end of text), at most max_new_tokens, and exact_match is the fraction of replies equal to
the expected answer, character for character (normalize=True: both stripped of surrounding
whitespace and case-folded first). A prompt longer than block_size keeps its last block_size tokens.
A tokenizer with no chat template, or a character-level or tiktoken one, is an error.

Under torchrun the examples (bpb: the windows of the val split) are shared out among the processes
and the results summed over them. Errors are one line on stderr: exit 2 for a bad flag or an
unknown task, 1 for bad input (a missing or malformed task file, text the checkpoint's tokenizer
cannot encode)."""


@dataclass
class EvalConfig:
    out_dir: str = "out"  # folder holding ckpt.pt, as written by train.py
    tasks: str = "bpb"  # comma-separated: bpb, hellaswag, or task files (PATH.jsonl)
    data_dir: str | None = None  # prepared data set for bpb; None = the one the checkpoint was trained on
    max_examples: int | None = None  # score only the first N examples of each task (not bpb)
    batch_size: int = 32  # sequences per forward pass: val windows for bpb, choices for multiple choice
    chat_template: str | None = None  # chat tasks: a Jinja template file in place of the checkpoint's own
    max_new_tokens: int = 256  # chat tasks: the longest reply decoded
    normalize: bool = False  # chat tasks: compare stripped of surrounding whitespace and case-folded
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float16 on GPUs without bf16, else float32) or one of those
    json: str | None = None  # also write the results to this file as a JSON object
    collective_timeout_s: float = 600  # under torchrun: a wait this long for another process ends the run


# More sequences than this in one forward pass fail in torch's allocator, not here, with its own error.
BATCH_SIZE = (lambda v: 1 <= v <= 2**20, "must be between 1 and 2**20")


def val_tokens(cfg: EvalConfig, checkpoint: dict) -> tuple[Path, np.ndarray]:
    """The val split bpb is computed on, from a data set prepared with the checkpoint's tokenizer."""
    trained_on = checkpoint.get("config") or {}
    if not (cfg.data_dir or trained_on.get("data_dir") or trained_on.get("dataset")):
        raise ConfigError("the checkpoint records no data set (an imported model?): pass --data_dir for bpb")
    data_dir = resolve_data_dir(trained_on.get("dataset"), cfg.data_dir or trained_on.get("data_dir"))
    meta = load_meta(data_dir)
    if tokenizer_entry_from_meta(meta) != checkpoint["tokenizer"]:
        raise UserError(
            f"{data_dir} was prepared with another tokenizer than the checkpoint's "
            f"({meta.get('tokenizer')} vs {checkpoint['tokenizer'].get('tokenizer')}): bpb needs the val "
            "split in the model's own tokens; pass --data_dir of a data set prepared for this model"
        )
    return data_dir, read_checked_tokens(data_dir, meta, "val")


def evaluate(cfg: EvalConfig) -> dict[str, float]:
    """Every task of cfg.tasks on out_dir's checkpoint; prints each result on rank 0 and returns them all."""
    check_values(
        cfg, {"batch_size": BATCH_SIZE, "max_examples": AT_LEAST_1_OR_NONE, "max_new_tokens": AT_LEAST_1}
    )
    if cfg.json is not None and (Path(cfg.json).is_dir() or not Path(cfg.json).resolve().parent.is_dir()):
        raise ConfigError(f"json={cfg.json!r} must name a file in an existing folder")
    names = task_names(cfg.tasks, ("bpb", *BUILTIN_TASKS))
    if not names:
        raise ConfigError("tasks is empty: name at least one of bpb, hellaswag or a task file")
    with processes(cfg.device, cfg.collective_timeout_s) as device:
        mix = autocast(device, pick_dtype(cfg.dtype, device))
        model, tokenizer, checkpoint = load_model_and_tokenizer(cfg.out_dir, device)
        template = chat_template(checkpoint["tokenizer"], cfg.chat_template)
        chat = ChatTaskOptions(template, cfg.max_new_tokens, cfg.normalize)
        results = {}
        for name in names:
            started = time.time()
            if name == "bpb":
                data_dir, tokens = val_tokens(cfg, checkpoint)
                results["bpb"], n_bytes = bits_per_byte(model, tokenizer, tokens, cfg.batch_size, device, mix)
                seconds = time.time() - started
                print0(
                    f"bpb {results['bpb']:.4f}: bits per byte over the val split of {data_dir} "
                    f"({len(tokens) - 1:,} tokens predicted, {n_bytes:,} bytes; {seconds:.1f} s)"
                )
            else:
                scores, n = score_task(
                    model, tokenizer, name, cfg.max_examples, cfg.batch_size, device, mix, chat
                )
                results.update(scores)
                seconds = time.time() - started
                shown = ", ".join(f"{key.split('/')[1]} {value:.4f}" for key, value in scores.items())
                print0(f"{task_label(name)}: {shown} ({n:,} examples, {seconds:.1f} s, {n / seconds:,.1f}/s)")
        if cfg.json and world()[0] == 0:
            text = json.dumps(results, indent=2) + "\n"
            atomic_write(cfg.json, lambda f: f.write(text.encode()))
        return results


def main(argv: list[str] | None = None) -> None:
    def run() -> None:
        evaluate(parse_config(EvalConfig(), argv, prog="eval.py", description=DESCRIPTION))

    exit_on_error(run)


if __name__ == "__main__":
    main()
