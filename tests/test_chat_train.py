"""train.py on a chat set (tests/chat_fixtures.py): rows of whole conversations whose attention stays
inside each one, the loss as the mean over the learned tokens of the whole global batch, and what holds
for text sets: any split of the global batch (micro-steps, processes, FSDP) gives the same losses, and a
resumed run repeats the uninterrupted one exactly.

Tolerances are test_train.py's: the same rows in any split, so only the order of float sums differs and
losses agree to 1e-5 relative; a resume is bitwise.
"""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from chat_fixtures import conversations, prepare_chat_set, write_jsonl
from conftest import TORCHRUN, random_model

import batches
import bench_features
import train
from checkpoint import CKPT_NAME, load_checkpoint, model_from_checkpoint
from dataset import ChatRows, load_meta, read_starts, token_file
from model import GPTConfig

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
BLOCK = 192  # most of the fixture's conversations (36 to 256 tokens) fit, the rest are left out
TINY = (
    *("--n_layer=2", "--n_head=2", "--n_embd=32", f"--block_size={BLOCK}", "--eval_iters=2"),
    *("--eval_interval=1000", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3"),
    *("--min_lr=3e-4", "--eval_full=False", "--seed=7", "--dtype=float32", "--compile=False"),
)
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def chat_set(tmp_path_factory) -> Path:
    return prepare_chat_set(tmp_path_factory.mktemp("chat"), n=60, val_fraction=0.2)


def run_train(out_dir: Path, data_dir: Path, *flags: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={out_dir}", f"--data_dir={data_dir}", *TINY, *flags])
    assert exit_info.value.code == 0


def losses(out_dir: Path, key: str = "loss") -> dict[int, float]:
    records = map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
    return {r["iter"]: r[key] for r in records if key in r}


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out_dir / CKPT_NAME)["model"]


def token_losses(model, x, y, segments) -> torch.Tensor:
    logits, _ = model(x, y, segments=segments)
    return F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="none")  # (B, T)


@pytest.mark.parametrize("window", [None, 8], ids=["causal", "sliding-window"])
def test_a_tokens_loss_does_not_change_when_another_conversation_in_its_row_is_replaced(chat_set, window):
    chat = ChatRows(chat_set, load_meta(chat_set), "train", BLOCK)
    a, b, c = sorted(map(int, chat.fitting), key=chat.positions)[:3]  # the shortest three
    assert chat.positions(b) != chat.positions(c) and 2 * chat.positions(a) + chat.positions(c) <= BLOCK
    model = random_model(GPTConfig(vocab_size=300, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32,
                                   sliding_window=window))  # fmt: skip
    # Row 0 is a, b, a; row 1 replaces b by c, so the second a moves.
    x, y, segments = chat.batch([[a, b, a], [a, c, a]], torch.device("cpu"))
    losses = token_losses(model, x, y, segments).detach()
    n, shift = chat.positions(a), chat.positions(c) - chat.positions(b)
    learned = y[0, :n] >= 0
    assert learned.any()
    torch.testing.assert_close(losses[1, :n][learned], losses[0, :n][learned], rtol=0, atol=1e-5)
    second = slice(n + chat.positions(b), 2 * n + chat.positions(b))
    moved = slice(second.start + shift, second.stop + shift)
    torch.testing.assert_close(losses[1, moved][learned], losses[0, second][learned], rtol=0, atol=1e-5)
    # Without segments the second a's first token does see the conversations before it.
    seen, confined = model(x, y)[0][0, second.start], model(x, y, segments=segments)[0][0, second.start]
    assert (seen - confined).abs().max() > 1e-3


def independent_loss(model, data_dir: Path, conversations: list[int], split: str) -> tuple[float, int]:
    """(sum of the loss over the learned targets of each conversation run alone, their count), straight
    from the token, mask and starts files."""
    meta = load_meta(data_dir)
    tokens = np.fromfile(token_file(data_dir, split), dtype=meta["dtype"]).astype(np.int64)
    mask = np.fromfile(token_file(data_dir, split, "mask"), dtype=np.uint8)
    starts = read_starts(data_dir, split)
    total, count = 0.0, 0
    for c in conversations:
        ids, learned = torch.from_numpy(tokens[starts[c] : starts[c + 1]]), mask[starts[c] : starts[c + 1]]
        logits, _ = model(ids[None, :-1], ids[None, 1:])
        per_token = F.cross_entropy(logits[0], ids[1:], reduction="none")
        total += per_token[torch.from_numpy(learned[1:] == 1)].sum().item()
        count += int(learned[1:].sum())
    return total, count


