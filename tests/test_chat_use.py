"""Chat models at inference: sample.py --chat (a conversation over stdin; start for one message), the
export of a chat model replying in transformers as it does here, eval.py's chat tasks (exact match of
greedy replies) and the one-line refusals. Tiny models on the chat tokenizers of chat_fixtures: random
ones whose greedy tokens depend on the context, and one set by hand to answer "the cat" and end its turn.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from chat_fixtures import CHATML, LLAMA3, save_chat_tokenizer, write_jsonl
from conftest import REPO_ROOT, context_sensitive_model
from test_sample import save_tiny_checkpoint

import convert
import eval
import sample
from chat import ChatFormat
from generate import generate
from model import GPT, GPTConfig
from tokenizer import HFTokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 300  # save_chat_tokenizer's
SHAPE = dict(vocab_size=VOCAB, block_size=256, n_layer=2, n_head=2, n_embd=32)
ANSWER = "the cat"
USER = [{"role": "user", "content": "what sat on the mat"}]


def chat_checkpoint(out_dir: Path, model: GPT, tokenizer_dir: Path, template: str | None = None) -> Path:
    """out_dir holding model with the Hugging Face tokenizer of tokenizer_dir; template: a chat template
    carried by the checkpoint's entry (data/chat/prepare.py --chat_template), in place of the folder's."""
    entry = {"tokenizer": "hf", "path": str(tokenizer_dir), "vocab_size": VOCAB}
    return save_tiny_checkpoint(out_dir, model, entry | ({"chat_template": template} if template else {}))


def answering_model(chat: ChatFormat, block_size: int = 256) -> GPT:
    """A model set by hand to answer every prompt with ANSWER and end its turn. Attention and MLPs are
    silenced, so a token's logits come from that token alone: a chain from the generation prompt's last
    token through ANSWER's tokens to the end-of-turn token."""
    chain = [chat.prompt(USER)[-1], *chat.tok.encode(ANSWER), chat.end_of_turn]
    n_embd = 16
    shape = {**SHAPE, "n_layer": 1, "n_embd": n_embd, "block_size": block_size, "tie_embeddings": False}
    model = GPT(GPTConfig(**shape))
    with torch.no_grad():
        for block in model.layers:
            block.attn.wo.weight.zero_()
            block.mlp.down.weight.zero_()
        for i, (token, next_token) in enumerate(zip(chain, chain[1:])):
            model.tok_embeddings.weight[token] = torch.eye(n_embd)[i]
            model.lm_head.weight[next_token] = 10 * torch.eye(n_embd)[i]
    return model


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory) -> Path:
    """A random model on the Qwen3-shaped tokenizer and its own template."""
    folder = tmp_path_factory.mktemp("qwen3")
    tokenizer = save_chat_tokenizer(folder / "tokenizer", "qwen3")
    return chat_checkpoint(folder / "run", context_sensitive_model(GPTConfig(**SHAPE), 0), tokenizer)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    """A random model on the Llama-3-shaped tokenizer, whose folder has no template: its entry carries it."""
    folder = tmp_path_factory.mktemp("llama")
    tokenizer = save_chat_tokenizer(folder / "tokenizer", "llama", template=None)
    return chat_checkpoint(folder / "run", context_sensitive_model(GPTConfig(**SHAPE), 1), tokenizer, LLAMA3)


def answering_run(folder: Path, block_size: int = 256) -> Path:
    """answering_model on a ChatML tokenizer whose end of text, <|endoftext|>, is not its end of turn:
    transformers' generate stops at <|im_end|> only through the export's generation_config.json."""
    tokenizer = save_chat_tokenizer(folder / "tokenizer", "qwen3")
    config_path = tokenizer / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "eos_token": "<|endoftext|>"}))
    model = answering_model(ChatFormat(HFTokenizer(str(tokenizer))), block_size)
    return chat_checkpoint(folder / "run", model, tokenizer)


@pytest.fixture(scope="module")
def answering(tmp_path_factory) -> Path:
    return answering_run(tmp_path_factory.mktemp("answering"))


