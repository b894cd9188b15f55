"""LoRA (lora.py, train.py --lora_rank, convert.py export [--merge]) against PEFT on tiny random Llama and
Qwen3 models made by transformers: the exported adapter and the merged model are PEFT's; training
starts from the base exactly and moves nothing but the adapters; resume, DDP and bad input."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import convert  # noqa: E402  (after the skips: convert.py imports safetensors)
import eval as eval_cli  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from checkpoint import CKPT_NAME, load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from lora import TARGETS, LoRAConfig, add_lora, base_fingerprint, cast_base, is_adapter  # noqa: E402
from train_config import TrainConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]
# A few LoRA iterations of a tiny model on Tiny Shakespeare's characters (the models' vocabulary: 65).
FLAGS = ("--batch_size=2", "--gradient_accumulation_steps=2", "--eval_iters=1", "--eval_interval=2")
FLAGS += ("--log_interval=1", "--eval_full=False", "--always_save_checkpoint=True", "--warmup_iters=0")
FLAGS += ("--learning_rate=1e-2", "--lora_rank=4", "--lora_alpha=8", "--seed=3")
FAMILIES = {  # the two families' tiny configs: GQA and an untied head; QK-norm, a head size of its own, tied
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
}


def run(main, argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def save_hf(path: Path, family: str) -> Path:
    config_class, options = FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=65,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=None,
        eos_token_id=None,
        **options,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def lora_run(request, char_data, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the HF folder, its import, a finished 3-iteration LoRA run from it) for each family."""
    root = tmp_path_factory.mktemp(request.param)
    hf_dir, base, out = save_hf(root / "hf", request.param), root / "base", root / "lora"
    assert run(convert.main, ["import", str(hf_dir), str(base)]) == 0
    flags = (f"--init_from={base}", "--max_iters=3", "--lora_dropout=0.1")
    assert run(train.main, [f"--out_dir={out}", f"--data_dir={char_data}", *FLAGS, *flags]) == 0
    return hf_dir, base, out


@torch.no_grad()
def logits(model, idx: torch.Tensor) -> torch.Tensor:
    """Our model's logits at every position (targets make forward return them all)."""
    return model(idx, targets=idx)[0]


