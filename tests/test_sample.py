"""sample.py against tiny checkpoints built here: a random character-level model, and a GPT-2 BPE model
set by hand to repeat a text whose BPE tokens split multi-byte characters."""

import dataclasses
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY
from test_errors import set_meta

import sample
import train
from checkpoint import CKPT_NAME, load_model_and_tokenizer, save_checkpoint
from generate import generate
from model import GPT, GPTConfig
from tokenizer import Tokenizer, get_tokenizer

BPE_META = {"tokenizer": "tiktoken", "encoding": "gpt2", "eot_token": 50256, "vocab_size": 50257}
MULTIBYTE = "héllo — ✓ 日本 "  # " 日本" is five GPT-2 tokens, none of them whole characters
BLOCK_SIZE = 32
SAMPLE_SEPARATOR = "\n" + sample.SEPARATOR + "\n"


def save_tiny_checkpoint(out_dir: Path, model: GPT, meta: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "model": model.state_dict(),
        "model_args": dataclasses.asdict(model.config),
        "tokenizer": meta,
        "iter_num": 0,
        "config": {},
    }
    save_checkpoint(checkpoint, out_dir / CKPT_NAME)
    return out_dir


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory, shakespeare_input) -> Path:
    chars = sorted(set(shakespeare_input.read_text(encoding="utf-8")))
    meta = {"tokenizer": "char", "chars": chars, "vocab_size": len(chars)}
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=BLOCK_SIZE, n_layer=2, n_head=2, n_embd=32))
    return save_tiny_checkpoint(tmp_path_factory.mktemp("char"), model, meta)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """GPT-2 vocabulary; weights set by hand to a bigram model that repeats MULTIBYTE's tokens forever."""
    cycle = get_tokenizer(BPE_META).encode(MULTIBYTE)  # 11 distinct tokens
    model = GPT(
        GPTConfig(
            vocab_size=50257, block_size=BLOCK_SIZE, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False
        )
    )
    basis = torch.eye(16)
    with torch.no_grad():
        for block in model.layers:  # silenced, so the last hidden state is the current token's embedding
            block.attn.wo.weight.zero_()
            block.mlp.down.weight.zero_()
        for i, (token, next_token) in enumerate(zip(cycle, cycle[1:] + cycle[:1])):
            model.tok_embeddings.weight[token] = basis[i]
            model.lm_head.weight[next_token] = 10 * basis[i]
    return save_tiny_checkpoint(tmp_path_factory.mktemp("bpe"), model, BPE_META)


def run_sample(capsys, out_dir: Path, *flags: str) -> tuple[str, str]:
    with pytest.raises(SystemExit) as exit_info:
        sample.main([f"--out_dir={out_dir}", *flags])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def model_continuations(
    out_dir: Path, prompt_ids: list[int], n: int, rows: int = 1, seed: int = 0, **sampling
) -> list[str]:
    """What the model itself generates after prompt_ids, decoded, for a batch of rows copies of the prompt."""
    model, tokenizer, _ = load_model_and_tokenizer(out_dir)
    idx = torch.tensor([prompt_ids] * rows)
    torch.manual_seed(seed)
    generated = generate(model, idx, n, **sampling)[:, len(prompt_ids) :]
    return [tokenizer.decode(row) for row in generated.tolist()]


def encode(out_dir: Path, text: str) -> list[int]:
    return load_model_and_tokenizer(out_dir)[1].encode(text)


def test_greedy_output_is_deterministic_and_equals_model_greedy_decoding(capsys, char_dir):
    flags = ("--start=ROMEO:", "--temperature=0", "--max_new_tokens=50")  # 50 > BLOCK_SIZE: the window slides
    first, err = run_sample(capsys, char_dir, *flags)
    second, _ = run_sample(capsys, char_dir, *flags)
    [expected] = model_continuations(char_dir, encode(char_dir, "ROMEO:"), 50, temperature=0)
    assert first == second == "ROMEO:" + expected + "\n"
    assert "50 tokens" in err and "tokens/s" in err and "time to first token" in err


def test_compiled_decoding_prints_the_eager_text_and_times_the_compile_apart(capsys, char_dir):
    flags = ("--start=ROMEO:", "--temperature=0", "--max_new_tokens=50")  # restarts past BLOCK_SIZE too
    eager, eager_err = run_sample(capsys, char_dir, *flags)  # the default: 50 tokens do not pay a compile
    compiled, compiled_err = run_sample(capsys, char_dir, *flags, "--compile=True")
    assert compiled == eager
    assert "compiled the decode step in" not in eager_err
    compile_line, summary = compiled_err.strip().splitlines()
    assert compile_line.startswith("compiled the decode step in") and "(not counted below)" in compile_line
    assert summary.startswith("50 tokens (1 x 50)") and "time to first token" in summary


