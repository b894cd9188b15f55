"""eval.py: bits per byte against hand computations, the multiple-choice scorer against direct
per-choice sums, one process against two, the HellaSwag download, periodic task evaluation in
train.py, bad input, and lm-eval scoring our export the same way.

tiny_task.jsonl holds eight hand-made examples in Tiny Shakespeare's alphabet; one context is longer
than the models' block_size. Tiny models, one thread (see test_train.py).
"""

import json
import math
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TORCHRUN

import eval
import loss_eval
import tasks
import train
from checkpoint import CKPT_NAME, load_checkpoint, load_model_and_tokenizer, save_checkpoint
from model import GPT, GPTConfig
from runtime import UserError
from tokenizer import CharTokenizer, TiktokenTokenizer, get_tokenizer, tokenizer_entry_from_meta

TASK = Path(__file__).resolve().parent / "tiny_task.jsonl"
REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def overfit_run(char_data, tmp_path_factory) -> Path:
    """out_dir of a tiny model (block_size 64, Shakespeare's characters) trained on the right answers
    of tiny_task.jsonl until it knows them; its config names char_data, so bpb finds a data set."""
    meta = json.loads((char_data / "meta.json").read_text())
    tokenizer = get_tokenizer(meta)
    config = GPTConfig(vocab_size=meta["vocab_size"], block_size=64, n_layer=2, n_head=2, n_embd=32)
    texts = [ex.context + " " + ex.choices[ex.label] for ex in tasks.load_task(str(TASK))]
    windows = [tokenizer.encode(text)[-(config.block_size + 1) :] for text in texts]  # as the scorer cuts
    x = torch.zeros(len(windows), config.block_size, dtype=torch.long)
    y = torch.full_like(x, -1)
    for row, window in enumerate(windows):
        x[row, : len(window) - 1], y[row, : len(window) - 1] = (
            torch.tensor(window[:-1]),
            torch.tensor(window[1:]),
        )
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("overfit")
    checkpoint = {
        "model": model.state_dict(),
        "model_args": asdict(config),
        "iter_num": 120,
        "config": {"data_dir": str(char_data)},
        "tokenizer": tokenizer_entry_from_meta(meta),
    }
    save_checkpoint(checkpoint, out / CKPT_NAME)
    return out


def run_eval(*flags: str) -> int:
    """eval.py's CLI in this process; the exit code."""
    with pytest.raises(SystemExit) as exit_info:
        eval.main(["--device=cpu", *flags])
    return exit_info.value.code


def task_chars() -> list[str]:
    return sorted({ch for ex in tasks.load_task(str(TASK)) for ch in ex.context + " " + "".join(ex.choices)})


