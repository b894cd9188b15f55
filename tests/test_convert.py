"""convert.py against transformers: import and export keep logits, greedy generation and tensors exact;
what our model would compute differently is refused with a clear message."""

import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from conftest import random_model  # noqa: E402

import convert  # noqa: E402  (after the skips: convert.py imports safetensors)
import hf_mapping  # noqa: E402
from checkpoint import (  # noqa: E402
    CKPT_NAME,
    load_checkpoint,
    load_model_and_tokenizer,
    model_from_checkpoint,
    save_checkpoint,
)
from generate import generate  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from optim import make_optimizers  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

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
    out_dir: Path, tie: bool, tokenizer: dict, vocab_size: int = VOCAB, steps: int = 30, **options
) -> GPT:
    """Our GPT (with model.py's options) after some AdamW steps, saved as a checkpoint with the given
    tokenizer. It learns a random successor table, so that greedy decoding has clear winners rather than
    near-ties of untrained logits."""
    shape = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=48)
    config = GPTConfig(**{**shape, "rope_theta": 5000.0, "tie_embeddings": tie, **options})
    torch.manual_seed(0)
    model = GPT(config)
    (optimizer,) = make_optimizers(
        model, weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu"
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
    assert checkpoint["tokenizer"] is None  # save_hf_llama writes no tokenizer files: nothing to record
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
    assert torch.equal(generate(ours, idx, 30, temperature=0), expected)


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
        "missing-tensor",
        "pytorch-bin",
    ],
)
def test_unsupported_models_are_refused_with_a_clear_error(tmp_path, overrides, edit, message):
    hf_dir = save_hf_llama(tmp_path / "hf", **overrides)
    if edit:
        edit(hf_dir)
    with pytest.raises(hf_mapping.ConvertError, match=message):
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
    with pytest.raises(hf_mapping.ConvertError, match="already exists"):
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
    continuation = generate(model, torch.tensor([ids]), 5, temperature=0)[0, len(ids) :].tolist()
    streamed = b"".join(tokenizer.decode_bytes([i]) for i in continuation).decode()  # as sample.py streams
    assert streamed.strip() == tokenizer.decode(continuation).strip()


# --- the families: Llama (with and without llama3 RoPE scaling), Qwen2, Qwen3, Mistral -----------------

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,  # far below the sequences tested, so all three bands act
}
WINDOW = 6  # below the 24-token sequences and the 12-token prompts tested
CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
}
# (family, our options): GQA, MQA and MHA, tied and untied, windows, llama3 scaling, head sizes of their own.
FAMILY_CASES = [
    ("llama", dict(n_kv_head=2, tie_embeddings=False, rope_scaling=LLAMA3, head_dim=16)),
    ("llama", dict(n_kv_head=4, tie_embeddings=True)),
    ("llama", dict(n_kv_head=1, tie_embeddings=True, rope_scaling=LLAMA3)),
    ("qwen2", dict(n_kv_head=2, tie_embeddings=True, attn_bias=True, sliding_window=WINDOW)),
    ("qwen2", dict(n_kv_head=1, tie_embeddings=False, attn_bias=True, rope_scaling=LLAMA3)),
    ("qwen2", dict(n_kv_head=4, tie_embeddings=True, attn_bias=True, sliding_window=WINDOW, head_dim=8)),
    ("qwen3", dict(n_kv_head=2, tie_embeddings=True, qk_norm=True, sliding_window=WINDOW, head_dim=16)),
    ("qwen3", dict(n_kv_head=4, tie_embeddings=False, qk_norm=True)),
    (
        "qwen3",
        dict(n_kv_head=1, tie_embeddings=True, qk_norm=True, rope_scaling=LLAMA3, sliding_window=WINDOW),
    ),
    ("mistral", dict(n_kv_head=2, tie_embeddings=False, sliding_window=WINDOW)),
    (
        "mistral",
        dict(n_kv_head=1, tie_embeddings=True, sliding_window=WINDOW, head_dim=16, rope_scaling=LLAMA3),
    ),
    ("mistral", dict(n_kv_head=4, tie_embeddings=False, sliding_window=WINDOW)),
]
FAMILY_IDS = [
    "llama-gqa-untied-llama3-head16",
    "llama-mha-tied",
    "llama-mqa-tied-llama3",
    "qwen2-gqa-tied-window",
    "qwen2-mqa-untied-llama3",
    "qwen2-mha-tied-window-head8",
    "qwen3-gqa-tied-window-head16",
    "qwen3-mha-untied",
    "qwen3-mqa-tied-llama3-window",
    "mistral-gqa-untied-window",
    "mistral-mqa-tied-window-head16-llama3",
    "mistral-mha-untied-window",
]


