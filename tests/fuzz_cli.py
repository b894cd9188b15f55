"""Feed every CLI generated bad values and count what happens.

    python tests/fuzz_cli.py                  # every case (about 2,000; about 2 minutes on 2 cores)
    python tests/fuzz_cli.py --sample 12 --seed 0   # a seeded sample (CI runs one: test_fuzz_sample)

Each case changes one thing of a working command line, or damages one real file:
  train, sample, eval  one config key set to a value of the wrong type, out of range or naming a
                strange path; sample's keys also on a chat checkpoint with --chat
  flags         of convert, bench, race and plot
  files         ckpt.pt truncated, meta.json or a Hugging Face config.json edited, metrics.jsonl junk
  chat prepare  data/chat/prepare.py: bad rows and files for --input (not JSON, no messages, unknown
                roles, empty content, no assistant turn, not UTF-8, empty), bad --chat_template files
                (missing, not UTF-8, broken Jinja, raise_exception, no special token ending a turn),
                bad --val_fraction, --max_tokens, --learn, --tokenizer, --out_dir, and --hf_dataset on
                a local folder with bad --hf_column, --hf_split, --hf_config
  LoRA          train.py's lora_* keys on a LoRA fine-tune of the finished run and on a LoRA run
                resumed; other keys that LoRA refuses (scratch, fsdp, muon); a LoRA ckpt.pt damaged
                (its lora entry or adapters edited) under resume, convert.py export [--merge], sample
  speculative   sample.py --draft (missing, damaged, another vocabulary, the run itself),
                --prompt_lookup and --draft_tokens
  chat          sample.py --chat on a char-level run (refused) and on a chat checkpoint: a fuzzed
                --chat_template file, --system, --start (FILE: paths too), messages on stdin;
                eval.py's chat task files (damaged rows, last message not the assistant's, empty,
                not UTF-8), also as train.py's eval_tasks
  chat data     train.py (and eval.py's bpb) on a prepared chat set with <split>.mask.bin or
                <split>.starts.bin truncated, mask bytes set to 2..255, starts not rising or not
                ending at the token count, meta.json's chat keys edited
Each runs in-process through the CLI's main(argv) (data/chat/prepare.py: under a patched sys.argv,
as its main reads it), with stdin given (empty unless the case says), and ends as one of:
  ok           exit 0
  error        one line "error: ..." (or argparse's usage line) and exit 1 or 2
  last-resort  the "internal error" line: an exception no check foresaw (a bug, if rare)
  traceback    a traceback reached the terminal, or an exception escaped main
  hang         still running after --timeout seconds
  loss         a good ckpt.pt beside the case (the char run, the chat run, the LoRA run) no longer loads
Prints the counts, and each case that was not ok or error. Exit code 1 if any was not.
The cases, and the files they damage, are the same for the same --seed.
"""

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from chat_fixtures import CHATML, LLAMA3, conversations, save_chat_tokenizer, write_jsonl  # noqa: E402
from chat_fixtures import prepare as chat_prepare  # noqa: E402  (data/chat/prepare.py, loaded by path)

import convert  # noqa: E402
import eval as eval_cli  # noqa: E402
import plot  # noqa: E402
import race  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from checkpoint import CKPT_NAME, load_checkpoint, save_checkpoint  # noqa: E402
from runtime import exit_on_error  # noqa: E402
from train_config import TrainConfig  # noqa: E402

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--eval_iters=1"]
TINY += ["--max_iters=2", "--eval_interval=1", "--log_interval=1", "--eval_full=False", "--dtype=float32"]
TINY += ["--gradient_accumulation_steps=1", "--warmup_iters=1"]
CHAT_TINY = [*TINY, "--block_size=256"]  # chat_fixtures' conversations are up to 256 tokens: all kept
BAD_INTS = ["-1", "0", "abc", "", "1.5", "nan", "99999999999999999999", "None", "[1]", "2**70"]
BAD_FLOATS = ["-1.0", "nan", "inf", "-inf", "abc", "", "1e309", "1e-320", "None", "{}"]
BAD_STRINGS = ["", "/", "..", "/dev/null", "x" * 300, "None", "a b", "-", "\t"]
BAD_BOOLS = ["maybe", "2", "", "None", "yes please"]
# Valid values of these keys may ask for hours of work (max_new_tokens=1e20): not bad values.
KEYS_THAT_TRAIN_LONG = {"max_iters", "lr_decay_iters", "eval_iters", "eval_interval", "n_layer", "n_embd"}
KEYS_THAT_TRAIN_LONG |= {"max_new_tokens"}
SHARED = ("run", "data", "hf", "chat", "lora")  # what prepare() makes, copied into each case's folder
RUNS = ("run", "chat/run", "lora")  # the finished runs whose ckpt.pt a case must not lose


@dataclass
class Case:
    name: str
    main: Callable[[list[str]], None]
    argv: Callable[[Path], list[str]]  # built in the case's own folder
    stdin: bytes = b""  # what the CLI reads from stdin (sample.py --chat without start)


def values_for(field_type: object) -> list[str]:
    text = str(field_type)
    if "bool" in text:
        return BAD_BOOLS
    if "int" in text:
        return BAD_INTS
    if "float" in text:
        return BAD_FLOATS
    return BAD_STRINGS


def config_cases(
    cli: str,
    main: Callable,
    config: type,
    base: Callable[[Path], list[str]],
    keep: Callable[[str], bool] = lambda key: True,
) -> list[Case]:
    """One case per (key of config that keep keeps, bad value): the working command line base, with
    key=value last."""
    cases = []
    for field in fields(config):
        if not keep(field.name):
            continue
        for value in values_for(field.type):
            if field.name in KEYS_THAT_TRAIN_LONG and value in ("99999999999999999999", "2**70", "1e309"):
                continue  # valid, and would train for ever: not a bad value
            flag = f"--{field.name}={value}"
            cases.append(Case(f"{cli} {flag[:60]!r}", main, lambda d, f=flag: [*base(d), f]))
    return cases