def random_model(vocab_size: int, block_size: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    return GPT(config).double().eval()  # float64: batched and one-row forwards agree to ~1e-12


# --- bits per byte --------------------------------------------------------------------------------


def test_bits_per_byte_of_a_uniform_char_model_is_the_hand_computed_value():
    text = "héllo wörld"  # 11 characters, 9 distinct; 'é' and 'ö' take two UTF-8 bytes each
    tokenizer = CharTokenizer(sorted(set(text)))
    model = GPT(GPTConfig(vocab_size=9, block_size=4, n_layer=1, n_head=2, n_embd=8)).double()
    for p in model.parameters():
        torch.nn.init.zeros_(p)  # every logit 0: each of the 10 predicted characters costs log2(9) bits
    tokens = np.array(tokenizer.encode(text), dtype=np.uint16)
    bpb, n_bytes = loss_eval.bits_per_byte(model, tokenizer, tokens, batch_size=2, device=CPU)
    assert n_bytes == 12  # "éllo wörld": 10 characters, two of them two bytes long
    assert bpb == pytest.approx(10 * math.log2(9) / 12, rel=1e-7)  # model.py's loss is float32


def test_bits_per_byte_of_a_uniform_bpe_model_counts_the_bytes_its_tokens_decode_to():
    text = "Où est le café? Ça va, señor; naïve coöperation."
    tokenizer = TiktokenTokenizer("gpt2")
    tokens = np.array(tokenizer.encode(text), dtype=np.uint16)
    model = GPT(GPTConfig(vocab_size=50257, block_size=8, n_layer=1, n_head=2, n_embd=8)).double()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    bpb, n_bytes = loss_eval.bits_per_byte(model, tokenizer, tokens, batch_size=2, device=CPU)
    first_token_bytes = len(tokenizer.decode_bytes(tokens[:1].tolist()))
    assert n_bytes == len(text.encode("utf-8")) - first_token_bytes
    assert bpb == pytest.approx((len(tokens) - 1) * math.log2(50257) / n_bytes, rel=1e-7)


def test_bits_per_byte_equals_the_summed_log2_probabilities_of_a_random_model():
    text = "Wherefore art thou, Romeo? Deny thy father."
    tokenizer = CharTokenizer(sorted(set(text)))
    model = random_model(tokenizer.vocab_size, block_size=8, seed=3)
    tokens = np.array(tokenizer.encode(text), dtype=np.uint16)
    bits = 0.0
    for start in range(0, len(tokens) - 1, 8):  # every token predicted once, from its window's start
        window = torch.tensor(tokens[start : start + 9].astype(np.int64))[None]
        logits, _ = model(window[:, :-1], window[:, 1:])
        logp = F.log_softmax(logits[0], dim=-1)
        bits -= logp[torch.arange(window.size(1) - 1), window[0, 1:]].sum().item() / math.log(2)
    bpb, _ = loss_eval.bits_per_byte(model, tokenizer, tokens, batch_size=3, device=CPU)
    assert bpb == pytest.approx(bits / len(text[1:].encode("utf-8")), rel=1e-6)  # float32 loss


# --- the multiple-choice scorer -------------------------------------------------------------------


def direct_logprob(model: GPT, tokenizer: CharTokenizer, context: str, continuation: str) -> float:
    """Sum of the continuation's log-probabilities from one full forward pass over the last
    block_size + 1 characters of context + continuation."""
    window = torch.tensor(tokenizer.encode(context + continuation)[-(model.config.block_size + 1) :])[None]
    logits, _ = model(window[:, :-1], window[:, 1:])
    logp = F.log_softmax(logits[0], dim=-1)[torch.arange(window.size(1) - 1), window[0, 1:]]
    return logp[-len(continuation) :].sum().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scorer_ranks_choices_exactly_as_direct_per_choice_sums_in_any_batch_size(seed):
    examples = tasks.load_task(str(TASK))
    tokenizer = CharTokenizer(task_chars())
    model = random_model(tokenizer.vocab_size, block_size=32, seed=seed)  # one context is 166 characters
    direct = [[direct_logprob(model, tokenizer, ex.context, " " + c) for c in ex.choices] for ex in examples]
    for batch_size in (1, 3, 64):
        scores = tasks.choice_scores(model, tokenizer, examples, batch_size, CPU)
        assert all(np.allclose(s, d, rtol=0, atol=1e-9) for s, d in zip(scores, direct))
        assert [np.argsort(s).tolist() for s in scores] == [np.argsort(d).tolist() for d in direct]


def test_a_context_longer_than_block_size_keeps_its_end_and_the_whole_continuation():
    tokenizer = CharTokenizer(task_chars())
    model = random_model(tokenizer.vocab_size, block_size=32, seed=5)
    long = next(ex for ex in tasks.load_task(str(TASK)) if len(ex.context) > 100)
    assert [len(c) for c in long.choices] == [5, 7]
    scores = tasks.choice_scores(model, tokenizer, [long], 8, CPU)[0]
    for choice, score in zip(long.choices, scores):
        kept = 32 + 1 - len(" " + choice)  # the window: block_size inputs and the last token predicted
        cut = tasks.Example(long.context[-kept:], (choice, choice), 0)
        assert tasks.choice_scores(model, tokenizer, [cut], 8, CPU)[0][0] == pytest.approx(score, abs=1e-12)


def test_trailing_whitespace_of_a_context_moves_to_the_continuation_as_in_lm_eval():
    tokenizer = CharTokenizer(task_chars())
    model = random_model(tokenizer.vocab_size, block_size=32, seed=6)
    spaced = tasks.Example("All the world's a ", ("stage,", "spoon,"), 0)
    scores = tasks.choice_scores(model, tokenizer, [spaced], 2, CPU)[0]
    assert scores == pytest.approx(
        [direct_logprob(model, tokenizer, "All the world's a", "  " + c) for c in spaced.choices]
    )


def test_acc_norm_divides_by_the_choice_length_in_characters():
    """A scorer whose sums favour the short wrong choice, but not per character."""
    example = tasks.Example("Now is the winter of our", ("discontent.", "tea."), 0)
    sums = [-11.0, -6.0]  # -1.0 per character against -1.5
    assert tasks.best(sums) == 1
    assert tasks.best([s / len(c) for s, c in zip(sums, example.choices)]) == 0
    assert tasks.best([-1.0, -1.0]) == 0  # a tie goes to the first, as numpy's argmax


def test_tiny_overfit_model_gets_every_hand_made_example_right(overfit_run, capsys):
    assert run_eval(f"--out_dir={overfit_run}", f"--tasks={TASK}") == 0
    assert "tiny_task: acc 1.0000, acc_norm 1.0000 (8 examples" in capsys.readouterr().out


# --- processes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lines_task(char_data, tmp_path_factory) -> Path:
    """41 examples cut from the val text: the true next 3 to 14 characters of a context against three
    other pieces of such lengths. The overfit model never saw them: it gets some right, some wrong,
    and acc and acc_norm differ."""
    path, n = tmp_path_factory.mktemp("lines") / "lines.jsonl", 41
    meta = json.loads((char_data / "meta.json").read_text())
    val = np.fromfile(char_data / "val.bin", dtype=meta["dtype"])[:20000]
    text = get_tokenizer(meta).decode(val.tolist())
    rng = np.random.default_rng(0)
    lines = []
    for start in rng.integers(0, len(text) - 100, size=n):
        pieces = [
            (s, int(k))
            for s, k in zip(
                [start + 40, *rng.integers(0, len(text) - 20, size=3)], rng.integers(3, 15, size=4)
            )
        ]
        right, *wrong = [text[s : s + k] for s, k in pieces]
        label = int(rng.integers(0, 4))
        choices = wrong[:label] + [right] + wrong[label:]
        lines.append(json.dumps({"context": text[start : start + 40], "choices": choices, "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_two_processes_give_the_same_results_as_one(overfit_run, lines_task, tmp_path):
    flags = [f"--out_dir={overfit_run}", f"--tasks=bpb,{lines_task},{TASK}", "--batch_size=5"]
    result = subprocess.run(
        [*TORCHRUN, REPO / "eval.py"] + flags + ["--device=cpu", f"--json={tmp_path / 'two.json'}"],
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_eval(*flags, f"--json={tmp_path / 'one.json'}") == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (
        one.keys()
        == two.keys()
        == {"bpb", "lines/acc", "lines/acc_norm", "tiny_task/acc", "tiny_task/acc_norm"}
    )
    assert 0 < one["lines/acc"] < 1  # neither all nor nothing: a lost or doubled example would show
    assert one["lines/acc"] != one["lines/acc_norm"]
    assert two["bpb"] == pytest.approx(one["bpb"], rel=1e-6)
    assert all(two[key] == one[key] for key in one if key != "bpb")


# --- HellaSwag ------------------------------------------------------------------------------------

HELLASWAG_LINES = [  # made up, in the shape of rowanz/hellaswag's hellaswag_val.jsonl
    {
        "ind": 1,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to grow basil [title] Choose a sunny spot.",
        "ctx_b": "basil NEEDS  six hours of sun",
        "endings": ["[step] Water it daily.", "a day.", "[substeps] Paint the  pot.", "and sing."],
        "label": "0",
        "split": "val",
    },
    {
        "ind": 2,
        "activity_label": "Rope skipping",
        "ctx_a": "A girl holds a rope.",
        "ctx_b": "she",
        "endings": ["jumps over it.", "eats it.", "sells it.", "paints it."],
        "label": 0,
        "split": "val",
    },
]


def test_hellaswag_is_downloaded_once_and_prepared_as_lm_eval_prepares_it(tmp_path, monkeypatch):
    source = tmp_path / "source" / "hellaswag_val.jsonl"
    source.parent.mkdir()
    source.write_text("".join(json.dumps(line) + "\n" for line in HELLASWAG_LINES))
    monkeypatch.setattr(tasks, "TASK_DIR", tmp_path / "tasks")
    monkeypatch.setattr(tasks, "HELLASWAG_URL", source.as_uri())  # file://: urllib's download path, offline
    expected = [
        tasks.Example(
            "Home and Garden: How to grow basil. Choose a sunny spot. Basil needs six hours of sun",
            (" Water it daily.", "a day.", " Paint the pot.", "and sing."),
            0,
        ),
        tasks.Example(
            "Rope skipping: A girl holds a rope. She",
            ("jumps over it.", "eats it.", "sells it.", "paints it."),
            0,
        ),
    ]
    assert tasks.load_task("hellaswag") == expected
    assert (tmp_path / "tasks" / "hellaswag_val.jsonl").read_bytes() == source.read_bytes()
    source.unlink()  # from the cache now, no second download
    assert tasks.load_task("hellaswag", max_examples=1) == expected[:1]


def test_a_failed_hellaswag_download_says_how_to_work_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "TASK_DIR", tmp_path / "tasks")
    monkeypatch.setattr(tasks, "HELLASWAG_URL", (tmp_path / "missing.jsonl").as_uri())
    with pytest.raises(UserError, match=r"could not download .* copy hellaswag_val.jsonl .* into .*tasks"):
        tasks.load_task("hellaswag")
    assert not (tmp_path / "tasks" / "hellaswag_val.jsonl").exists()


# --- periodic evaluation in train.py ----------------------------------------------------------------

TINY_TRAIN = (
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--batch_size=4",
    "--gradient_accumulation_steps=2",
    "--eval_iters=2",
    "--eval_interval=3",
    "--log_interval=1",
    "--max_iters=6",
    "--eval_full=False",
    "--dropout=0.1",  # dropout draws random numbers: evaluation must not move them
    "--always_save_checkpoint=True",
)


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_periodic_task_evaluation_is_logged_and_leaves_training_unchanged(char_data, tmp_path):
    runs = {"off": [], "on": [f"--eval_tasks={TASK}", "--eval_task_examples=5"]}
    for name, flags in runs.items():
        with pytest.raises(SystemExit) as exit_info:
            train.main([f"--out_dir={tmp_path / name}", f"--data_dir={char_data}", *TINY_TRAIN, *flags])
        assert exit_info.value.code == 0
    off, on = metrics(tmp_path / "off"), metrics(tmp_path / "on")
    drop = ("tiny_task/acc", "tiny_task/acc_norm", "ms_per_iter", "tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in on] == [
        {k: v for k, v in r.items() if k not in drop} for r in off
    ]
    scored = [r for r in on if "tiny_task/acc" in r]
    assert [r["iter"] for r in scored] == [0, 3, 6] and all("val_loss" in r for r in scored)
    assert all(r["tiny_task/acc"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) for r in scored)  # of 5 examples
    a, b = (load_checkpoint(tmp_path / name / CKPT_NAME)["model"] for name in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad input ------------------------------------------------------------------------------------

BAD_TASK_FILES = [
    ("not_json", '{"context": "To be", "choices": ["a", "b"], "label": 0}\n{oops\n', "line 2: not JSON"),
    ("no_label", '{"context": "To be", "choices": ["a", "b"]}\n', "line 1: no 'label'"),
    ("label_out_of_range", '{"context": "To be", "choices": ["a", "b"], "label": 2}\n', "label must be"),
    ("one_choice", '{"context": "To be", "choices": ["a"], "label": 0}\n', "two or more"),
    ("empty_context", '{"context": "", "choices": ["a", "b"], "label": 0}\n', "context must be"),
    ("a_list", '["To be", ["a", "b"], 0]\n', "not a JSON object"),
    ("empty", "\n", "holds no examples"),
    (
        "digits",
        '{"context": "To be or not 2 be", "choices": ["a", "b"], "label": 0}\n',
        "not in the vocabulary",
    ),
    (
        "long_choice",
        '{"context": "To be", "choices": ["a", "' + "b" * 70 + '"], "label": 0}\n',
        "longer than",
    ),
]


@pytest.mark.parametrize("name, content, message", BAD_TASK_FILES, ids=[c[0] for c in BAD_TASK_FILES])
def test_a_bad_task_file_is_one_line_and_exit_1(overfit_run, tmp_path, capsys, name, content, message):
    task = tmp_path / f"{name}.jsonl"
    task.write_text(content)
    assert run_eval(f"--out_dir={overfit_run}", f"--tasks={task}") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "flags, code, message",
    [
        (["--tasks=hellaswg"], 2, "unknown task 'hellaswg': did you mean 'hellaswag'?"),
        (["--tasks="], 2, "tasks is empty"),
        (["--tasks=missing/task.jsonl"], 1, "task file missing/task.jsonl not found"),
        (["--tasks=bpb", "--max_examples=0"], 2, "max_examples must be at least 1"),
        (["--tasks=bpb", "--data_dir=nowhere"], 1, "not prepared"),
    ],
)
def test_bad_flags_and_missing_files_are_one_line_with_the_policy_exit_code(
    overfit_run, capsys, flags, code, message
):
    assert run_eval(f"--out_dir={overfit_run}", *flags) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_train_refuses_an_unknown_eval_task_before_it_starts(char_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={tmp_path}", f"--data_dir={char_data}", "--eval_tasks=hellaswag,pica"])
    assert exit_info.value.code == 2
    assert "unknown task 'pica'" in capsys.readouterr().err


# --- lm-eval --------------------------------------------------------------------------------------

LM_EVAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_lm_eval_scores_our_export_as_eval_py_does(overfit_run, lines_task, tmp_path, monkeypatch):
    """lm-eval's Hugging Face backend on the folder convert.py exports (weights and tokenizer, no
    override), on task files given to it as local tasks: the same per-choice log-likelihoods,
    the same pick per example by acc and by acc_norm, the same accuracies."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm-eval's Hugging Face backend needs it
    import convert

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # its datasets cache, not the user's
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf_dir = tmp_path / "hf"
    convert.export_hf(overfit_run, hf_dir)
    model, tokenizer, checkpoint = load_model_and_tokenizer(overfit_run)
    task_files = {"tiny_task": TASK, "lines": lines_task}
    (tmp_path / "tasks").mkdir()
    for name, path in task_files.items():
        (tmp_path / "tasks" / f"{name}.yaml").write_text(LM_EVAL_TASK.format(name=name, path=path))

    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8, dtype="float32")
    task_manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    theirs = simple_evaluate(model=lm, tasks=list(task_files), task_manager=task_manager, bootstrap_iters=0)

    for name, path in task_files.items():
        examples = tasks.load_task(str(path))
        ours = tasks.choice_scores(model, tokenizer, examples, 4, CPU)
        samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == len(examples)
        for example, scores, sample in zip(examples, ours, samples):
            assert scores == pytest.approx([ll for ll, _ in sample["filtered_resps"]], abs=1e-4)
            per_char = [s / len(c) for s, c in zip(scores, example.choices)]
            assert sample["acc"] == float(tasks.best(scores) == example.label)
            assert sample["acc_norm"] == float(tasks.best(per_char) == example.label)
        accuracy = tasks.accuracy(model, tokenizer, examples, 4, CPU)
        assert theirs["results"][name]["acc,none"] == pytest.approx(accuracy["acc"], abs=1e-12)
        assert theirs["results"][name]["acc_norm,none"] == pytest.approx(accuracy["acc_norm"], abs=1e-12)