def test_peft_loads_the_exported_adapter_with_our_logits_and_merges_to_our_merged_export(lora_run, tmp_path):
    hf_dir, _, out = lora_run
    assert run(convert.main, ["export", str(out), str(tmp_path / "adapter")]) == 0
    assert run(convert.main, ["export", str(out), str(tmp_path / "merged"), "--merge"]) == 0
    checkpoint = load_checkpoint(out)
    assert any(
        is_adapter(k) and k.split(".")[-2] == "B" and t.abs().max() > 0
        for k, t in checkpoint["model"].items()
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    idx = torch.randint(0, 65, (2, 24))
    ours = model_from_checkpoint(checkpoint, keep_adapters=True).eval()
    with torch.no_grad():
        expected = theirs(idx).logits
    assert (logits(ours, idx) - expected).abs().max() < 1e-5
    assert (logits(model_from_checkpoint(checkpoint).eval(), idx) - expected).abs().max() < 1e-5  # merged
    merged_by_peft = theirs.merge_and_unload().state_dict()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.state_dict().keys() == merged_by_peft.keys()
    for name, tensor in merged.state_dict().items():
        assert (tensor - merged_by_peft[name]).abs().max() < 1e-5, name


def test_training_starts_from_the_base_exactly_and_changes_nothing_but_the_adapters(lora_run):
    _, base, out = lora_run
    imported = load_checkpoint(base)
    model = model_from_checkpoint(imported)
    idx = torch.randint(0, 65, (2, 24))
    before = logits(model.eval(), idx)
    add_lora(model, LoRAConfig(rank=4, alpha=8.0))
    assert torch.equal(logits(model, idx), before)  # B starts at zero
    model.train()(idx, targets=idx)[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == is_adapter(name) == p.requires_grad, name
    trained = load_checkpoint(out)["model"]
    assert {k for k in trained if not is_adapter(k)} == imported["model"].keys()  # the base's own keys
    for name, tensor in imported["model"].items():
        assert torch.equal(trained[name], tensor), name


@pytest.fixture(scope="module")
def llama_base(char_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama")
    assert run(convert.main, ["import", str(save_hf(root / "hf", "llama")), str(root / "base")]) == 0
    return root / "base"


def lora_train(out: Path, data: Path, *flags: str) -> int:
    return run(train.main, [f"--out_dir={out}", f"--data_dir={data}", *FLAGS, *flags])


def losses(out: Path) -> list:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["iter"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_resume_reproduces_the_uninterrupted_lora_run_bitwise(llama_base, char_data, tmp_path):
    common = (f"--init_from={llama_base}", "--lora_dropout=0.1", "--lr_decay_iters=4")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert lora_train(straight, char_data, "--max_iters=4", *common) == 0
    assert lora_train(split, char_data, "--max_iters=2", *common) == 0
    assert run(train.main, [f"--out_dir={split}", "--init_from=resume", "--max_iters=4"]) == 0
    assert losses(split) == losses(straight)
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["lora"] == b["lora"] and a["iter_num"] == b["iter_num"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["state"].keys() == {k for k in a["model"] if is_adapter(k)}  # the adapters' only


def test_two_ddp_processes_match_one_process(llama_base, char_data, tmp_path):
    flags = (f"--init_from={llama_base}", "--max_iters=3", "--gradient_accumulation_steps=4")
    command = [*TORCHRUN, str(REPO / "train.py"), f"--out_dir={tmp_path / 'ddp'}", f"--data_dir={char_data}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *FLAGS, *flags], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lora_train(tmp_path / "one", char_data, *flags) == 0
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert [i for i, _ in ddp] == [i for i, _ in one] == [1, 2, 3]
    for (_, a), (_, b) in zip(ddp, one):
        assert a == pytest.approx(b, rel=1e-5)


def test_a_bfloat16_run_holds_the_base_in_bfloat16_and_the_adapters_in_float32(
    llama_base, char_data, tmp_path, capsys
):
    out = tmp_path / "out"
    assert lora_train(out, char_data, f"--init_from={llama_base}", "--max_iters=2", "--dtype=bfloat16") == 0
    lines = capsys.readouterr().out.splitlines()
    lora_line = next(line for line in lines if line.startswith("LoRA rank 4"))
    assert "trains 0.00576M in float32 (AdamW), 0.0433M in bfloat16 frozen" in lora_line
    memory = next(line for line in lines if line.startswith("memory per process"))
    # parameters: 43,344 frozen x 2 bytes + 5,760 adapters x 4; gradients and AdamW's moments: the adapters'
    assert "parameters 0.1046 MiB, gradients 0.02197 MiB, optimizer state 0.04395 MiB" in memory
    saved = load_checkpoint(out)["model"]
    assert {t.dtype for k, t in saved.items() if is_adapter(k)} == {torch.float32}
    assert {t.dtype for k, t in saved.items() if not is_adapter(k)} == {torch.bfloat16}
    assert (
        run(train.main, [f"--out_dir={out}", "--init_from=resume", "--max_iters=3", "--dtype=float32"]) == 0
    )


def test_cast_base_keeps_a_tied_head_tied_and_the_fingerprint_of_lossless_dtypes(llama_base):
    model = model_from_checkpoint(load_checkpoint(llama_base))
    add_lora(model, LoRAConfig(rank=2, alpha=2.0))
    cast_base(model, torch.bfloat16)
    fingerprint = base_fingerprint(model)
    cast_base(model, torch.float32)  # bfloat16 -> float32 is exact: the same base
    assert base_fingerprint(model) == fingerprint
    with torch.no_grad():
        model.layers[0].attn.wqkv.weight[0, 0] += 1
    assert base_fingerprint(model) != fingerprint


def test_sample_and_eval_run_a_lora_checkpoint_merged(lora_run, char_data, capsys):
    _, _, out = lora_run
    flags = ["--start=To", "--max_new_tokens=5", "--temperature=0", "--num_samples=1", "--compile=False"]
    assert run(sample.main, [f"--out_dir={out}", *flags]) == 0
    assert run(eval_cli.main, [f"--out_dir={out}", f"--data_dir={char_data}", "--device=cpu"]) == 0
    assert "bpb" in capsys.readouterr().out


# --- bad input: one line on stderr, exit 2 (a bad config value) or 1 (a bad file) ----------------


def expect_error(capsys, code: int, message: str, main, argv: list[str]) -> None:
    assert run(main, argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_rank=0"], "lora_rank must be at least 1 or None, got 0"),
        (["--lora_rank=-4"], "lora_rank must be at least 1 or None, got -4"),
        (["--lora_rank=30"], "lora_rank 30 is larger than the k matrix (24 x 48) allows: at most 24"),
        (["--lora_targets=q,qproj"], "lora_targets names 'qproj'; choose among q,k,v,o,gate,up,down"),
        (["--init_from=scratch"], "LoRA adapts a trained model"),
        (["--parallelism=fsdp"], "LoRA runs with parallelism='ddp'"),
        (["--optimizer=muon"], "the adapters train with AdamW"),
    ],
    ids=["rank-0", "negative-rank", "rank-too-large", "unknown-target", "from-scratch", "fsdp", "muon"],
)
def test_bad_lora_settings_are_refused_in_one_line(llama_base, char_data, tmp_path, capsys, flags, message):
    argv = [f"--out_dir={tmp_path}", f"--data_dir={char_data}", *FLAGS, f"--init_from={llama_base}", *flags]
    expect_error(capsys, 2, message, train.main, argv)


def test_resume_with_other_lora_settings_or_another_base_is_refused(llama_base, char_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert lora_train(out, char_data, f"--init_from={llama_base}", "--max_iters=2") == 0
    resume = [f"--out_dir={out}", "--init_from=resume", "--max_iters=3"]
    expect_error(capsys, 2, "was trained with LoRA LoRAConfig(rank=4", train.main, [*resume, "--lora_rank=8"])
    rounded = "its base was saved in float32; resume with --dtype=float32"  # bfloat16 would round it
    expect_error(capsys, 1, rounded, train.main, [*resume, "--dtype=bfloat16"])
    checkpoint = load_checkpoint(out)
    checkpoint["model"]["layers.1.mlp.down.weight"][0, 0] += 1e-3  # another base under the same adapters
    save_checkpoint(checkpoint, out / CKPT_NAME)
    differs = "the base weights differ from those the LoRA adapters were trained on"
    expect_error(capsys, 1, differs, convert.main, ["export", str(out), str(tmp_path / "merged"), "--merge"])
    expect_error(capsys, 1, differs, sample.main, [f"--out_dir={out}", "--max_new_tokens=2"])


def test_merge_of_a_checkpoint_without_adapters_is_refused(llama_base, tmp_path, capsys):
    argv = ["export", str(llama_base), str(tmp_path / "merged"), "--merge"]
    expect_error(capsys, 1, "holds no LoRA adapters to merge; export it without --merge", convert.main, argv)


def test_the_default_targets_are_every_matrix_lora_can_adapt():
    assert TrainConfig.lora_targets == ",".join(TARGETS)