def damaged_files(rng: random.Random) -> list[Case]:
    """Real files damaged at random: a truncated ckpt.pt, edited meta.json and config.json, junk metrics."""
    cases = []
    for _ in range(20):
        fraction = rng.random()

        def truncated(d: Path, fraction=fraction) -> list[str]:
            ckpt = d / "cut" / CKPT_NAME
            shutil.copytree(d / "run", ckpt.parent)
            ckpt.write_bytes(ckpt.read_bytes()[: int(ckpt.stat().st_size * fraction)])
            return [f"--out_dir={ckpt.parent}", "--max_new_tokens=2"]

        cases.append(Case(f"sample: ckpt.pt cut at {fraction:.0%}", sample.main, truncated))
    for _ in range(20):
        key, value = (
            rng.choice(["vocab_size", "dtype", "train_tokens", "val_tokens", "tokenizer", "chars"]),
            rng.choice([None, -1, 0, "x", [], {}, 1e30, True, 2**64]),
        )

        def meta_edited(d: Path, key=key, value=value) -> list[str]:
            data = d / "data2"
            shutil.copytree(d / "data", data)
            meta = json.loads((data / "meta.json").read_text())
            meta[key] = value
            (data / "meta.json").write_text(json.dumps(meta))
            return [f"--out_dir={d / 'out'}", f"--data_dir={data}", *TINY]

        cases.append(Case(f"train: meta.json {key}={value!r}", train.main, meta_edited))
    hf_keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"]
    hf_keys += [
        "head_dim",
        "rope_theta",
        "rope_scaling",
        "rms_norm_eps",
        "tie_word_embeddings",
        "layer_types",
    ]
    hf_keys += [
        "architectures",
        "model_type",
        "sliding_window",
        "use_sliding_window",
        "max_position_embeddings",
    ]
    for key in hf_keys:
        for value in rng.sample([None, -1, 0, "x", [], {}, 1e30, True, [1], {"rope_type": 3}, 2**40], 4):

            def hf_edited(d: Path, key=key, value=value) -> list[str]:
                hf = d / "hf2"
                shutil.copytree(d / "hf", hf)
                config = json.loads((hf / "config.json").read_text())
                config[key] = value
                (hf / "config.json").write_text(json.dumps(config))
                return ["import", str(hf), str(d / "imported")]

            cases.append(Case(f"convert: config.json {key}={value!r}", convert.main, hf_edited))
    for junk in ["42", "[1]", "{}", '{"iter": null}', '{"iter": 1, "loss": "x"}', "\udcff", "nul\0l"]:

        def metrics_junk(d: Path, junk=junk) -> list[str]:
            run = d / "junk"
            shutil.copytree(d / "run", run)
            with open(run / "metrics.jsonl", "a", encoding="utf-8", errors="surrogateescape") as f:
                f.write(junk + "\n")
            return [str(run), f"--out={d / 'p.png'}"]

        cases.append(Case(f"plot: metrics line {junk!r}", plot.main, metrics_junk))
    return cases


def flag_cases() -> list[Case]:
    cases = []
    for value in BAD_STRINGS + BAD_INTS:
        cases.append(Case(f"race --repeats {value!r}", race.main, lambda d, v=value: ["a", "--repeats", v]))
        cases.append(
            Case(f"race --names {value!r}", race.main, lambda d, v=value: ["a", "--names", v, f"--out={d}/r"])
        )
        cases.append(Case(f"plot --x {value!r}", plot.main, lambda d, v=value: [str(d / "run"), "--x", v]))
        cases.append(
            Case(f"plot --out {value!r}", plot.main, lambda d, v=value: [str(d / "run"), f"--out={d}/{v}"])
        )
        cases.append(
            Case(f"convert export {value!r}", convert.main, lambda d, v=value: ["export", str(d / "run"), v])
        )
        cases.append(
            Case(
                f"convert import --block_size {value!r}",
                convert.main,
                lambda d, v=value: ["import", str(d / "hf"), str(d / "o"), "--block_size", v],
            )  # fmt: skip
        )
    return cases


# --- chat: conversations, templates and the files that hold them ---------------------------------

GOOD_CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]


def row(messages: object) -> str:
    return json.dumps({"messages": messages})


def write(path: Path, *lines: str | bytes, end: bytes = b"\n") -> Path:
    """path holding lines, each ended by end; str lines as UTF-8, a lone surrogate kept (invalid UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line for line in lines]
    path.write_bytes(b"".join(line + end for line in data))
    return path


def bad_rows() -> list[tuple[str, str | bytes]]:
    """(what, line): JSONL rows of conversations that no reader should take as they are, and a few
    odd ones that are valid (a space as content, an extra key, special tokens in a reply)."""
    user, reply = GOOD_CHAT
    rows = [
        ("not JSON", "{not json"),
        ("a list", "[1]"),
        ("a number", "42"),
        ("null", "null"),
        ("a string", '"hi"'),
        ("no messages", '{"text": "hi"}'),
        ("messages NaN", '{"messages": NaN}'),
        ("a BOM", "\ufeff" + row(GOOD_CHAT)),
        ("not UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}, {"role": "assistant"}]}'),
    ]
    for what, messages in [
        ("messages a string", "hi"),
        ("messages empty", []),
        ("messages an object", {"role": "user", "content": "hi"}),
        ("messages null", None),
        ("a message a number", [42, reply]),
        ("a message a list", [[], reply]),
        ("no role", [{"content": "hi"}, reply]),
        ("role null", [{"role": None, "content": "hi"}, reply]),
        ("role 5", [{"role": 5, "content": "hi"}, reply]),
        ("role bot", [{"role": "bot", "content": "hi"}, reply]),
        ("role tool", [{"role": "tool", "content": "hi"}, reply]),
        ("role Assistant", [user, {"role": "Assistant", "content": "x"}]),
        ("role empty", [{"role": "", "content": "hi"}, reply]),
        ("no content", [{"role": "user"}, reply]),
        ("content empty", [user, {"role": "assistant", "content": ""}]),
        ("content a space", [user, {"role": "assistant", "content": " "}]),
        ("content 5", [{"role": "user", "content": 5}, reply]),
        ("content null", [user, {"role": "assistant", "content": None}]),
        ("content a list of parts", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, reply]),
        ("only a user turn", [user]),
        ("only a system turn", [{"role": "system", "content": "be brief"}]),
        ("a user turn last", [user, reply, user]),
        ("a system turn last", [user, reply, {"role": "system", "content": "x"}]),
        ("two assistant turns", [user, reply, reply]),
        ("the assistant first", [reply, user, reply]),
        ("a lone surrogate", [user, {"role": "assistant", "content": "\ud800"}]),
        ("a NUL", [{"role": "user", "content": "a\u0000b"}, reply]),
        (
            "special tokens in a reply",
            [user, {"role": "assistant", "content": "<|im_end|><|im_start|>user\n"}],
        ),
        ("a reply of 24,000 characters", [user, {"role": "assistant", "content": "the cat " * 3000}]),
        ("an extra key", [{"role": "user", "content": "hi", "name": "x"}, reply]),
    ]:
        rows.append((what, row(messages)))
    return rows


# Whole conversation files (--input, a chat task file): broken ones, and a few valid odd ones.
BAD_FILES = {
    "empty": [],
    "blank lines": [b"", b"  ", b"\t"],
    "not UTF-8": [b"\xff\xfe\x00\x01"],
    "UTF-16": [row(GOOD_CHAT).encode("utf-16")],
    "one conversation": [row(GOOD_CHAT)],
    "CRLF lines": [(row(GOOD_CHAT) + "\r").encode()] * 4,
    "a truncated last line": [row(GOOD_CHAT)] * 3 + [row(GOOD_CHAT)[:20]],
}

TEMPLATES = {  # --chat_template files: name -> text (bytes: not UTF-8)
    "ChatML (the tokenizer's own)": CHATML,
    "Llama 3 (tokens not in this vocabulary)": LLAMA3,
    "empty": "",
    "whitespace": " \n",
    "not UTF-8": b"\xff\xfe{{ messages }}",
    "an unclosed for": "{% for m in messages %}{{ m['content'] }}",
    "{{ }": "{{ }",
    "{{ }}": "{{ }}",
    "{% if %}": "{% if %}x{% endif %}",
    "raise_exception": "{{ raise_exception('no') }}",
    "no special token": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}",
    "a constant": "hello",
    "the last message only": "{{ messages[-1]['content'] }}<|im_end|>",
    "1 / 0": "{{ 1 / 0 }}",
    "messages.pop()": "{% set _ = messages.pop() %}" + CHATML,
    "a dunder": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "undefined names": "{{ foo.bar.baz }}",
    "ChatML without the generation prompt": CHATML.split("{%- if add_generation_prompt")[0],
    "20,000 words first": "{% for i in range(20000) %}the cat {% endfor %}" + CHATML,
}


def template_path(d: Path, name: str) -> Path:
    """The --chat_template file TEMPLATES[name] written in d; "missing" and "a folder" are what they say."""
    if name == "missing":
        return d / "missing.jinja"
    if name == "a folder":
        return d
    text = TEMPLATES[name]
    path = d / "template.jinja"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def template_cases(cli: str, main: Callable, base: Callable[[Path], list[str]]) -> list[Case]:
    cases = []
    for name in [*TEMPLATES, "missing", "a folder"]:

        def argv(d: Path, name=name) -> list[str]:
            return [*base(d), f"--chat_template={template_path(d, name)}"]

        cases.append(Case(f"{cli} --chat_template: {name}", main, argv))
    return cases


def chat_prepare_main(argv: list[str]) -> None:
    """data/chat/prepare.py's main reads sys.argv: run it so, under exit_on_error as its __main__ does."""
    with mock.patch.object(sys, "argv", ["prepare.py", *argv]):
        exit_on_error(chat_prepare.main)