def test_fixed_seed_reproduces_sampled_output_and_another_seed_differs(capsys, char_dir):
    flags = ("--start=ROMEO:", "--temperature=1.0", "--top_k=None", "--max_new_tokens=40")
    first, _ = run_sample(capsys, char_dir, *flags, "--seed=1")
    again, _ = run_sample(capsys, char_dir, *flags, "--seed=1")
    other, _ = run_sample(capsys, char_dir, *flags, "--seed=2")
    assert first == again
    assert first != other


def test_num_samples_are_one_batch_printed_between_dashes(capsys, char_dir):
    out, err = run_sample(
        capsys,
        char_dir,
        "--start=ROMEO:",
        "--num_samples=3",
        "--temperature=1.0",
        "--top_p=0.9",
        "--max_new_tokens=20",
        "--seed=5",
    )
    prompt_ids = encode(char_dir, "ROMEO:")
    rows = model_continuations(char_dir, prompt_ids, 20, rows=3, seed=5, temperature=1.0, top_p=0.9)
    assert out == SAMPLE_SEPARATOR.join("ROMEO:" + row for row in rows) + "\n"
    assert "60 tokens (3 x 20)" in err


def test_first_sample_is_flushed_token_by_token(monkeypatch, char_dir):
    class FlushRecorder(io.StringIO):
        flushes = 0

        def flush(self):
            self.flushes += 1

    stdout = FlushRecorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    with pytest.raises(SystemExit, match="0"):
        sample.main([f"--out_dir={char_dir}", "--start=ROMEO:", "--max_new_tokens=30"])
    assert stdout.flushes >= 30


def test_bfloat16_autocast_generates_on_cpu(capsys, char_dir):
    out, err = run_sample(capsys, char_dir, "--start=ROMEO:", "--dtype=bfloat16", "--max_new_tokens=20")
    assert out.startswith("ROMEO:") and "20 tokens (1 x 20)" in err


def test_file_prompt_reads_the_prompt_from_the_file(capsys, char_dir, tmp_path):
    prompt = "First Citizen:\nBefore we proceed"
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    from_file, _ = run_sample(
        capsys, char_dir, f"--start=FILE:{tmp_path / 'prompt.txt'}", "--max_new_tokens=20"
    )
    inline, _ = run_sample(capsys, char_dir, f"--start={prompt}", "--max_new_tokens=20")
    assert from_file == inline
    assert from_file.startswith(prompt)


def test_prompt_longer_than_block_size_continues_from_its_last_tokens(capsys, char_dir):
    prompt = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    out, err = run_sample(capsys, char_dir, f"--start={prompt}", "--temperature=0", "--max_new_tokens=10")
    [expected] = model_continuations(char_dir, encode(char_dir, prompt)[-BLOCK_SIZE:], 10, temperature=0)
    assert out == prompt + expected + "\n"
    assert f"longer than the model's context of {BLOCK_SIZE}" in err


def test_empty_prompt_starts_from_newline_for_char_level(capsys, char_dir):
    out, _ = run_sample(capsys, char_dir, "--temperature=0", "--max_new_tokens=10")
    assert out == model_continuations(char_dir, encode(char_dir, "\n"), 10, temperature=0)[0] + "\n"


def test_empty_prompt_starts_from_end_of_text_for_bpe(capsys, bpe_dir):
    out, _ = run_sample(capsys, bpe_dir, "--temperature=0", "--max_new_tokens=10")
    assert out == model_continuations(bpe_dir, [50256], 10, temperature=0)[0] + "\n"


def test_empty_prompt_keeps_a_start_token_the_tokenizer_adds():
    class AddsBos(Tokenizer):  # like an imported Hugging Face Llama tokenizer: "" encodes to [BOS]
        eot_token = 2

        def encode(self, text: str) -> list[int]:
            return [1] + [ord(ch) for ch in text]

    assert sample.encode_prompt("", AddsBos()) == [1]