def chat(capsys, out_dir: Path, *flags: str) -> tuple[str, str]:
    """sample.py --chat in this process: stdout and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        sample.main([f"--out_dir={out_dir}", "--chat", "--temperature=0", *flags])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured.out, captured.err


def greedy_replies(out_dir: Path, messages: list[str], n: int, system: str = "") -> list[str]:
    """What the model replies to each message in turn, the history kept: the reference, built here from
    ChatFormat.prompt and generate."""
    model, tokenizer, checkpoint = sample.load_model_and_tokenizer(out_dir)
    fmt = ChatFormat(tokenizer, checkpoint["tokenizer"].get("chat_template"))
    history = [{"role": "system", "content": system}] if system else []
    replies = []
    for message in messages:
        history.append({"role": "user", "content": message})
        prompt = fmt.prompt(history)
        ids = generate(model, torch.tensor([prompt]), n, temperature=0)[0, len(prompt) :].tolist()
        ids = ids[: min([ids.index(i) for i in fmt.stop_ids if i in ids], default=n)]
        replies.append(tokenizer.decode_bytes(ids).decode("utf-8", errors="replace"))
        history.append({"role": "assistant", "content": tokenizer.decode(ids)})
    return replies


def test_a_conversation_over_stdin_keeps_the_history(qwen3_run):
    messages = ["hello there", "what is two plus three", "please reverse these letters"]
    flags = ["--chat", "--temperature=0", "--max_new_tokens=6", "--system=be brief"]
    result = subprocess.run(
        [sys.executable, "sample.py", f"--out_dir={qwen3_run}", *flags],
        input="\n".join(messages) + "\n\nnot read: an empty line ends the chat\n",
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    replies = greedy_replies(qwen3_run, messages, 6, system="be brief")
    assert result.stdout == "".join(reply + "\n" for reply in replies)
    # The third reply is the one to the whole history, not to the third message alone.
    assert replies[2] != greedy_replies(qwen3_run, messages[2:], 6, system="be brief")[0]
    assert result.stderr.count("6 tokens (1 x 6)") == 3
    assert result.stderr.count("note: the reply reached max_new_tokens=6 before its end of turn") == 3


def test_a_reply_is_streamed_token_by_token(monkeypatch, qwen3_run):
    class FlushRecorder:
        text, flushes = "", 0

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            self.flushes += 1

    stdout = FlushRecorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    with pytest.raises(SystemExit, match="0"):
        sample.main([f"--out_dir={qwen3_run}", "--chat", "--start=hello", "--max_new_tokens=12"])
    assert stdout.flushes >= 12 and stdout.text.endswith("\n")


def test_start_sends_one_message_and_the_reply_ends_at_its_end_of_turn(capsys, answering, tmp_path):
    out, err = chat(capsys, answering, f"--start={USER[0]['content']}")
    assert out == ANSWER + "\n" and "note" not in err
    (tmp_path / "message.txt").write_text("line one\nline two\n", encoding="utf-8")
    out, _ = chat(capsys, answering, f"--start=FILE:{tmp_path / 'message.txt'}")
    assert out == ANSWER + "\n"
    out, err = chat(capsys, answering, "--start=hi", "--max_new_tokens=1")
    assert ANSWER.startswith(out[:-1]) and len(out) < len(ANSWER) + 1  # ANSWER's first token
    assert "reached max_new_tokens=1 before its end of turn" in err


def test_a_history_beyond_block_size_drops_its_oldest_exchanges(capsys, monkeypatch, tmp_path):
    message = {"role": "user", "content": "the cat sat on a mat and then it ran to the door"}
    reply = {"role": "assistant", "content": ANSWER}
    fmt = ChatFormat(HFTokenizer(str(save_chat_tokenizer(tmp_path / "probe", "qwen3"))))
    block_size = len(fmt.prompt([message, reply] * 2 + [message])) - 1  # the third turn does not fit
    run = answering_run(tmp_path, block_size)
    monkeypatch.setattr(sys, "stdin", io.StringIO((message["content"] + "\n") * 3))
    out, err = chat(capsys, run)
    assert out == (ANSWER + "\n") * 3
    assert err.count("note: the conversation outgrew the model's context") == 1
    assert f"(block_size {block_size}): dropped its oldest 1 exchange(s)" in err


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(capsys, monkeypatch, tmp_path):
    run = answering_run(tmp_path, block_size=64)
    long = " ".join(["the cat sat on a mat"] * 20)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\n{USER[0]['content']}\n{long}\n"))
    out, err = chat(capsys, run)
    assert out == ANSWER + "\n"  # the message between the two long ones is answered
    assert err.count("error: the message takes ") == 2, err
    assert err.count("(block_size 64): send a shorter one; the chat goes on without it") == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\n"))
    _, err = chat(capsys, run, "--system=be brief")
    assert "error: the message and the system message take " in err


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("run", ["qwen3_run", "llama_run", "answering"])
def test_the_export_replies_in_transformers_as_sample_chat_does(capsys, request, tmp_path, run):
    out_dir = request.getfixturevalue(run)
    ours, _ = chat(
        capsys, out_dir, "--system=be brief", f"--start={USER[0]['content']}", "--max_new_tokens=10"
    )
    with pytest.raises(SystemExit, match="0"):
        convert.main(["export", str(out_dir), str(tmp_path / "hf")])
    assert "chat template, and generation_config.json ending a reply at" in capsys.readouterr().out
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    messages = [{"role": "system", "content": "be brief"}, *USER]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
    ids = generated[0, inputs["input_ids"].shape[1] :].tolist()
    end_of_turn = json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"][0]
    assert tok.added_tokens_decoder[end_of_turn].special
    if ids[-1] in model.generation_config.eos_token_id:
        ids = ids[:-1]
    assert ours == tok.decode(ids) + "\n"
    if run == "answering":  # transformers stopped at the end of turn, not at the tokenizer's end of text
        assert ours == ANSWER + "\n"


def test_a_chat_task_scores_the_exact_match_of_greedy_replies(answering, tmp_path, capsys):
    def conversation(answer: str, *before: dict) -> list[dict]:
        return [*before, *USER, {"role": "assistant", "content": answer}]

    system = {"role": "system", "content": "answer in two words"}
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    task = write_jsonl(
        tmp_path / "cat.jsonl",
        [conversation(ANSWER), conversation(ANSWER, system, *earlier), conversation(" The Cat\n"),
         conversation("a dog")],
    )  # fmt: skip
    for normalize in (False, True):
        argv = [f"--out_dir={answering}", f"--tasks={task}", f"--normalize={normalize}", "--device=cpu"]
        with pytest.raises(SystemExit, match="0"):
            eval.main([*argv, f"--json={tmp_path / 'scores.json'}"])
        expected = 0.75 if normalize else 0.5  # " The Cat\n" only normalised; "a dog" never
        assert f"cat: exact_match {expected:.4f} (4 examples" in capsys.readouterr().out
        assert json.loads((tmp_path / "scores.json").read_text()) == {"cat/exact_match": expected}


def refusal(capsys, argv: list[str], module=sample) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return exit_info.value.code, err


@pytest.mark.parametrize(
    "case, expected_message, expected_status",
    [
        ("no template", "has no chat template: pass --chat_template FILE", 1),
        ("char tokenizer", "is a CharTokenizer without a chat template or end-of-turn token", 1),
        ("tiktoken tokenizer", "is a TiktokenTokenizer without a chat template or end-of-turn token", 1),
        ("missing template file", "cannot read the chat template", 1),
        ("broken template file", "broken.jinja is not valid Jinja: unexpected '}' (line 1)", 1),
        ("empty message", "the chat message in start is empty", 1),
        ("message longer than block_size", "more than the model's context (block_size 256)", 1),
        ("two samples", "chat decodes one reply at a time", 2),
        ("system without chat", "chat_template and system are for a chat: add --chat", 2),
    ],
)
def test_bad_chat_input_is_one_line_with_the_policy_exit_code(
    capsys, tmp_path, qwen3_run, case, expected_message, expected_status
):
    tiny = dict(n_layer=1, n_head=2, n_embd=8, block_size=16)
    out_dir = {
        "no template": lambda: chat_checkpoint(
            tmp_path / "run",
            GPT(GPTConfig(**SHAPE)),
            save_chat_tokenizer(tmp_path / "tok", "qwen3", template=None),
        ),
        "char tokenizer": lambda: save_tiny_checkpoint(
            tmp_path, GPT(GPTConfig(vocab_size=3, **tiny)), {"tokenizer": "char", "chars": ["a", "b", "\n"]}
        ),
        "tiktoken tokenizer": lambda: save_tiny_checkpoint(
            tmp_path, GPT(GPTConfig(vocab_size=50257, **tiny)), {"tokenizer": "tiktoken", "encoding": "gpt2"}
        ),
    }.get(case, lambda: qwen3_run)()
    flags = {
        "missing template file": [f"--chat_template={tmp_path / 'absent.jinja'}"],
        "broken template file": [f"--chat_template={write_text(tmp_path / 'broken.jinja', '{{ }')}"],
        "empty message": ["--start= \n"],
        "message longer than block_size": ["--start=" + "the cat " * 200],
        "two samples": ["--num_samples=2"],
        "system without chat": ["--system=be brief"],
    }.get(case, ["--start=hi"])
    chat_flag = [] if case == "system without chat" else ["--chat"]
    argv = [f"--out_dir={out_dir}", *chat_flag, *flags]
    status, err = refusal(capsys, argv)
    assert status == expected_status and expected_message in err


def test_a_template_file_lets_a_tokenizer_without_one_chat_and_the_cli_has_no_traceback(tmp_path):
    tokenizer = save_chat_tokenizer(tmp_path / "tok", "qwen3", template=None)
    run = chat_checkpoint(tmp_path / "run", context_sensitive_model(GPTConfig(**SHAPE), 0), tokenizer)
    argv = [sys.executable, "sample.py", f"--out_dir={run}", "--chat", "--start=hi", "--max_new_tokens=3"]
    refused = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert (
        refused.returncode == 1 and refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr
    )
    (tmp_path / "chatml.jinja").write_text(CHATML, encoding="utf-8")
    argv.append(f"--chat_template={tmp_path / 'chatml.jinja'}")
    answered = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert answered.returncode == 0 and "3 tokens (1 x 3)" in answered.stderr


def test_a_chat_task_whose_last_message_is_not_the_answer_is_one_line(answering, tmp_path, capsys):
    answered = [*USER, {"role": "assistant", "content": ANSWER}]
    task = write_jsonl(tmp_path / "bad.jsonl", [answered, [*answered, *USER]])
    status, err = refusal(capsys, [f"--out_dir={answering}", f"--tasks={task}", "--device=cpu"], eval)
    assert status == 1 and "conversation 2: the last message must be the assistant's expected answer" in err