def chat_prepare_cases() -> list[Case]:
    """data/chat/prepare.py: bad rows and files for --input, bad templates, flags and --hf_dataset."""

    def base(d: Path, source: Path | None = None) -> list[str]:
        source = source or d / "chat" / "conversations.jsonl"
        return [f"--input={source}", f"--tokenizer={d / 'chat' / 'tokenizer'}", f"--out_dir={d / 'prep'}"]

    cases = [Case("chat prepare: a working command line", chat_prepare_main, base)]
    for what, line in bad_rows():  # after a good row: the reader names the line
        source = lambda d, line=line: write(d / "c.jsonl", row(GOOD_CHAT), row(GOOD_CHAT), line)  # noqa: E731
        cases.append(
            Case(f"chat prepare: a row with {what}", chat_prepare_main, lambda d, s=source: base(d, s(d)))
        )
    for what, lines in BAD_FILES.items():
        source = lambda d, lines=lines: write(d / "c.jsonl", *lines)  # noqa: E731
        cases.append(
            Case(f"chat prepare: --input {what}", chat_prepare_main, lambda d, s=source: base(d, s(d)))
        )
    for what, path in [("missing", "none.jsonl"), ("a folder", "."), ("/dev/null", "/dev/null")]:
        cases.append(
            Case(f"chat prepare: --input {what}", chat_prepare_main, lambda d, p=path: base(d, d / p))
        )
    cases += template_cases("chat prepare", chat_prepare_main, base)
    flags = [f"--val_fraction={v}" for v in [*BAD_FLOATS, "0", "1", "0.999", "1e-9", "0.5"]]
    flags += [f"--max_tokens={v}" for v in [*BAD_INTS, "2", "5", "100"]]
    flags += [f"--learn={v}" for v in ["", "none", "ALL", "assistant,all", "all"]]
    flags += ["--nope=1", "--hf_split=test", "--val_fraction"]
    for flag in flags:
        cases.append(Case(f"chat prepare {flag!r}", chat_prepare_main, lambda d, f=flag: [*base(d), f]))
    for what, path in [
        ("missing", "none"),
        ("a char-level run", "run"),
        ("a char-level run's Hugging Face export", "hf"),
        ("a chat run", "chat/run"),
        ("the LoRA run", "lora"),
        ("a data set", "data"),
        ("a file", "chat/conversations.jsonl"),
        ("a folder of nothing", "."),
    ]:
        cases.append(
            Case(
                f"chat prepare --tokenizer {what}",
                chat_prepare_main,
                lambda d, p=path: [*base(d), f"--tokenizer={d / p}"],
            )
        )
    # not "/" or "..": a working prepare would write its set there
    for what, path in [("''", ""), ("a long name", "x" * 300), ("a file", "chat/conversations.jsonl")]:
        cases.append(
            Case(
                f"chat prepare --out_dir {what}",
                chat_prepare_main,
                lambda d, p=path: [*base(d), f"--out_dir={d / p}"],
            )
        )
    for what, path in [("/dev/null", "/dev/null"), ("the prepared chat set", "chat/data"), ("a b", "a b")]:
        cases.append(
            Case(
                f"chat prepare --out_dir {what}",
                chat_prepare_main,
                lambda d, p=path: [*base(d), f"--out_dir={d / p}"],
            )
        )
    cases += [
        Case("chat prepare: no --input or --hf_dataset", chat_prepare_main, lambda d: base(d)[1:]),
        Case("chat prepare: no --tokenizer", chat_prepare_main, lambda d: [base(d)[0], base(d)[2]]),
        Case(
            "chat prepare: both --input and --hf_dataset",
            chat_prepare_main,
            lambda d: [*base(d), f"--hf_dataset={d / 'chat'}"],
        ),
    ]
    return cases + hf_dataset_cases()