def our_config(**options) -> GPTConfig:
    base = dict(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=48, intermediate_size=80)
    return GPTConfig(**{**base, "rope_theta": 5000.0, "norm_eps": 1e-6, **options})


def their_config(family: str, config: GPTConfig, **overrides):
    """The transformers config of the family matching ours, written out by hand (not by convert.py)."""
    kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,  # a copy: it gets edited
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )
    window = config.sliding_window
    if family in ("qwen2", "qwen3"):  # every layer slides: from layer 0 on
        kwargs.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
    if family == "mistral":
        kwargs.update(sliding_window=window)
    return getattr(transformers, CONFIG_CLASSES[family])(**{**kwargs, **overrides})


def theirs_holding(model: GPT, family: str):
    """transformers' model of the family, holding our weights (mapped by hf_mapping.weight_layout)."""
    theirs = transformers.AutoModelForCausalLM.from_config(their_config(family, model.config)).eval()
    missing, unexpected = theirs.load_state_dict(
        hf_mapping.to_hf(model.state_dict(), model.config, torch.float32), strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert type(theirs).__name__ == hf_mapping.ARCHITECTURES[family]
    return theirs


@pytest.mark.parametrize("family, options", FAMILY_CASES, ids=FAMILY_IDS)
def test_family_logits_match_transformers_and_import_export_reproduce_every_tensor(tmp_path, family, options):
    ours = random_model(our_config(**options))
    theirs = theirs_holding(ours, family)
    idx = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = theirs(idx).logits
        assert (all_logits(ours, idx) - expected).abs().max().item() < 1e-4
    theirs.save_pretrained(tmp_path / "hf")  # their names and files, then through import and export
    run_convert(["import", str(tmp_path / "hf"), str(tmp_path / "out")])
    imported = model_from_checkpoint(load_checkpoint(tmp_path / "out" / CKPT_NAME)).eval()
    assert imported.config == ours.config
    with torch.no_grad():
        assert (all_logits(imported, idx) - expected).abs().max().item() < 1e-4
    run_convert(["export", str(tmp_path / "out"), str(tmp_path / "back")])
    original, back = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == family
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path / "back")(idx).logits, expected)


FAMILY_OPTIONS = {  # one checkpoint per family that export chooses; plain Llama carries llama3 scaling
    "llama": dict(rope_scaling=LLAMA3),
    "qwen2": dict(attn_bias=True, sliding_window=WINDOW, tie_embeddings=False),
    "qwen3": dict(qk_norm=True, sliding_window=WINDOW, head_dim=16),
    "mistral": dict(sliding_window=WINDOW, n_kv_head=1),
}


@pytest.mark.parametrize("family", FAMILY_OPTIONS)
def test_exported_family_generates_like_transformers_past_the_window(tmp_path, family):
    ours = train_and_save(tmp_path / "out", tie=True, tokenizer=CHAR_META, **FAMILY_OPTIONS[family])
    run_convert(["export", str(tmp_path / "out"), str(tmp_path / "hf")])
    theirs = load_hf(tmp_path / "hf")
    assert type(theirs).__name__ == hf_mapping.ARCHITECTURES[family]
    prompt = torch.randint(0, VOCAB, (2, 12))  # longer than the window
    with torch.no_grad():
        torch.testing.assert_close(all_logits(ours, prompt), theirs(prompt).logits, atol=1e-4, rtol=0)
    expected = theirs.generate(prompt, max_new_tokens=30, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 30, temperature=0), expected)


