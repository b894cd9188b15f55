"""convert.py against transformers: import and export keep logits, greedy generation and tensors exact;
what our model would compute differently is refused with a clear message."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import convert  # noqa: E402  (after the skips: convert.py imports safetensors)
from checkpoint import (  # noqa: E402
    CKPT_NAME,
    load_checkpoint,
    load_model_and_tokenizer,
    model_from_checkpoint,
    save_checkpoint,
)
from model import GPT, GPTConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151
CHAR_META = {"tokenizer": "char", "chars": [chr(c) for c in range(32, 32 + VOCAB)], "vocab_size": VOCAB}


def run_convert(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        convert.main(argv)
    assert exit_info.value.code == 0


def save_hf_llama(
    path: Path,
    n_kv_head: int = 2,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    sharded: bool = False,
    **overrides,
) -> Path:
    """A tiny random LlamaForCausalLM written with save_pretrained (safetensors)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=64,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # norm gains of one would hide a mix-up between norms
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(path, max_shard_size="20KB" if sharded else "1GB")
    return path


def load_hf(path: Path) -> "transformers.LlamaForCausalLM":
    """The HF model in float32, asserting that every weight was found and used."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def all_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    logits, _ = model(idx, targets=torch.zeros_like(idx))  # targets make forward return every position
    return logits


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(safetensors_torch.load_file(path))
    return tensors


def edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def train_and_save(
    out_dir: Path, tie: bool, tokenizer: dict, vocab_size: int = VOCAB, steps: int = 30
) -> GPT:
    """Our GPT after some AdamW steps, saved as a checkpoint with the given tokenizer. It learns a random
    successor table, so that greedy decoding has clear winners rather than near-ties of untrained logits."""
    config = GPTConfig(
        vocab_size=vocab_size,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=48,
        rope_theta=5000.0,
        tie_embeddings=tie,
    )
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = model.configure_optimizers(
        weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu"
    )
    successor = torch.randperm(vocab_size)
    for _ in range(steps):
        tokens = torch.randint(0, vocab_size, (8, 1))
        for _ in range(32):
            tokens = torch.cat([tokens, successor[tokens[:, -1:]]], dim=1)
        _, loss = model(tokens[:, :-1], targets=tokens[:, 1:].contiguous())  # forward views targets flat
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out_dir.mkdir(parents=True)
    save_checkpoint(
        {
            "model": model.state_dict(),
            "model_args": asdict(config),
            "iter_num": steps,
            "best_val_loss": 1.0,
            "config": {},
            "tokenizer": tokenizer,
        },
        out_dir / CKPT_NAME,
    )
    return model.eval()


@pytest.mark.parametrize(
    "n_kv_head, tie, dtype, sharded",
    [
        (2, False, torch.float32, False),
        (4, True, torch.float32, True),
        (2, True, torch.bfloat16, False),
        (4, False, torch.bfloat16, True),
        (1, True, torch.float32, True),
    ],
    ids=[
        "gqa-untied-fp32-single",
        "mha-tied-fp32-sharded",
        "gqa-tied-bf16-single",
        "mha-untied-bf16-sharded",
        "mqa-tied-fp32-sharded",
    ],
)
def test_imported_model_logits_match_transformers(tmp_path, n_kv_head, tie, dtype, sharded):
    hf_dir = save_hf_llama(tmp_path / "hf", n_kv_head, tie, dtype, sharded)
    assert (hf_dir / "model.safetensors.index.json").is_file() == sharded
    convert.import_hf(hf_dir, tmp_path / "out")
    checkpoint = load_checkpoint(tmp_path / "out" / CKPT_NAME)
    args = checkpoint["model_args"]
    mapped = [
        args[key] for key in ("n_kv_head", "tie_embeddings", "rope_theta", "norm_eps", "intermediate_size")
    ]
    assert mapped == [n_kv_head, tie, 5000.0, 1e-5, 80]
    assert checkpoint["tokenizer"] == {"tokenizer": "hf", "path": str(hf_dir.resolve()), "vocab_size": VOCAB}
    assert all(t.dtype == torch.float32 for t in checkpoint["model"].values())
    ours = model_from_checkpoint(checkpoint).eval()
    idx = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(ours, idx), load_hf(hf_dir)(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie, dtype, sharded", [(True, torch.float32, True), (False, torch.bfloat16, False)])
def test_import_then_export_reproduces_hf_tensors_exactly(tmp_path, tie, dtype, sharded):
    hf_dir = save_hf_llama(tmp_path / "hf", tie=tie, dtype=dtype, sharded=sharded)
    run_convert(["import", str(hf_dir), str(tmp_path / "out")])
    dtype_name = str(dtype).removeprefix("torch.")
    run_convert(["export", str(tmp_path / "out"), str(tmp_path / "back"), "--dtype", dtype_name])
    original, back = hf_tensors(hf_dir), hf_tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_exported_trained_model_matches_transformers_logits_and_greedy_generation(tmp_path, tie):
    ours = train_and_save(tmp_path / "out", tie, CHAR_META)
    run_convert(["export", str(tmp_path / "out"), str(tmp_path / "hf")])
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] is None and hf_config[convert.TOKENIZER_KEY] == CHAR_META
    theirs = load_hf(tmp_path / "hf")
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(ours, idx), theirs(idx).logits, atol=1e-4, rtol=0)
    expected = theirs.generate(idx, max_new_tokens=30, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(ours.generate(idx, 30, temperature=0), expected)


def test_char_tokenizer_survives_export_and_import(tmp_path):
    ours = train_and_save(tmp_path / "run", tie=True, tokenizer=CHAR_META, steps=0)
    convert.export_hf(tmp_path / "run", tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "imported")
    model, tokenizer, checkpoint = load_model_and_tokenizer(tmp_path / "imported")
    assert checkpoint["tokenizer"] == CHAR_META and checkpoint["iter_num"] == 0
    assert tokenizer.decode(tokenizer.encode("To be, or not")) == "To be, or not"
    for name, tensor in ours.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_gpt2_bpe_export_notes_tokenizer_and_end_of_text_id(tmp_path):
    meta = {"tokenizer": "tiktoken", "encoding": "gpt2", "eot_token": 50256, "vocab_size": 50257}
    train_and_save(tmp_path / "run", tie=True, tokenizer=meta, vocab_size=50304, steps=0)
    convert.export_hf(tmp_path / "run", tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (50256, 50256)
    assert hf_config[convert.TOKENIZER_KEY] == meta
    convert.import_hf(tmp_path / "hf", tmp_path / "imported")
    assert load_checkpoint(tmp_path / "imported" / CKPT_NAME)["tokenizer"] == meta


def gpt2_config(hf_dir: Path) -> None:
    edit_config(hf_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])


def drop_tensor(hf_dir: Path) -> None:
    tensors = safetensors_torch.load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors_torch.save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def only_pytorch_bin(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")  # only the name matters here


@pytest.mark.parametrize(
    "overrides, edit, message",
    [
        ({"attention_bias": True}, None, "attention_bias is true"),
        ({"mlp_bias": True}, None, "mlp_bias is true"),
        (
            {"attention_bias": True},
            lambda d: edit_config(d, attention_bias=False),
            "unexpected .*q_proj.bias",
        ),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None, "rope scaling 'linear'"),
        (
            {},
            lambda d: edit_config(d, rope_scaling={"type": "dynamic", "factor": 2.0}),
            "rope scaling 'dynamic'",
        ),
        ({}, gpt2_config, "model_type 'gpt2' \\(GPT2LMHeadModel\\) is not supported"),
        ({}, lambda d: edit_config(d, hidden_act="gelu"), "hidden_act 'gelu'"),
        ({"head_dim": 16}, None, "head_dim 16 differs"),
        ({}, drop_tensor, "missing .*up_proj"),
        ({}, only_pytorch_bin, "only pytorch_model.*bin"),
    ],
    ids=[
        "attention-bias",
        "mlp-bias",
        "bias-tensors",
        "rope-linear",
        "rope-dynamic-v4-style",
        "gpt2",
        "gelu",
        "head-dim",
        "missing-tensor",
        "pytorch-bin",
    ],
)
def test_unsupported_models_are_refused_with_a_clear_error(tmp_path, overrides, edit, message):
    hf_dir = save_hf_llama(tmp_path / "hf", **overrides)
    if edit:
        edit(hf_dir)
    with pytest.raises(convert.ConvertError, match=message):
        convert.import_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_refusal_is_one_line_on_stderr_and_exit_code_1(tmp_path):
    hf_dir = save_hf_llama(tmp_path / "hf")
    gpt2_config(hf_dir)
    result = subprocess.run(
        [sys.executable, "convert.py", "import", str(hf_dir), str(tmp_path / "out")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: model_type 'gpt2'") and "Traceback" not in result.stderr


def test_import_does_not_overwrite_a_checkpoint_without_force(tmp_path):
    hf_dir = save_hf_llama(tmp_path / "hf")
    convert.import_hf(hf_dir, tmp_path / "out")
    with pytest.raises(convert.ConvertError, match="already exists"):
        convert.import_hf(hf_dir, tmp_path / "out")
    convert.import_hf(hf_dir, tmp_path / "out", force=True)


def test_imported_model_samples_through_the_hf_tokenizer_beside_it(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = (
        tokenizers.pre_tokenizers.Metaspace(),
        tokenizers.decoders.Metaspace(),
    )
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "</s>"])
    backend.train_from_iterator([text], trainer)
    hf_dir = save_hf_llama(tmp_path / "hf")
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(hf_dir)
    convert.import_hf(hf_dir, tmp_path / "out")
    model, tokenizer, _ = load_model_and_tokenizer(tmp_path / "out")
    assert tokenizer.eot_token == 1 and tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("To be")
    continuation = model.generate(torch.tensor([ids]), 5, temperature=0)[0, len(ids) :].tolist()
    streamed = b"".join(tokenizer.decode_bytes([i]) for i in continuation).decode()  # as sample.py streams
    assert streamed.strip() == tokenizer.decode(continuation).strip()