@pytest.fixture(scope="module")
def trained(chat_set, tmp_path_factory) -> Path:
    """A run of 2 iterations on the chat set: a checkpoint to start others from."""
    out = tmp_path_factory.mktemp("trained")
    run_train(out, chat_set, "--max_iters=2", "--batch_size=2", "--gradient_accumulation_steps=2",
              "--eval_interval=2")  # fmt: skip
    return out


def test_the_logged_loss_is_the_mean_over_the_global_batchs_learned_tokens(chat_set, trained, tmp_path):
    """Iteration 1's logged loss is the loss of the checkpoint's weights on iteration 0's rows: 4
    micro-steps of 2 rows, their conversations drawn by global row index."""
    run_train(tmp_path, chat_set, f"--init_from={trained / CKPT_NAME}", "--max_iters=1", "--batch_size=2",
              "--gradient_accumulation_steps=4", "--learning_rate=1e-9", "--min_lr=1e-9")  # fmt: skip
    model = model_from_checkpoint(load_checkpoint(trained / CKPT_NAME)).eval()
    chat = ChatRows(chat_set, load_meta(chat_set), "train", BLOCK)
    rows = [chat.draw(np.random.default_rng([7, batches.CHAT_ROW_STREAM, 0, r])) for r in range(8)]
    assert max(map(len, rows)) > 1  # packed: some rows hold several conversations
    with torch.no_grad():
        parts = [independent_loss(model, chat_set, row, "train") for row in rows]
    total, count = map(sum, zip(*parts))
    assert losses(tmp_path)[1] == pytest.approx(total / count, rel=1e-5)
    # The known bug, a mean per micro-step first, would differ here: uneven learned-token counts.
    micro = [(parts[i][0] + parts[i + 1][0]) / (parts[i][1] + parts[i + 1][1]) for i in range(0, 8, 2)]
    assert abs(np.mean(micro) - total / count) > 1e-3