def test_rope_scaling_and_rope_parameters_spellings_import_and_load_the_same(tmp_path):
    train_and_save(tmp_path / "out", tie=True, tokenizer=CHAR_META, steps=0, rope_scaling=LLAMA3)
    convert.export_hf(tmp_path / "out", tmp_path / "both")
    written = json.loads((tmp_path / "both" / "config.json").read_text())
    spellings = {  # as hub files and transformers 4 write it, and as transformers 5 writes it
        "v4": {k: v for k, v in written.items() if k != "rope_parameters"},
        "v5": {k: v for k, v in written.items() if k not in ("rope_theta", "rope_scaling")},
    }
    idx = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        expected = load_hf(tmp_path / "both")(idx).logits
    for name, config_json in spellings.items():
        hf_dir = tmp_path / name
        hf_dir.mkdir()
        (hf_dir / "model.safetensors").write_bytes((tmp_path / "both" / "model.safetensors").read_bytes())
        (hf_dir / "config.json").write_text(json.dumps(config_json))
        assert hf_mapping.gpt_config_from_hf(config_json).rope_scaling == LLAMA3, name
        if name == "v5" and int(transformers.__version__.split(".")[0]) < 5:
            continue  # transformers 4 does not read rope_parameters: what "both" is for
        with torch.no_grad():
            assert torch.equal(load_hf(hf_dir)(idx).logits, expected), name


def test_llama_with_a_head_size_of_its_own_imports_and_matches_transformers(tmp_path):
    hf_dir = save_hf_llama(tmp_path / "hf", head_dim=16)  # 4 heads of 16 in a 48-wide model
    convert.import_hf(hf_dir, tmp_path / "out")
    ours = model_from_checkpoint(load_checkpoint(tmp_path / "out" / CKPT_NAME)).eval()
    assert ours.config.head_dim == 16
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(ours, idx), load_hf(hf_dir)(idx).logits, atol=1e-4, rtol=0)


def test_import_with_a_shorter_block_size_keeps_the_weights(tmp_path):
    hf_dir = save_hf_llama(tmp_path / "hf")
    run_convert(["import", str(hf_dir), str(tmp_path / "out"), "--block_size=16"])
    model = model_from_checkpoint(load_checkpoint(tmp_path / "out" / CKPT_NAME)).eval()
    assert model.config.block_size == 16
    idx = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(all_logits(model, idx), load_hf(hf_dir)(idx).logits, atol=1e-4, rtol=0)


def save_hf_family(path: Path, family: str, **overrides) -> Path:
    """A tiny random model of the family, saved by transformers; overrides go into its config."""
    torch.manual_seed(0)
    config = their_config(family, our_config(**FAMILY_OPTIONS.get(family, {})), **overrides)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def drop_layer_types(hf_dir: Path) -> None:  # as transformers 4 writes Qwen2 configs
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("layer_types", None)
    (hf_dir / "config.json").write_text(json.dumps(config))


def untie_lm_head(hf_dir: Path) -> None:  # a tied model whose file holds a head of its own
    tensors = safetensors_torch.load_file(hf_dir / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    safetensors_torch.save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


MIXED_WINDOWS = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}  # layer 1 of 2