def hf_dataset_cases() -> list[Case]:
    """--hf_dataset on a local folder (datasets.load_dataset; no hub here: HF_DATASETS_OFFLINE)."""

    def hub(d: Path, *lines: str | bytes, name: str = "train.jsonl", end: bytes = b"\n") -> list[str]:
        folder = d / "hub"
        if lines:
            write(folder / name, *lines, end=end)
        else:
            folder.mkdir()
            shutil.copy(d / "chat" / "conversations.jsonl", folder / name)
        return [
            f"--hf_dataset={folder}",
            f"--tokenizer={d / 'chat' / 'tokenizer'}",
            f"--out_dir={d / 'prep'}",
        ]

    cases = [Case("chat prepare --hf_dataset: a local folder", chat_prepare_main, hub)]
    flags = [f"--hf_column={v}" for v in ["", "text", "nope", "messages ", "role"]]
    flags += [
        f"--hf_split={v}" for v in ["", "validation", "train[:1]", "train[:200%]", "train[abc]", "../x"]
    ]
    flags += [f"--hf_config={v}" for v in ["x", "default"]]
    for flag in flags:
        cases.append(
            Case(f"chat prepare --hf_dataset {flag!r}", chat_prepare_main, lambda d, f=flag: [*hub(d), f])
        )
    rows = dict(bad_rows())
    for what in ["messages a string", "role bot", "content 5", "a user turn last", "no messages"]:
        line = rows[what]
        cases.append(
            Case(
                f"chat prepare --hf_dataset: a row with {what}",
                chat_prepare_main,
                lambda d, x=line: hub(d, row(GOOD_CHAT), x),
            )
        )
    cases += [
        Case("chat prepare --hf_dataset: not UTF-8", chat_prepare_main, lambda d: hub(d, b"\xff\xfe\x00")),
        Case(
            "chat prepare --hf_dataset: a csv",
            chat_prepare_main,
            lambda d: hub(d, "a,b", "1,2", name="x.csv"),
        ),
        Case("chat prepare --hf_dataset: an empty jsonl", chat_prepare_main, lambda d: hub(d, b"", end=b"")),
    ]
    for what, path in [
        ("an empty folder", "empty"),
        ("a file", "chat/conversations.jsonl"),
        ("missing", "none"),
    ]:

        def argv(d: Path, path=path) -> list[str]:
            (d / "empty").mkdir(exist_ok=True)
            return [*hub(d)[1:], f"--hf_dataset={d / path}"]

        cases.append(Case(f"chat prepare --hf_dataset {what}", chat_prepare_main, argv))
    cases.append(
        Case(
            "chat prepare --hf_dataset no/such (offline)",
            chat_prepare_main,
            lambda d: [*hub(d)[1:], "--hf_dataset=no/such"],
        )
    )
    return cases


# --- LoRA: train.py's lora_* keys, a damaged LoRA checkpoint under resume, export and sample -------


def lora_fresh(d: Path) -> list[str]:
    """A LoRA fine-tune of the finished char-level run (its shape: the checkpoint's)."""
    return [
        f"--out_dir={d / 'tuned'}",
        f"--init_from={d / 'run'}",
        f"--data_dir={d / 'data'}",
        *TINY[4:],
        "--lora_rank=4",
    ]


def lora_resumed(d: Path) -> list[str]:
    return [f"--out_dir={d / 'lora'}", "--init_from=resume", "--max_iters=3"]


def lora_cases() -> list[Case]:
    is_lora = lambda key: key.startswith("lora_")  # noqa: E731
    cases = config_cases("train lora", train.main, TrainConfig, lora_fresh, is_lora)
    cases += config_cases("train lora resume", train.main, TrainConfig, lora_resumed, is_lora)
    # valid values, or near ones: on a fresh fine-tune, and changed on resume (the run's were rank 4)
    other = ["--lora_rank=1", "--lora_rank=8", "--lora_rank=16", "--lora_rank=17"]
    other += [
        "--lora_alpha=8",
        "--lora_alpha=0",
        "--lora_alpha=1e30",
        "--lora_dropout=0.5",
        "--lora_dropout=1",
    ]
    other += ["--lora_targets=q", "--lora_targets=v,q", "--lora_targets=q,q", "--lora_targets=q,,k"]
    other += ["--lora_targets=Q", "--lora_targets=embed", "--lora_targets=lm_head", "--lora_targets=q k"]
    other += ["--lora_targets=,", "--lora_targets=q,k,v,o,gate,up,down,"]
    for flag in other:
        cases.append(Case(f"train lora {flag!r}", train.main, lambda d, f=flag: [*lora_fresh(d), f]))
        cases.append(Case(f"train lora resume {flag!r}", train.main, lambda d, f=flag: [*lora_resumed(d), f]))
    with_fresh = ["--init_from=scratch", "--optimizer=muon", "--parallelism=fsdp", "--dtype=bfloat16"]
    with_fresh += ["--dtype=float16", "--eval_only=True", "--activation_checkpointing=True", "--dropout=0.5"]
    with_fresh += ["--zero_init_out_proj=True", "--n_layer=3", "--eval_full=True", "--grad_clip=0"]
    for flag in with_fresh:
        cases.append(Case(f"train lora {flag!r}", train.main, lambda d, f=flag: [*lora_fresh(d), f]))
    for what, base in [
        ("a Hugging Face export", "hf"),
        ("the LoRA run", "lora"),
        ("a chat run (vocabulary 300)", "chat/run"),
        ("a data set", "data"),
        ("the run's ckpt.pt", f"run/{CKPT_NAME}"),
    ]:
        cases.append(
            Case(
                f"train lora --init_from={what}",
                train.main,
                lambda d, b=base: [*lora_fresh(d), f"--init_from={d / b}"],
            )
        )
    cases.append(
        Case(
            "train lora of the chat run on its chat set",
            train.main,
            lambda d: [
                *lora_fresh(d),
                f"--init_from={d / 'chat' / 'run'}",
                f"--data_dir={d / 'chat' / 'data'}",
                "--block_size=256",
            ],
        )
    )
    with_resume = ["--dtype=bfloat16", "--eval_only=True", "--optimizer=muon", "--parallelism=fsdp"]
    with_resume += ["--max_iters=2", "--max_iters=0", "--init_from=run", "--dropout=0.3"]
    for flag in with_resume:
        cases.append(Case(f"train lora resume {flag!r}", train.main, lambda d, f=flag: [*lora_resumed(d), f]))
    return cases


def lora_edits(rng: random.Random) -> list[tuple[str, Callable[[dict], None]]]:
    """(what, edit): changes to a LoRA checkpoint's dict, its lora entry or its tensors."""

    def adapters(c: dict) -> list[str]:
        return sorted(k for k in c["model"] if ".lora." in k)

    def base_matrix(c: dict) -> str:
        return sorted(k for k, t in c["model"].items() if ".lora." not in k and t.dim() == 2)[0]

    edits = [
        ("lora entry None", lambda c: c.update(lora=None)),
        ("lora entry {}", lambda c: c.update(lora={})),
        ("lora entry 'x'", lambda c: c.update(lora="x")),
        ("lora entry removed", lambda c: c.pop("lora")),
        ("lora extra key", lambda c: c["lora"].update(extra=1)),
    ]
    values = {
        "rank": [0, -1, 8, "4", None, 2**40, 4.5],
        "alpha": [0.0, -1.0, float("nan"), "x", None],
        "dropout": [1.0, 2.0, -0.5, "x"],
        "targets": [("zz",), (), "q", None, ("q", "q"), ("q",)],
        "base_fingerprint": ["0", None, 5],
    }
    for key, options in values.items():
        for value in options:
            edits.append((f"lora {key}={value!r}", lambda c, k=key, v=value: c["lora"].update({k: v})))
        edits.append((f"lora {key} removed", lambda c, k=key: c["lora"].pop(k)))
    edits += [
        ("an adapter removed", lambda c: c["model"].pop(adapters(c)[0])),
        ("every adapter removed", lambda c: [c["model"].pop(k) for k in adapters(c)]),
        (
            "an unknown adapter",
            lambda c: c["model"].update({"layers.0.attn.wqkv.lora.A.zz": c["model"][adapters(c)[0]]}),
        ),
        (
            "an adapter transposed",
            lambda c: c["model"].update({adapters(c)[0]: c["model"][adapters(c)[0]].t().contiguous()}),
        ),
        ("an adapter NaN", lambda c: c["model"][adapters(c)[0]].fill_(float("nan"))),
        (
            "an adapter in float16",
            lambda c: c["model"].update({adapters(c)[0]: c["model"][adapters(c)[0]].half()}),
        ),
        ("a base matrix changed", lambda c: c["model"][base_matrix(c)].add_(1e-3)),
        ("a base matrix removed", lambda c: c["model"].pop(base_matrix(c))),
        ("the optimizer state removed", lambda c: c.pop("optimizer")),
    ]
    return edits