def test_eval_only_full_val_loss_is_every_fitting_val_conversation_once(chat_set, trained, capsys):
    with pytest.raises(SystemExit, match="0"):
        train.main([f"--init_from={trained / CKPT_NAME}", f"--data_dir={chat_set}", f"--out_dir={trained}",
                    "--eval_only=True", "--eval_full=True", "--batch_size=3", "--eval_iters=2"])  # fmt: skip
    out = capsys.readouterr().out
    chat = ChatRows(chat_set, load_meta(chat_set), "val", BLOCK)
    assert f"val {len(chat.fitting)} ({chat.left_out} left out)" in out and chat.left_out > 0
    model = model_from_checkpoint(load_checkpoint(trained / CKPT_NAME)).eval()
    with torch.no_grad():
        total, count = independent_loss(model, chat_set, [int(c) for c in chat.fitting], "val")
    assert losses(trained, "val_loss_full")[2] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_8_x_1_equals_1_x_8_in_losses_and_weights(chat_set, tmp_path):
    flags = ("--max_iters=3", "--eval_interval=3", "--always_save_checkpoint=True")
    run_train(tmp_path / "accumulated", chat_set, "--batch_size=1", "--gradient_accumulation_steps=8", *flags)
    run_train(tmp_path / "one-batch", chat_set, "--batch_size=8", "--gradient_accumulation_steps=1", *flags)
    accumulated, one_batch = losses(tmp_path / "accumulated"), losses(tmp_path / "one-batch")
    assert sorted(accumulated) == [1, 2, 3]
    for it, loss in one_batch.items():
        assert accumulated[it] == pytest.approx(loss, rel=1e-5), it
    a, b = weights(tmp_path / "accumulated"), weights(tmp_path / "one-batch")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_resumed_chat_run_repeats_the_uninterrupted_one_exactly(chat_set, tmp_path):
    common = ("--batch_size=2", "--gradient_accumulation_steps=2", "--dropout=0.1", "--eval_interval=3",
              "--always_save_checkpoint=True", "--lr_decay_iters=6", "--chat_packing=False")  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(straight, chat_set, "--max_iters=6", *common)
    run_train(split, chat_set, "--max_iters=3", *common)
    run_train(split, chat_set, "--max_iters=6", "--init_from=resume", *common)
    assert list(losses(split).items()) == list(losses(straight).items())
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_match_one_process(chat_set, tmp_path, parallelism):
    """Losses, and the scores of a chat task: 5 replies, so one process has one fewer (under FSDP each
    forward pass is a collective, and it keeps in step without one)."""
    task = write_jsonl(tmp_path / "task.jsonl", conversations(5, seed=1))
    flags = ("--max_iters=3", "--batch_size=2", "--gradient_accumulation_steps=4", "--eval_full=True")
    flags += (f"--eval_tasks={task}", "--eval_interval=3")
    command = [*TORCHRUN, str(REPO / "train.py"), f"--out_dir={tmp_path / 'two'}", f"--data_dir={chat_set}"]
    result = subprocess.run(
        [*command, *TINY, *flags, f"--parallelism={parallelism}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**ENV, "TIKTOKEN_CACHE_DIR": str(REPO.parent / "shared" / "tiktoken_cache")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_train(tmp_path / "one", chat_set, *flags)
    for key in ("loss", "val_loss", "val_loss_full", "task/exact_match"):
        two, one = losses(tmp_path / "two", key), losses(tmp_path / "one", key)
        assert sorted(two) == sorted(one) and one, key
        for it, loss in one.items():
            assert two[it] == pytest.approx(loss, rel=1e-5), (key, it)


def test_no_conversation_that_fits_block_size_is_refused_in_one_line(chat_set, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([f"--out_dir={tmp_path}", f"--data_dir={chat_set}", *TINY, "--block_size=16"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "no train conversation" in err and "raise block_size" in err and "\n" not in err


@pytest.mark.parametrize(
    "damage",
    ["mask", "starts", "offsets", "mask-7"],
    ids=["short-mask", "short-starts", "bad-offsets", "a-7-in-the-mask"],
)
def test_a_damaged_chat_file_is_named_in_one_line(chat_set, tmp_path, damage, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for path in chat_set.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    kind = "mask" if damage.startswith("mask") else "starts"
    path = token_file(data, "val", kind)
    if damage == "offsets":
        starts = read_starts(data, "val")
        starts[1], starts[2] = starts[2], starts[1]
        path.write_bytes(starts.tobytes())
    elif damage == "mask-7":  # the size is right; a byte is neither 0 (not learned) nor 1 (learned)
        mask = bytearray(path.read_bytes())
        mask[len(mask) // 2] = 7
        path.write_bytes(bytes(mask))
    else:
        path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(SystemExit):
        train.main([f"--out_dir={tmp_path / 'out'}", f"--data_dir={data}", *TINY])
    err = capsys.readouterr().err.strip()
    assert str(path) in err and "prepare the data set again" in err and "\n" not in err
    if damage == "mask-7":
        assert "holds a byte 7; a loss mask's bytes are 0 or 1" in err


def test_packing_fills_rows_with_more_learned_tokens_than_one_per_row(chat_set):
    shape = dict(n_layer=1, n_head=2, n_embd=16)
    figures = bench_features.bench_chat_packing(
        chat_set, shape, BLOCK, batch_size=4, steps=4, device=torch.device("cpu")
    )
    packed, single = figures["packed"], figures["one per row"]
    assert packed["conversations_per_row"] > 1 == single["conversations_per_row"]
    assert packed["learned_fraction"] > single["learned_fraction"] > 0
    assert single["real_fraction"] < packed["real_fraction"] <= 1
    assert packed["learned_tokens_per_s"] > 0 and single["learned_tokens_per_s"] > 0


def test_a_batch_with_no_learned_token_sums_to_zero_not_nan():
    model = random_model(GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=2, n_embd=16))
    x, segments = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)
    loss = model(x, torch.full((2, 8), -1), segments=segments, reduction="sum")[1]
    loss.backward()
    assert loss.item() == 0 and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_lora_fine_tunes_on_a_chat_set_changing_only_the_adapters(chat_set, tmp_path):
    """LoRA (lora.py) on a chat set: the adapters ride on forward hooks, whatever forward's arguments
    (segments, the summed loss); the base stays bit-identical and the loss on the replies falls."""
    run_train(tmp_path / "base", chat_set, "--max_iters=2")
    flags = ("--optimizer=adamw", "--lora_rank=4", "--max_iters=8", "--learning_rate=1e-2")
    run_train(tmp_path / "lora", chat_set, f"--init_from={tmp_path / 'base'}", *flags)
    base, tuned = weights(tmp_path / "base"), weights(tmp_path / "lora")
    assert all(torch.equal(tuned[name], tensor) for name, tensor in base.items())
    assert any(".lora." in name for name in tuned)
    loss = losses(tmp_path / "lora")
    assert loss[8] < loss[1]
