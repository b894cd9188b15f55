"""Chat data against the reference clients: our tokens are transformers' apply_chat_template, our loss
mask is TRL's assistant-only mask and our loss is TRL's loss; and prepare's one-line refusals."""

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
import transformers
from chat_fixtures import (
    CHATML,
    REPO,
    conversations,
    prepare,
    prepare_chat_set,
    save_chat_tokenizer,
    write_jsonl,
)
from trl import SFTConfig, SFTTrainer

import convert
import sample
import train
from chat import ChatFormat
from checkpoint import CKPT_NAME, load_checkpoint, model_from_checkpoint
from configurator import parse_config
from dataset import load_meta, token_file
from eval import EvalConfig, evaluate
from tokenizer import HFTokenizer

pytestmark = pytest.mark.usefixtures("single_thread")
FAMILIES = ("qwen3", "llama")


def hf_model(family: str, vocab_size: int = 300) -> transformers.PreTrainedModel:
    shape = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    heads = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config_class = transformers.Qwen3Config if family == "qwen3" else transformers.LlamaConfig
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config_class(**shape, **heads, head_dim=8))


def read_split(data_dir: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (tokens, mask) of each conversation of a prepared split."""
    meta = load_meta(data_dir)
    tokens = np.fromfile(token_file(data_dir, split), dtype=meta["dtype"])
    mask = np.fromfile(token_file(data_dir, split, "mask"), dtype=np.uint8)
    starts = np.fromfile(token_file(data_dir, split, "starts"), dtype=np.int64)
    return [(tokens[a:b].astype(np.int64), mask[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def trl_rows(tokenizer_dir: Path, model, items: list[list[dict]]) -> tuple[SFTTrainer, list[dict]]:
    """TRL's SFTTrainer with the assistant-only loss, and the rows it prepared from items."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = datasets.Dataset.from_list([{"messages": messages} for messages in items])
    args = SFTConfig(
        output_dir=str(tokenizer_dir.parent / "trl"),
        assistant_only_loss=True,
        max_length=None,
        per_device_train_batch_size=len(items),
        report_to=[],
        use_cpu=True,
    )
    with contextlib.redirect_stderr(io.StringIO()):
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    return trainer, [trainer.train_dataset[i] for i in range(len(items))]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_equal_apply_chat_template_and_mask_equals_trl(tmp_path, family):
    """50 varied conversations (system prompts, 1-3 exchanges, whitespace-only and one-character
    content) through prepare.py: the tokens of each are transformers' own rendering, and the mask is
    the one TRL's assistant_only_loss computes from the template's {% generation %} markers."""
    items = conversations(50, seed=1)
    data_dir = prepare_chat_set(tmp_path, family, n=50, seed=1, val_fraction=0.02)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    ours = read_split(data_dir, "train") + read_split(data_dir, "val")
    _, rows = trl_rows(tmp_path / "tokenizer", hf_model(family), items)
    assert len(ours) == len(items) == len(rows)
    for (ids, mask), messages, row in zip(ours, items, rows):
        expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids.tolist() == expected
        assert np.where(mask == 1, ids, -100).tolist() == row["labels"]
        assert mask[0] == 0 and mask.sum() > 0  # a row never learns its first token: nothing predicts it


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_of_a_batch_equals_trls(tmp_path, family):
    """The same random model in transformers (TRL's trainer) and imported here: the mean loss over the
    assistant tokens of 6 padded conversations agrees within 1e-5."""
    save_chat_tokenizer(tmp_path / "tokenizer", family)
    model = hf_model(family)
    items = conversations(6, seed=2)
    trainer, rows = trl_rows(tmp_path / "tokenizer", model, items)
    batch = trainer.data_collator(rows)
    theirs = trainer.compute_loss(model.eval(), batch).item()
    model.save_pretrained(tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "imported")
    ours_model = model_from_checkpoint(load_checkpoint(tmp_path / "imported" / CKPT_NAME)).eval()
    chat = ChatFormat(HFTokenizer(str(tmp_path / "tokenizer")))
    total, count = 0.0, 0
    for messages in items:
        ids, mask = (torch.tensor(a) for a in chat.encode(messages, "test"))
        targets = torch.where(mask[1:] == 1, ids[1:], -1)
        with torch.no_grad():
            logits, _ = ours_model(ids[None, :-1], targets[None])
        total += torch.nn.functional.cross_entropy(logits[0], targets, ignore_index=-1, reduction="sum")
        count += int(mask[1:].sum())
    assert abs(total.item() / count - theirs) < 1e-5


def test_a_template_file_stands_in_for_a_tokenizer_without_one_and_travels_in_meta(tmp_path):
    save_chat_tokenizer(tmp_path / "tokenizer", "qwen3", template=None)
    source = write_jsonl(tmp_path / "c.jsonl", conversations(10))
    (tmp_path / "chatml.jinja").write_text(CHATML, encoding="utf-8")
    code, _ = run_prepare(tmp_path, source)
    assert code == 1
    code, err = run_prepare(tmp_path, source, f"--chat_template={tmp_path / 'chatml.jinja'}")
    assert code == 0, err
    meta = load_meta(tmp_path / "data")
    assert meta["chat"] and meta["chat_template"] == CHATML and meta["train_conversations"] == 9


def test_a_hugging_face_dataset_is_read_through_the_datasets_library(tmp_path):
    """The download path of --hf_dataset, given a local dataset folder (no hub here)."""
    save_chat_tokenizer(tmp_path / "tokenizer", "llama")
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", conversations(20))
    code, err = run_prepare(tmp_path, None, f"--hf_dataset={tmp_path / 'hub'}")
    assert code == 0, err
    assert load_meta(tmp_path / "data")["val_conversations"] == 1


def test_conversations_longer_than_max_tokens_are_dropped_and_counted(tmp_path, capsys):
    prepare_chat_set(tmp_path, n=40, max_tokens=100)
    meta = load_meta(tmp_path / "data")
    assert meta["train_dropped"] > 0 and meta["train_conversations"] + meta["train_dropped"] == 38
    assert all(len(ids) <= 100 for ids, _ in read_split(tmp_path / "data", "train"))


def run_prepare(folder: Path, source: Path | None, *flags: str) -> tuple[int, str]:
    """data/chat/prepare.py in this process: (exit code, stderr)."""
    argv = ["prepare.py", f"--tokenizer={folder / 'tokenizer'}", f"--out_dir={folder / 'data'}", *flags]
    argv += [f"--input={source}"] if source else []
    err = io.StringIO()
    with (
        mock.patch.object(sys, "argv", argv),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
        pytest.raises(SystemExit) as exit_info,
    ):
        from runtime import exit_on_error

        exit_on_error(prepare.main)
    return exit_info.value.code, err.getvalue()


GOOD = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2 is not valid JSON"),
        (json.dumps({"text": "hi"}), "line 2: expected an object with a 'messages' list"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "line 2: message 1 has role 'bot'"),
        (json.dumps({"messages": GOOD[:1]}), "line 2: no assistant turn"),
        (json.dumps({"messages": [GOOD[0], {"role": "assistant", "content": ""}]}), "message 2 (assistant)"),
        (json.dumps({"messages": []}), "'messages' must be a non-empty list"),
        (json.dumps({"messages": GOOD[::-1]}), "line 2: message 1 is the assistant's"),
        (
            '{"messages": [{"role": "user", "content": "\\ud800"}, ' + json.dumps(GOOD[1]) + "]}",
            "line 2: message 1 is not valid Unicode text (surrogates not allowed at character 0)",
        ),
    ],  # fmt: skip
)
def test_bad_conversations_are_refused_in_one_line_naming_the_line(tmp_path, line, message):
    save_chat_tokenizer(tmp_path / "tokenizer", "qwen3")
    source = tmp_path / "c.jsonl"
    source.write_text(json.dumps({"messages": GOOD}) + "\n" + line + "\n", encoding="utf-8")
    code, err = run_prepare(tmp_path, source)
    assert code == 1 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}{{ m.content }}", "is not valid Jinja: Unexpected end of template."),
        ("{{ raise_exception('no system messages') }}", "fails on it: no system messages"),
        ("{{ 1 / 0 }}", "fails on it: division by zero"),
    ],
)
def test_a_broken_chat_template_file_is_one_line_naming_it(tmp_path, template, message):
    save_chat_tokenizer(tmp_path / "tokenizer", "qwen3")
    (tmp_path / "broken.jinja").write_text(template, encoding="utf-8")
    source = write_jsonl(tmp_path / "c.jsonl", conversations(4))
    code, err = run_prepare(tmp_path, source, f"--chat_template={tmp_path / 'broken.jinja'}")
    assert code == 1 and err.count("\n") == 1 and f"the chat template in {tmp_path / 'broken.jinja'} " in err
    assert message in err, err