def lora_damage_cases(rng: random.Random) -> list[Case]:
    """A LoRA ckpt.pt truncated or edited, then resumed, exported (adapter, merged) and sampled."""
    damages = []
    for _ in range(4):
        fraction = rng.random()

        def cut(d: Path, fraction=fraction) -> Path:
            run = d / "lora2"
            shutil.copytree(d / "lora", run)
            ckpt = run / CKPT_NAME
            ckpt.write_bytes(ckpt.read_bytes()[: int(ckpt.stat().st_size * fraction)])
            return run

        damages.append((f"ckpt.pt cut at {fraction:.0%}", cut))
    for what, edit in lora_edits(rng):

        def edited(d: Path, edit=edit) -> Path:
            run = d / "lora2"
            shutil.copytree(d / "lora", run)
            checkpoint = load_checkpoint(run / CKPT_NAME)
            edit(checkpoint)
            save_checkpoint(checkpoint, run / CKPT_NAME)
            return run

        damages.append((what, edited))
    cases = []
    for what, damaged in damages:
        cases += [
            Case(
                f"train lora resume: {what}",
                train.main,
                lambda d, f=damaged: [f"--out_dir={f(d)}", "--init_from=resume", "--max_iters=3"],
            ),
            Case(
                f"convert export lora: {what}",
                convert.main,
                lambda d, f=damaged: ["export", str(f(d)), str(d / "e")],
            ),
            Case(
                f"convert export lora --merge: {what}",
                convert.main,
                lambda d, f=damaged: ["export", str(f(d)), str(d / "e"), "--merge"],
            ),
            Case(
                f"sample lora: {what}",
                sample.main,
                lambda d, f=damaged: [f"--out_dir={f(d)}", "--max_new_tokens=2"],
            ),
        ]
    return cases


def convert_lora_cases() -> list[Case]:
    """convert.py export of the LoRA run: as its adapter or --merge, with bad flags and folders."""
    cases = []
    for merge in ([], ["--merge"]):
        name = "convert export lora" + (" --merge" if merge else "")

        def export(d: Path, *flags: str, merge=merge) -> list[str]:
            return ["export", str(d / "lora"), str(d / "e"), *merge, *flags]

        cases.append(Case(name, convert.main, export))
        for flag in [
            "--dtype=bfloat16",
            "--dtype=float16",
            "--dtype=",
            "--dtype=int8",
            "--dtype=float64",
            "--force",
        ]:
            cases.append(Case(f"{name} {flag!r}", convert.main, lambda d, f=flag, e=export: e(d, f)))
        for value in BAD_STRINGS:
            cases.append(
                Case(
                    f"{name} hf_dir {value!r}",
                    convert.main,
                    lambda d, v=value, m=merge: ["export", str(d / "lora"), v, *m],
                )
            )
        for what, folder, flags in [
            ("into a non-empty folder", "hf", []),
            ("into a non-empty folder --force", "hf", ["--force"]),
            ("into its own run folder --force", "lora", ["--force"]),
            ("onto its ckpt.pt", f"lora/{CKPT_NAME}", ["--force"]),
        ]:

            def argv(d: Path, folder=folder, flags=flags, m=merge) -> list[str]:
                return ["export", str(d / "lora"), str(d / folder), *m, *flags]

            cases.append(Case(f"{name} {what}", convert.main, argv))
    cases += [
        Case(
            "convert export lora --merge=1",
            convert.main,
            lambda d: ["export", str(d / "lora"), str(d / "e"), "--merge=1"],
        ),
        Case(
            "convert export --merge of a run without LoRA",
            convert.main,
            lambda d: ["export", str(d / "run"), str(d / "e"), "--merge"],
        ),
        Case(
            "convert export --merge of the chat run",
            convert.main,
            lambda d: ["export", str(d / "chat" / "run"), str(d / "e"), "--merge"],
        ),
        Case(
            "convert export of the chat run",
            convert.main,
            lambda d: ["export", str(d / "chat" / "run"), str(d / "e")],
        ),
    ]
    return cases


# --- sample.py: speculative decoding and chat ----------------------------------------------------


def char_sample(d: Path) -> list[str]:
    return [f"--out_dir={d / 'run'}", "--max_new_tokens=2"]


def chat_sample(d: Path) -> list[str]:
    return [f"--out_dir={d / 'chat' / 'run'}", "--chat", "--start=hi", "--max_new_tokens=2"]


def speculative_cases(rng: random.Random) -> list[Case]:
    """--draft (missing, damaged, another vocabulary, the run itself), --prompt_lookup, --draft_tokens."""

    def cut_draft(fraction: float) -> Callable[[Path], Path]:
        def draft(d: Path) -> Path:
            shutil.copytree(d / "run", d / "draft")
            ckpt = d / "draft" / CKPT_NAME
            ckpt.write_bytes(ckpt.read_bytes()[: int(ckpt.stat().st_size * fraction)])
            return d / "draft"

        return draft

    def junk_draft(d: Path) -> Path:
        write(d / "draft" / CKPT_NAME, b"junk")
        return d / "draft"

    drafts = [
        ("a missing folder", lambda d: d / "none"),
        ("the run itself", lambda d: d / "run"),
        ("the run's ckpt.pt", lambda d: d / "run" / CKPT_NAME),
        ("a chat run (another vocabulary)", lambda d: d / "chat" / "run"),
        ("the LoRA run", lambda d: d / "lora"),
        ("a Hugging Face export", lambda d: d / "hf"),
        ("a data set", lambda d: d / "data"),
        ("a ckpt.pt of junk", junk_draft),
        ("an empty ckpt.pt", cut_draft(0.0)),
        *[(f"a ckpt.pt cut at {f:.0%}", cut_draft(f)) for f in (rng.random() for _ in range(3))],
    ]
    cases = []
    for what, draft in drafts:
        cases.append(
            Case(
                f"sample --draft={what}", sample.main, lambda d, f=draft: [*char_sample(d), f"--draft={f(d)}"]
            )
        )
    draft_run = lambda d: [*char_sample(d), f"--draft={d / 'run'}"]  # noqa: E731
    lookup = lambda d: [*char_sample(d), "--prompt_lookup=2", "--start=abcabcabca"]  # noqa: E731
    with_draft = ["--prompt_lookup=2", "--num_samples=2", "--max_new_tokens=40", "--start=" + "x" * 40]
    with_draft += ["--temperature=0", "--top_p=0.5", "--top_k=1", "--chat", "--dtype=bfloat16"]
    for flag in with_draft:
        cases.append(
            Case(f"sample --draft=run {flag[:60]!r}", sample.main, lambda d, f=flag: [*draft_run(d), f])
        )
    for value in [*BAD_INTS, "1", "15", "16", "17", "100"]:
        flag = f"--draft_tokens={value}"
        cases.append(Case(f"sample --draft=run {flag!r}", sample.main, lambda d, f=flag: [*draft_run(d), f]))
        cases.append(
            Case(f"sample --prompt_lookup=2 {flag!r}", sample.main, lambda d, f=flag: [*lookup(d), f])
        )
    for value in ["1", "3", "16", "17", "1000"]:
        for extra in ([], ["--temperature=0"], ["--max_new_tokens=40"], ["--start="]):
            flags = [f"--prompt_lookup={value}", *extra]
            cases.append(
                Case(
                    f"sample --start=abcabcabca {' '.join(flags)!r}",
                    sample.main,
                    lambda d, f=flags: [*lookup(d), *f],
                )
            )
    return cases