@pytest.mark.parametrize(
    "family, overrides, edit, message",
    [
        ("qwen3", {"attention_bias": True}, None, "attention_bias is true: Qwen3ForCausalLM"),
        ("qwen2", MIXED_WINDOWS, drop_layer_types, "max_window_layers is 1"),
        (
            "qwen2",
            MIXED_WINDOWS,
            lambda d: edit_config(
                d, layer_types=["full_attention", "sliding_attention"]
            ),  # as transformers 5 writes it
            "layer_types holds \\['full_attention', 'sliding_attention'\\]",
        ),
        (
            "mistral",
            {},
            lambda d: edit_config(d, layer_types=["sliding_attention", "full_attention"]),
            "layer_types holds",
        ),
        (
            "mistral",
            {},
            lambda d: edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
            "rope scaling 'yarn' \\(rope_parameters",
        ),
        (
            "llama",
            {},
            lambda d: edit_config(
                d, rope_scaling={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}
            ),
            "rope_scaling of rope_type 'llama3' has no low_freq_factor",
        ),
        ("llama", {}, lambda d: edit_config(d, partial_rotary_factor=0.5), "partial_rotary_factor is 0.5"),
        ("qwen2", {}, lambda d: edit_config(d, num_experts=4), "num_experts is 4"),
        (
            "qwen2",
            {},
            lambda d: edit_config(d, architectures=["Qwen2MoeForCausalLM"]),
            "model_type 'qwen2' \\(Qwen2MoeForCausalLM\\)",
        ),
        ("llama", {"tie_word_embeddings": True}, untie_lm_head, "tie_word_embeddings is true"),
        (
            "llama",
            {"tie_word_embeddings": True},
            lambda d: edit_config(d, tie_word_embeddings=False),
            "tie_word_embeddings is false",
        ),
    ],
    ids=[
        "qwen3-attention-bias",
        "qwen2-max-window-layers",
        "qwen2-layer-types",
        "mistral-layer-types",
        "rope-yarn-v5-style",
        "llama3-missing-key",
        "partial-rotary",
        "experts",
        "moe-architecture",
        "tied-but-own-head",
        "untied-without-head",
    ],
)
def test_unrepresentable_fields_are_refused_by_the_cli_in_one_line_naming_them(
    tmp_path, capsys, family, overrides, edit, message
):
    hf_dir = save_hf_family(tmp_path / "hf", family, **overrides)
    if edit:
        edit(hf_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["import", str(hf_dir), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and not (tmp_path / "out").exists()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_export_refuses_qk_norm_with_attn_bias_which_no_family_has(tmp_path, capsys):
    train_and_save(tmp_path / "out", tie=True, tokenizer=CHAR_META, steps=0, qk_norm=True, attn_bias=True)
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["export", str(tmp_path / "out"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and not (tmp_path / "hf").exists()
    assert err.startswith("error: qk_norm and attn_bias are both on")


GPT2_META = {"tokenizer": "tiktoken", "encoding": "gpt2", "eot_token": 50256, "vocab_size": 50257}
TOKENIZER_TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler — naïve 🙂 — to suffer"


def trained_hf_tokenizer(directory: Path) -> dict:
    """A byte-level BPE tokenizer trained here (no hub), saved in directory; its "hf" entry."""
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB + 150,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([TOKENIZER_TEXT] * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return {"tokenizer": "hf", "path": str(directory), "vocab_size": len(fast)}


@pytest.mark.parametrize("kind", ["char", "tiktoken", "hf"])
def test_exported_tokenizer_of_each_kind_loads_with_autotokenizer_and_encodes_like_ours(tmp_path, kind):
    chars = sorted(set(TOKENIZER_TEXT))
    entry = {
        "char": lambda: {"tokenizer": "char", "chars": chars, "vocab_size": len(chars)},
        "tiktoken": lambda: GPT2_META,
        "hf": lambda: trained_hf_tokenizer(tmp_path / "tokenizer"),
    }[kind]()
    vocab_size = 50304 if kind == "tiktoken" else VOCAB + 192
    train_and_save(tmp_path / "run", tie=True, tokenizer=entry, vocab_size=vocab_size, steps=0)
    run_convert(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    ours = get_tokenizer(entry)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = ours.encode(TOKENIZER_TEXT)
    assert theirs.encode(TOKENIZER_TEXT) == ids and theirs.decode(ids) == TOKENIZER_TEXT
    config_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config_json["bos_token_id"], config_json["eos_token_id"]) == (ours.bos_token, ours.eot_token)
    # A character vocabulary has no end-of-text token: the export adds one past the model's ids for tools
    # that need one (lm-eval), which no text encodes to.
    assert theirs.eos_token_id == (ours.vocab_size if kind == "char" else ours.eot_token)


PUBLISHED = json.loads(Path(__file__).with_name("published_configs.json").read_text())


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_of_known_models_import_with_their_parameter_count_and_export_as_their_class(name):
    """The models known to fit (docs/models.md), by their config.json as published on the hub."""
    hf = PUBLISHED[name]["config.json"]
    config = hf_mapping.gpt_config_from_hf(hf)
    with torch.device("meta"):  # shapes only
        assert GPT(config).get_num_params() == PUBLISHED[name]["parameters"]
    assert hf_mapping.hf_config(config, torch.bfloat16)["architectures"] == hf["architectures"]


def test_export_folders_of_the_readme_are_ignored_by_git():
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "hf-shakespeare/config.json"], cwd=repo)
    assert result.returncode == 0  # the README's export folder never lands in a commit