def test_tokenizers_that_cannot_chat_are_refused_in_one_line(tmp_path, finished_run):
    """A character-level checkpoint, and a Hugging Face tokenizer without a template."""
    source = write_jsonl(tmp_path / "c.jsonl", conversations(4))
    code, err = run_prepare(tmp_path, source, f"--tokenizer={finished_run}")
    assert code == 1 and "CharTokenizer" in err and "Hugging Face tokenizer" in err, err
    save_chat_tokenizer(tmp_path / "tokenizer", "qwen3", template=None)
    code, err = run_prepare(tmp_path, source)
    assert code == 1 and "has no chat template: pass --chat_template FILE" in err, err


def run_script(path: Path, *flags: str) -> None:
    """A prepare script in this process (its `main` under exit_on_error must exit 0)."""
    spec = importlib.util.spec_from_file_location("script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with mock.patch.object(sys, "argv", [str(path), *flags]), contextlib.redirect_stdout(io.StringIO()):
        script.main()


def exact_match(out_dir: Path, task: Path) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        scores = evaluate(parse_config(EvalConfig(), [f"--out_dir={out_dir}", f"--tasks={task}"]))
    return scores["test/exact_match"]


def test_fine_tuning_teaches_the_held_out_reversal_task_better_than_a_loss_on_every_token(
    tmp_path, shakespeare_input
):
    """A small version of docs/chat.md's demo: a tiny model from scratch on 4,000 reversals of 3 to 7
    letters, 200 iterations. The loss on the replies only gets at least half of 50 held-out
    conversations exactly right (chance: none); the same run with the loss on every token, far fewer."""
    reverse = REPO / "data" / "reverse"
    run_script(
        reverse / "prepare.py",
        f"--input={shakespeare_input}",
        f"--out_dir={tmp_path}",
        "--train=4000",
        "--test=50",
    )
    scores = {}
    for learn in ("assistant", "all"):
        run_script(
            REPO / "data" / "chat" / "prepare.py",
            f"--input={tmp_path / 'train.jsonl'}",
            f"--tokenizer={tmp_path / 'tokenizer'}",
            f"--out_dir={tmp_path / learn}",
            f"--learn={learn}",
        )
        shape = ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64", "--batch_size=16"]
        schedule = ["--max_iters=200", "--eval_interval=200", "--eval_iters=2", "--eval_full=False"]
        rates = [
            "--learning_rate=3e-3",
            "--min_lr=1e-4",
            "--warmup_iters=10",
            "--lr_schedule=wsd",
            "--beta2=0.99",
        ]
        argv = [
            f"--data_dir={tmp_path / learn}",
            f"--out_dir={tmp_path / ('out-' + learn)}",
            "--optimizer=muon",
        ]
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_info:
            train.main([*argv, *shape, *schedule, *rates, "--gradient_accumulation_steps=1"])
        assert exit_info.value.code == 0
        scores[learn] = exact_match(tmp_path / ("out-" + learn), tmp_path / "test.jsonl")
    assert scores["assistant"] >= 0.5 and scores["all"] < scores["assistant"] - 0.3, scores  # 0.84 and 0.02


def test_the_readme_recipe_from_an_imported_model_to_its_chat_export(tmp_path):
    """README's chat fine-tuning steps on a tiny random Qwen3 with the ChatML test tokenizer: import,
    prepare, fine-tune from the imported weights, one chat message, export; transformers then renders
    the export's template as ours and stops generate at its end-of-turn token."""
    save_chat_tokenizer(tmp_path / "hf", "qwen3")
    hf_model("qwen3").save_pretrained(tmp_path / "hf")
    with contextlib.redirect_stdout(io.StringIO()):
        convert.import_hf(tmp_path / "hf", tmp_path / "out-qwen3", block_size=256)
    source = write_jsonl(tmp_path / "c.jsonl", conversations(30))
    run_script(
        REPO / "data" / "chat" / "prepare.py",
        f"--input={source}",
        f"--tokenizer={tmp_path / 'out-qwen3'}",
        f"--out_dir={tmp_path / 'chat'}",
    )
    flags = ["--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--batch_size=2", "--learning_rate=1e-3"]
    argv = [f"--init_from={tmp_path / 'out-qwen3'}", f"--data_dir={tmp_path / 'chat'}"]
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_info:
        train.main([*argv, f"--out_dir={tmp_path / 'tuned'}", *flags, "--gradient_accumulation_steps=1"])
    assert exit_info.value.code == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        sample.main([f"--out_dir={tmp_path / 'tuned'}", "--chat", "--start=hi", "--max_new_tokens=4"])
    assert exit_info.value.code == 0 and out.getvalue().strip()
    with contextlib.redirect_stdout(io.StringIO()):
        convert.export_hf(tmp_path / "tuned", tmp_path / "hf-chat")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf-chat")
    messages = conversations(1, seed=5)[0]
    assert exported.apply_chat_template(messages, tokenize=False) == exported.apply_chat_template(
        messages, tokenize=False, chat_template=CHATML
    )
    generation = json.loads((tmp_path / "hf-chat" / "generation_config.json").read_text())
    assert exported.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