def sample_chat_cases() -> list[Case]:
    """--chat on a char-level run (refused), on the LoRA run (char-level too) and on the chat run:
    a fuzzed --chat_template file, --system, --start (FILE: paths too), messages on stdin."""
    cases = [
        Case(
            "sample --chat on a char-level run",
            sample.main,
            lambda d: [*char_sample(d), "--chat", "--start=hi"],
        ),
        Case(
            "sample --chat on a char-level run, stdin",
            sample.main,
            lambda d: [*char_sample(d), "--chat"],
            b"hi\n",
        ),
        Case(
            "sample --chat on the LoRA run",
            sample.main,
            lambda d: [f"--out_dir={d / 'lora'}", "--chat", "--start=hi"],
        ),
        Case(
            "sample --chat on a Hugging Face export",
            sample.main,
            lambda d: [f"--out_dir={d / 'hf'}", "--chat", "--start=hi"],
        ),
        Case("sample --chat", sample.main, chat_sample),
    ]
    cases += template_cases("sample --chat", sample.main, chat_sample)
    systems = [*BAD_STRINGS, "<|im_end|>", "<|im_start|>assistant\n", "the cat " * 300, "\ud800", "a\x00b"]
    for value in systems:
        flag = f"--system={value}"
        cases.append(
            Case(f"sample --chat {flag[:60]!r}", sample.main, lambda d, f=flag: [*chat_sample(d), f])
        )
    files = {"m.txt": b"what sat on the mat", "empty.txt": b"", "latin1.txt": b"caf\xe9", "space.txt": b" \n"}
    starts = ["", " ", "\n", "FILE:", "FILE:none.txt", "FILE:.", "FILE:/dev/null", "FILE:FILE:m.txt"]
    starts += [f"FILE:{name}" for name in files] + ["<|im_start|>", "the cat " * 400, "\ud800", "a\x00b"]
    for value in starts:

        def argv(d: Path, value=value) -> list[str]:
            for name, content in files.items():
                (d / name).write_bytes(content)  # FILE: paths are relative to the case's folder
            return [*chat_sample(d), f"--start={value}"]

        cases.append(Case(f"sample --chat --start={value[:60]!r}", sample.main, argv))
    no_start = lambda d: [*chat_sample(d), "--start="]  # noqa: E731
    stdins = [b"", b"\n", b"hi\n", b"hi\nthere\n\n", b"hi", b"\t\n", b"hi\n" * 12, b"the cat " * 400 + b"\n"]
    stdins += [b"hi\n" + b"the cat " * 400 + b"\nhi\n", b"\xff\xfe\n", b"hi\r\n", b"\x00\n", b"<|im_end|>\n"]
    for stdin in stdins:
        cases.append(Case(f"sample --chat, stdin {stdin[:40]!r}", sample.main, no_start, stdin))
    others = ["--num_samples=2", "--compile=True", "--prompt_lookup=2", "--temperature=0", "--top_k=1"]
    others += ["--max_new_tokens=300", "--dtype=bfloat16"]
    for flag in others:
        cases.append(Case(f"sample --chat {flag!r}", sample.main, lambda d, f=flag: [*chat_sample(d), f]))
    cases.append(
        Case(
            "sample --chat --draft=the chat run",
            sample.main,
            lambda d: [*chat_sample(d), f"--draft={d / 'chat' / 'run'}"],
        )
    )
    return cases + config_cases("sample chat", sample.main, sample.SampleConfig, chat_sample)


# --- eval.py's chat tasks, also as train.py's eval_tasks --------------------------------------------


def eval_chat(d: Path, task: Path | str | None = None) -> list[str]:
    task = task or d / "chat" / "task.jsonl"
    return [f"--out_dir={d / 'chat' / 'run'}", f"--tasks={task}", "--max_new_tokens=2"]