def test_bpe_streaming_prints_only_whole_characters(bpe_dir):
    tokenizer = get_tokenizer(BPE_META)
    model, _, _ = load_model_and_tokenizer(bpe_dir)
    prompt_ids = tokenizer.encode(MULTIBYTE)
    new_ids = generate(model, torch.tensor([prompt_ids]), 22, temperature=0)[0, len(prompt_ids) :].tolist()

    def is_whole_text(ids: list[int]) -> bool:
        try:
            tokenizer.decode_bytes(ids).decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(is_whole_text([i]) for i in new_ids), "the test needs tokens that split a character"
    assert is_whole_text(new_ids)
    result = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"--out_dir={bpe_dir}",
            f"--start={MULTIBYTE}",
            "--temperature=0",
            "--max_new_tokens=22",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    # strict decoding: no broken bytes
    assert result.stdout.decode("utf-8") == MULTIBYTE + tokenizer.decode(new_ids) + "\n"


def write_file(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "case, expected_message, expected_status",
    [
        ("missing checkpoint", "no checkpoint at", 1),
        ("corrupt checkpoint", "corrupt", 1),
        ("checkpoint without tokenizer", "records no tokenizer", 1),
        ("characters outside the vocabulary", "'日' '本'", 1),
        ("missing prompt file", "cannot read the prompt file", 1),
        ("empty prompt, no newline in the vocabulary", "an empty prompt starts from a newline", 1),
        ("negative temperature", "temperature must be 0 (greedy) or more", 2),
        ("unknown device", "unknown device", 2),
        ("unknown key", "unknown config key 'temprature'", 2),
    ],
)
def test_bad_input_exits_nonzero_with_a_clear_message(
    capsys, char_dir, tmp_path, case, expected_message, expected_status
):
    no_newline_meta = {"tokenizer": "char", "chars": ["a", "b", " "], "vocab_size": 3}
    tiny = GPTConfig(vocab_size=3, block_size=8, n_layer=1, n_head=2, n_embd=8)
    out_dir = {  # built only for its own case
        "missing checkpoint": lambda: tmp_path / "nothing",
        "corrupt checkpoint": lambda: write_file(tmp_path / CKPT_NAME, b"not a checkpoint").parent,
        "checkpoint without tokenizer": lambda: save_tiny_checkpoint(tmp_path, GPT(tiny), {}),
        "empty prompt, no newline in the vocabulary": lambda: save_tiny_checkpoint(
            tmp_path, GPT(tiny), no_newline_meta
        ),
    }.get(case, lambda: char_dir)()
    flags = {
        "characters outside the vocabulary": ["--start=日本 ROMEO"],
        "missing prompt file": [f"--start=FILE:{tmp_path / 'absent.txt'}"],
        "negative temperature": ["--temperature=-1"],
        "unknown device": ["--device=tpu9"],
        "unknown key": ["--temprature=0"],
    }.get(case, [])
    argv = [f"--out_dir={out_dir}", *flags]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    assert exit_info.value.code == expected_status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected_message in err


def test_cli_error_has_no_traceback(tmp_path):
    write_file(tmp_path / CKPT_NAME, b"\x00truncated")
    result = subprocess.run(
        [sys.executable, "sample.py", f"--out_dir={tmp_path}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot read checkpoint")


def test_help_documents_the_defined_behaviours(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for documented in (
        "end-of-text token",
        "FILE:path",
        "last block_size",
        "outside a character-level vocabulary",
        "missing, corrupt",
        "separated by a line",
        "one batch",
        "--top_p=None",
        f"max_new_tokens is at least {sample.COMPILE_MIN_TOKENS:,}",
        "larger than the memory free",
    ):
        assert documented in help_text


def test_a_model_with_more_ids_than_its_characters_samples_only_characters(char_data, tmp_path, capsys):
    """An edited meta.json (vocab_size 200 for 65 characters): the model has 200 ids, the tokenizer 65,
    and an untrained model samples the others, which stand for nothing."""
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    set_meta(data, vocab_size=200)
    with pytest.raises(SystemExit, match="0"):
        train.main([f"--out_dir={tmp_path / 'out'}", f"--data_dir={data}", *TINY])
    model, tokenizer, _ = load_model_and_tokenizer(tmp_path / "out")
    assert (model.config.vocab_size, tokenizer.vocab_size) == (200, 65)
    torch.manual_seed(0)
    assert (generate(model, torch.zeros((1, 1), dtype=torch.long), 100) >= 65).any()
    capsys.readouterr()
    with pytest.raises(SystemExit, match="0"):
        sample.main([f"--out_dir={tmp_path / 'out'}", "--max_new_tokens=100", "--seed=0"])
    assert set(capsys.readouterr().out) <= set(tokenizer.itos)
    gpt2 = get_tokenizer({"tokenizer": "tiktoken", "encoding": "gpt2"})  # padded to 50,304 ids in train.py
    assert gpt2.decode([50300, 15496]) == gpt2.decode([15496]) and gpt2.decode_bytes([50303]) == b""