def eval_chat_cases() -> list[Case]:
    """Task files of {"messages": [...]} whose last message is the assistant's answer, damaged."""
    cases = [Case("eval chat task: a working one", eval_cli.main, eval_chat)]
    first_too = {"not JSON", "no messages", "messages a string", "a user turn last", "role bot", "a BOM"}
    for what, line in bad_rows():  # after a good row: the file is a chat task by its first line
        task = lambda d, line=line: write(d / "t.jsonl", row(GOOD_CHAT), line)  # noqa: E731
        cases.append(
            Case(f"eval chat task: a row with {what}", eval_cli.main, lambda d, t=task: eval_chat(d, t(d)))
        )
        if what in first_too:
            task = lambda d, line=line: write(d / "t.jsonl", line, row(GOOD_CHAT))  # noqa: E731
            cases.append(
                Case(
                    f"eval chat task: a first row with {what}",
                    eval_cli.main,
                    lambda d, t=task: eval_chat(d, t(d)),
                )
            )
    for what, lines in BAD_FILES.items():
        task = lambda d, lines=lines: write(d / "t.jsonl", *lines)  # noqa: E731
        cases.append(Case(f"eval chat task: {what}", eval_cli.main, lambda d, t=task: eval_chat(d, t(d))))
    for what, path in [
        ("missing", "none.jsonl"),
        ("a folder", "chat"),
        ("named .txt", "chat/conversations.txt"),
    ]:

        def argv(d: Path, path=path) -> list[str]:
            shutil.copy(d / "chat" / "task.jsonl", d / "chat" / "conversations.txt")
            return eval_chat(d, d / path)

        cases.append(Case(f"eval chat task: {what}", eval_cli.main, argv))
    cases += template_cases("eval chat task", eval_cli.main, eval_chat)
    flags = [f"--max_new_tokens={v}" for v in ["0", "-1", "abc", "1", "300", "None"]]
    flags += [f"--normalize={v}" for v in [*BAD_BOOLS, "True"]]
    flags += [f"--max_examples={v}" for v in ["0", "1", "1000", "-1"]] + [
        "--batch_size=1",
        "--dtype=bfloat16",
    ]
    for flag in flags:
        cases.append(Case(f"eval chat task {flag!r}", eval_cli.main, lambda d, f=flag: [*eval_chat(d), f]))
    cases += [
        Case(
            "eval chat task and bpb",
            eval_cli.main,
            lambda d: eval_chat(d, f"bpb,{d / 'chat' / 'task.jsonl'}"),
        ),
        Case(
            "eval chat task twice",
            eval_cli.main,
            lambda d: eval_chat(d, f"{d / 'chat' / 'task.jsonl'},{d / 'chat' / 'task.jsonl'}"),
        ),
        Case(
            "eval chat task on a char-level run",
            eval_cli.main,
            lambda d: [*eval_chat(d), f"--out_dir={d / 'run'}"],
        ),
        Case(
            "eval chat task on the LoRA run",
            eval_cli.main,
            lambda d: [*eval_chat(d), f"--out_dir={d / 'lora'}"],
        ),
    ]

    def train_chat(d: Path, task: Path | None = None) -> list[str]:  # scored at each evaluation
        task = task or d / "chat" / "task.jsonl"
        return [
            f"--out_dir={d / 'cout'}",
            f"--data_dir={d / 'chat' / 'data'}",
            *CHAT_TINY,
            f"--eval_tasks={task}",
        ]

    cases.append(Case("train --eval_tasks=a chat task", train.main, train_chat))
    rows = dict(bad_rows())
    for what in [
        "not JSON",
        "role bot",
        "a user turn last",
        "content empty",
        "a lone surrogate",
        "not UTF-8",
    ]:
        task = lambda d, line=rows[what]: write(d / "t.jsonl", row(GOOD_CHAT), line)  # noqa: E731
        cases.append(
            Case(
                f"train --eval_tasks=a chat task, a row with {what}",
                train.main,
                lambda d, t=task: train_chat(d, t(d)),
            )
        )
    cases += [
        Case(
            "train --eval_tasks=a chat task on char-level data",
            train.main,
            lambda d: [
                f"--out_dir={d / 'cout'}",
                f"--data_dir={d / 'data'}",
                *TINY,
                f"--eval_tasks={d / 'chat' / 'task.jsonl'}",
            ],
        ),
        Case(
            "train --eval_tasks=a chat task --eval_task_examples=1",
            train.main,
            lambda d: [*train_chat(d), "--eval_task_examples=1"],
        ),
    ]
    return cases


# --- train.py (and eval.py's bpb) on a damaged chat set ------------------------------------------


def chat_data_cases(rng: random.Random) -> list[Case]:
    """The prepared chat set with <split>.mask.bin or <split>.starts.bin damaged, or meta.json's chat
    keys edited, under train.py from scratch (and, for the token files, eval.py's bpb)."""
    import numpy as np

    def cut(kind: str, split: str, how: str) -> Callable[[Path], None]:
        def damage(data: Path) -> None:
            path = data / f"{split}.{kind}.bin"
            raw = path.read_bytes()
            if how == "missing":
                path.unlink()
            elif how == "empty":
                path.write_bytes(b"")
            elif how == "one byte short":
                path.write_bytes(raw[:-1])
            elif how == "one byte more":
                path.write_bytes(raw + b"\0")
            else:  # a fraction
                path.write_bytes(raw[: int(len(raw) * float(how))])

        return damage

    def masked(split: str, value: int, everywhere: bool, at: float) -> Callable[[Path], None]:
        def damage(data: Path) -> None:
            path = data / f"{split}.mask.bin"
            mask = np.fromfile(path, dtype=np.uint8)
            if everywhere:
                mask[:] = value
            else:
                mask[int(at * len(mask))] = value
            mask.tofile(path)

        return damage

    def starts_edit(split: str, how: str, at: float) -> Callable[[Path], None]:
        def damage(data: Path) -> None:
            path = data / f"{split}.starts.bin"
            starts = np.fromfile(path, dtype=np.int64)
            i = 1 + int(at * (len(starts) - 2))  # an inner offset
            if how == "two swapped":
                starts[i], starts[i + 1] = starts[i + 1], starts[i]
            elif how == "one repeated":
                starts[i] = starts[i - 1]
            elif how == "reversed":
                starts = starts[::-1].copy()
            elif how == "last + 1":
                starts[-1] += 1
            elif how == "last - 1":
                starts[-1] -= 1
            elif how == "first 1":
                starts[0] = 1
            elif how == "first -1":
                starts[0] = -1
            elif how == "one 2**62":
                starts[i] = 2**62
            elif how == "one more offset":
                starts = np.append(starts, starts[-1] + 1)
            starts.tofile(path)

        return damage

    REMOVE = object()  # meta_edit: the key taken out

    def meta_edit(key: str, value: object) -> Callable[[Path], None]:
        def damage(data: Path) -> None:
            meta = json.loads((data / "meta.json").read_text())
            if value is REMOVE:
                meta.pop(key, None)
            else:
                meta[key] = value
            (data / "meta.json").write_text(json.dumps(meta))

        return damage

    damages: list[tuple[str, Callable[[Path], None], bool]] = []  # (what, damage, also under eval's bpb)
    for split in ("train", "val"):
        for kind in ("mask", "starts"):
            for how in ["missing", "empty", "one byte short", "one byte more", f"{rng.random():.2f}"]:
                damages.append((f"{split}.{kind}.bin {how}", cut(kind, split, how), True))
        for value in (2, 7, 255, 0):
            damages.append((f"{split}.mask.bin all {value}", masked(split, value, True, 0), False))
        for value in (2, 7, 255):
            damages.append(
                (f"{split}.mask.bin one byte {value}", masked(split, value, False, rng.random()), False)
            )
        hows = ["two swapped", "one repeated", "reversed", "last + 1", "last - 1", "first 1", "first -1"]
        for how in [*hows, "one 2**62", "one more offset"]:
            damages.append((f"{split}.starts.bin {how}", starts_edit(split, how, rng.random()), True))
    meta_values = {
        "chat": [False, None, "yes", 0, 1, REMOVE],
        "end_of_turn": [None, -1, 300, 2**40, "x", 1.5, REMOVE],
        "learn": ["none", None, 1, REMOVE],
        "train_conversations": [0, -1, 37, None, "x", 1e30, REMOVE],
        "val_conversations": [0, 5, None, REMOVE],
        "train_dropped": [-1, "x", None],
        "chat_template": ["", None, 5, "{% for", CHATML],
    }
    for key, values in meta_values.items():
        for value in values:
            shown = " removed" if value is REMOVE else f"={value!r}"
            damages.append((f"meta.json {key}{shown}", meta_edit(key, value), False))
    cases = []
    for what, damage, with_eval in damages:

        def data(d: Path, damage=damage) -> Path:
            shutil.copytree(d / "chat" / "data", d / "cdata")
            damage(d / "cdata")
            return d / "cdata"

        cases.append(
            Case(
                f"train chat data: {what}",
                train.main,
                lambda d, f=data: [f"--out_dir={d / 'cout'}", f"--data_dir={f(d)}", *CHAT_TINY],
            )
        )
        if what.startswith("meta.json chat_template"):  # read only where a chat task is scored
            cases.append(
                Case(
                    f"train chat data --eval_tasks=a chat task: {what}",
                    train.main,
                    lambda d, f=data: [
                        f"--out_dir={d / 'cout'}",
                        f"--data_dir={f(d)}",
                        *CHAT_TINY,
                        f"--eval_tasks={d / 'chat' / 'task.jsonl'}",
                    ],
                )
            )
        if what.startswith("train.starts.bin") or what.startswith("train.mask.bin all"):  # one per row too
            cases.append(
                Case(
                    f"train chat data --chat_packing=False: {what}",
                    train.main,
                    lambda d, f=data: [
                        f"--out_dir={d / 'cout'}",
                        f"--data_dir={f(d)}",
                        *CHAT_TINY,
                        "--chat_packing=False",
                    ],
                )
            )
        if with_eval:
            cases.append(
                Case(
                    f"eval bpb chat data: {what}",
                    eval_cli.main,
                    lambda d, f=data: [f"--out_dir={d / 'chat' / 'run'}", f"--data_dir={f(d)}"],
                )
            )
    return cases


def all_cases(rng: random.Random) -> list[Case]:
    def train_base(d: Path) -> list[str]:
        return [f"--out_dir={d / 'run'}", "--init_from=resume", f"--data_dir={d / 'data'}", *TINY[5:]]

    cases = config_cases("train", train.main, TrainConfig, train_base)
    cases += config_cases("sample", sample.main, sample.SampleConfig, char_sample)
    cases += config_cases(
        "eval",
        eval_cli.main,
        eval_cli.EvalConfig,
        lambda d: [f"--out_dir={d / 'run'}", f"--data_dir={d / 'data'}", "--batch_size=64"],
    )
    cases += damaged_files(rng) + flag_cases()
    cases += chat_prepare_cases() + lora_cases() + lora_damage_cases(rng) + convert_lora_cases()
    cases += speculative_cases(rng) + sample_chat_cases() + eval_chat_cases() + chat_data_cases(rng)
    return cases


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so no CLI handler swallows it."""


def run_case(case: Case, shared: Path, timeout: int) -> tuple[str, str]:
    """(outcome, stderr's last line) of one case, in a fresh copy of the shared files."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in SHARED:
            shutil.copytree(shared / name, folder / name)
        err, out = io.StringIO(), io.StringIO()
        stdin = io.TextIOWrapper(io.BytesIO(case.stdin), encoding="utf-8")  # strict, as a UTF-8 terminal's
        signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Hang()))
        signal.alarm(timeout)
        code: object = None
        try:
            # in the case's own folder: a fuzzed relative --out_dir lands there, not in the checkout
            with (
                contextlib.chdir(folder),
                contextlib.redirect_stderr(err),
                contextlib.redirect_stdout(out),
                mock.patch.object(sys, "stdin", stdin),
            ):
                case.main(case.argv(folder))
        except SystemExit as e:
            code = e.code
        except Hang:
            code = "hang"
        except BaseException as e:  # escaped main: a traceback for the user
            err.write(f"Traceback (escaped main): {type(e).__name__}: {e}\n")
        finally:
            signal.alarm(0)
        text = err.getvalue()
        last = text.strip().splitlines()[-1] if text.strip() else ""
        for run in RUNS:
            try:
                load_checkpoint(folder / run / CKPT_NAME)
            except Exception:
                return "loss", f"{run}/{CKPT_NAME} no longer loads; {last}"
    if code == "hang":
        return "hang", last
    if "Traceback" in text or code not in (0, 1, 2, None):
        return "traceback", last
    if "internal error" in last:
        return "last-resort", last
    if code in (0, None):
        return "ok", last
    return (
        ("error", last) if last.startswith(("error:", "usage:")) or "error:" in last else ("traceback", last)
    )


def prepare(shared: Path) -> None:
    """A prepared character-level data set, a finished tiny run on it, and its Hugging Face export; a
    LoRA run from that run; a chat tokenizer (vocabulary 300), conversations, a chat task, a chat set
    prepared from them and a tiny run on it (shared/chat). A few seconds."""
    data, run = shared / "data", shared / "run"
    source = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "data/shakespeare_char/prepare.py"),
            "--input",
            source,
            "--out_dir",
            data,
        ],
        check=True,
        capture_output=True,
    )
    chat = shared / "chat"
    save_chat_tokenizer(chat / "tokenizer", "qwen3")
    write_jsonl(chat / "conversations.jsonl", conversations(40))
    write_jsonl(chat / "task.jsonl", conversations(3, seed=1))  # each ends with the assistant's reply
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        flags = [f"--tokenizer={chat / 'tokenizer'}", f"--out_dir={chat / 'data'}", "--val_fraction=0.1"]
        for main, argv in [
            (train.main, [f"--out_dir={run}", f"--data_dir={data}", *TINY, "--always_save_checkpoint=True"]),
            (chat_prepare_main, [f"--input={chat / 'conversations.jsonl'}", *flags]),
            (train.main, [f"--out_dir={chat / 'run'}", f"--data_dir={chat / 'data'}", *CHAT_TINY]),
            (train.main, [*lora_fresh(shared)[1:], f"--out_dir={shared / 'lora'}"]),
        ]:
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == 0, (argv, e.code)
        convert.export_hf(run, shared / "hf")


def fuzz(sample_size: int | None, seed: int, timeout: int) -> Counter:
    import torch

    torch.set_num_threads(1)
    rng = random.Random(seed)
    cases = all_cases(rng)
    if sample_size is not None:
        cases = rng.sample(cases, min(sample_size, len(cases)))
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp)
        # --hf_dataset on a local folder: never the hub, and the datasets cache in the temporary folder
        os.environ |= {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        os.environ["HF_DATASETS_CACHE"] = str(shared / "datasets_cache")  # read when datasets is imported
        prepare(shared)
        for i, case in enumerate(cases, 1):
            outcome, last = run_case(case, shared, timeout)
            counts[outcome] += 1
            if outcome not in ("ok", "error"):
                print(f"{outcome}: {case.name}: {last[:200]}", flush=True)
            if i % 50 == 0:  # a run cut short still says how far it got
                print(f"after {i} of {len(cases)}: {dict(sorted(counts.items()))}", flush=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sample", type=int, default=None, help="run only N cases, drawn with --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=120, help="seconds after which a case is a hang")
    args = parser.parse_args()
    counts = fuzz(args.sample, args.seed, args.timeout)
    print(f"{sum(counts.values())} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    sys.exit(1 if counts["traceback"] or counts["last-resort"] or counts["hang"] or counts["loss"] else 0)


if __name__ == "__main__":
    main()
