"""Convert between our checkpoints and Hugging Face Llama directories (config.json + safetensors).

  python convert.py export OUT_DIR HF_DIR   # OUT_DIR/ckpt.pt -> HF_DIR for transformers, vLLM, llama.cpp
  python convert.py import HF_DIR OUT_DIR   # a local HF Llama (SmolLM, TinyLlama, Llama 3) -> OUT_DIR/ckpt.pt

RoPE layout: model.py rotates the pairs (x[i], x[i + head_dim/2]) ("rotate half") exactly as HF's Llama
does, so q_proj and k_proj copy over unchanged. The q/k row permutation other converters apply belongs
between Meta's original checkpoints (interleaved pairs) and HF; it has no place here.
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from checkpoint import CKPT_NAME, clean_state_dict, load_checkpoint, save_checkpoint
from model import GPTConfig
from runtime import DTYPE_NAMES, UserError, atomic_write, exit_on_error

TOKENIZER_KEY = (
    "nanogpt_tokenizer"  # our checkpoint's tokenizer entry, kept in config.json so import restores it
)
Layout = list[tuple[str, list[tuple[str, tuple[int, ...]]]]]
# config.json fields that size the model
SIZE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings",
)  # fmt: skip


class ConvertError(UserError):
    """An input we cannot convert faithfully; the message says what is wrong and what to do."""


def weight_layout(config: GPTConfig) -> Layout:
    """Each of our tensors with the HF tensors that make it up, in row order, and their shapes.
    The one place names are mapped: export splits by it, import concatenates by it."""
    V, E, hidden, hd = config.vocab_size, config.n_embd, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.n_head * hd, config.n_kv_head * hd
    layout = [
        ("tok_embeddings.weight", [("model.embed_tokens.weight", (V, E))]),
        ("norm.weight", [("model.norm.weight", (E,))]),
    ]
    if not config.tie_embeddings:  # tied: HF stores the embedding once and ties lm_head itself
        layout.append(("lm_head.weight", [("lm_head.weight", (V, E))]))
    for i in range(config.n_layer):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        layout += [
            (ours + "attn_norm.weight", [(hf + "input_layernorm.weight", (E,))]),
            (
                ours + "attn.wqkv.weight",
                [
                    (hf + "self_attn.q_proj.weight", (q_rows, E)),
                    (hf + "self_attn.k_proj.weight", (kv_rows, E)),
                    (hf + "self_attn.v_proj.weight", (kv_rows, E)),
                ],
            ),
            (ours + "attn.wo.weight", [(hf + "self_attn.o_proj.weight", (E, q_rows))]),
            (ours + "mlp_norm.weight", [(hf + "post_attention_layernorm.weight", (E,))]),
            (
                ours + "mlp.gate_up.weight",
                [(hf + "mlp.gate_proj.weight", (hidden, E)), (hf + "mlp.up_proj.weight", (hidden, E))],
            ),
            (ours + "mlp.down.weight", [(hf + "mlp.down_proj.weight", (E, hidden))]),
        ]
    return layout


def to_hf(state_dict: dict, config: GPTConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    hf = {}
    for ours, parts in weight_layout(config):
        rows = [shape[0] for _, shape in parts]
        for (name, _), part in zip(parts, state_dict[ours].split(rows)):
            # A copy of its own: safetensors refuses tensors sharing storage (fused splits, tied weights).
            hf[name] = part.to(dtype, copy=True)
    return hf


def from_hf(tensors: dict, config: GPTConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state_dict = {
        ours: torch.cat([tensors[name] for name, _ in parts]).to(dtype)
        for ours, parts in weight_layout(config)
    }
    if config.tie_embeddings:
        state_dict["lm_head.weight"] = state_dict["tok_embeddings.weight"]
    return state_dict


def hf_config(config: GPTConfig, dtype: torch.dtype, tokenizer: dict) -> dict:
    eot = tokenizer.get("eot_token")  # GPT-2 BPE's <|endoftext|> both starts and ends documents
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": eot,
        "eos_token_id": eot,  # explicit None: LlamaConfig would default to ids 1 and 2
        # An HF tokenizer is not ours to record: its files belong beside the weights, where import looks.
        TOKENIZER_KEY: tokenizer if tokenizer.get("tokenizer") in ("char", "tiktoken") else None,
    }


def rope_theta(hf: dict) -> float:
    # transformers 4 writes rope_theta and rope_scaling; 5 writes rope_parameters {rope_type, rope_theta}.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConvertError(
            f"rope scaling {kind!r} ({rope}) is not implemented by model.py; only plain RoPE converts"
        )
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def gpt_config_from_hf(hf: dict) -> GPTConfig:
    """Our config for a HF Llama config.json, refusing anything our model would compute differently."""
    kind, architectures = hf.get("model_type"), hf.get("architectures") or ["LlamaForCausalLM"]
    if kind != "llama" or architectures != ["LlamaForCausalLM"]:
        raise ConvertError(
            f"model_type {kind!r} ({', '.join(architectures)}) is not supported; only Llama "
            "(model_type 'llama', LlamaForCausalLM) converts"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConvertError(
                f"{key} is true, but our model has no biases; such a model cannot be converted"
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"hidden_act {hf['hidden_act']!r} is not supported; our MLP is SwiGLU (silu)")
    try:
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        if (hf.get("head_dim") or n_embd // n_head) != n_embd // n_head:
            raise ConvertError(
                f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads = "
                f"{n_embd // n_head}; our model derives the head size and cannot hold this one"
            )
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf["max_position_embeddings"],
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=n_embd,
            intermediate_size=hf["intermediate_size"],
            rope_theta=rope_theta(hf),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=hf.get("tie_word_embeddings", False),
        )  # the defaults above are LlamaConfig's, for keys a config.json leaves out
    except KeyError as e:
        raise ConvertError(f"config.json has no {e.args[0]!r}, which a Llama config needs") from e
    except ValueError as e:
        raise ConvertError(f"config.json describes a model ours cannot build: {e}") from e


def check_config_numbers(hf: object) -> None:
    """config.json is an object whose size fields are positive integers (a string or 0 would otherwise
    surface later as a confusing error)."""
    if not isinstance(hf, dict):
        raise ConvertError("config.json must hold a JSON object of the model's settings")
    for key in SIZE_KEYS:
        value = hf.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise ConvertError(f"config.json: {key} must be a positive integer, got {value!r}")


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = shard_files(index)
    elif any(hf_dir.glob("pytorch_model*.bin")):
        raise ConvertError(
            f"{hf_dir} has only pytorch_model*.bin weights; we read safetensors (they cannot run code "
            "when opened): download the safetensors files, or load the model with transformers and "
            "save_pretrained(dir, safe_serialization=True)"
        )
    else:
        raise ConvertError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}")
    tensors = {}
    for path in files:
        if not path.is_file():
            raise ConvertError(f"shard {path.name}, listed in {index.name}, is missing from {hf_dir}")
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise ConvertError(
                f"cannot read {path}: it is truncated or not a safetensors file ({e})"
            ) from None
    not_finite = [name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
    if not_finite:
        raise ConvertError(
            f"{', '.join(not_finite[:3])} hold NaN or infinite values: the weights are damaged"
        )
    return tensors


def shard_files(index: Path) -> list[Path]:
    """The shard files an index names; never a file outside the index's folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConvertError(f'{index} is not a safetensors index: it needs a "weight_map" object') from None
    folder = index.parent.resolve()
    files = [(folder / shard).resolve() for shard in shards]
    outside = [shard for shard, path in zip(shards, files) if path.parent != folder]
    if outside:
        raise ConvertError(f"{index} names shards outside its folder ({outside[0]!r}): refusing to read them")
    return files


def check_tensors(tensors: dict, config: GPTConfig) -> None:
    """Exactly the tensors the config implies, each of the shape it implies: nothing dropped or guessed."""
    for name in [n for n in tensors if n.endswith("rotary_emb.inv_freq")]:
        del tensors[name]  # a buffer some older conversions saved; it follows from rope_theta
    expected = {name: shape for _, parts in weight_layout(config) for name, shape in parts}
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ConvertError(
            f"the weights do not match a Llama of this config.json: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ConvertError(
                f"{name} has shape {tuple(tensors[name].shape)}, but config.json implies {shape}"
            )


def import_hf(hf_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float32, force: bool = False) -> Path:
    """Write out_dir/ckpt.pt from a HF Llama directory: weights and config only, iteration 0."""
    hf_dir, ckpt_path = Path(hf_dir).resolve(), Path(out_dir) / CKPT_NAME
    if ckpt_path.exists() and not force:
        raise ConvertError(
            f"{ckpt_path} already exists; choose another OUT_DIR or pass --force to replace it"
        )
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConvertError(f"OUT_DIR {out_dir} is a file: choose a folder")
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(
            f"cannot read {hf_dir / 'config.json'} ({e}); HF_DIR must be a Hugging Face model directory"
        ) from e
    check_config_numbers(hf)
    config = gpt_config_from_hf(hf)
    tensors = read_safetensors(hf_dir)
    check_tensors(tensors, config)
    # An export of ours restores its own tokenizer; anything else samples through the HF tokenizer beside it.
    tokenizer = hf.get(TOKENIZER_KEY) or {
        "tokenizer": "hf",
        "path": str(hf_dir),
        "vocab_size": config.vocab_size,
    }
    checkpoint = {
        "model": from_hf(tensors, config, dtype),
        "model_args": asdict(config),
        "iter_num": 0,
        "best_val_loss": float("inf"),
        "config": {},
        "tokenizer": tokenizer,
    }
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, ckpt_path)
    print(
        f"imported {hf_dir} -> {ckpt_path} ({config.n_layer} layers, n_embd {config.n_embd}, "
        f"tokenizer {tokenizer['tokenizer']})"
    )
    return ckpt_path


def export_hf(out_dir: Path, hf_dir: Path, dtype: torch.dtype | None = None) -> None:
    """config.json and model.safetensors of out_dir/ckpt.pt into hf_dir (dtype: as stored, by default)."""
    checkpoint = load_checkpoint(out_dir)  # ckpt.pt or a sharded checkpoint
    config, state_dict = GPTConfig(**checkpoint["model_args"]), clean_state_dict(checkpoint["model"])
    dtype = dtype or state_dict["tok_embeddings.weight"].dtype
    tokenizer = checkpoint.get("tokenizer") or {}
    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    tensors = to_hf(state_dict, config, dtype)
    # save_file writes by name: into the temporary file atomic_write opened, which it then fsyncs.
    atomic_write(
        hf_dir / "model.safetensors", lambda f: save_file(tensors, f.name, metadata={"format": "pt"})
    )
    # config.json last: transformers treats the directory as a model only once it is there.
    config_json = json.dumps(hf_config(config, dtype, tokenizer), indent=2) + "\n"
    atomic_write(hf_dir / "config.json", lambda f: f.write(config_json.encode("utf-8")))
    kind = tokenizer.get("tokenizer")
    notes = {
        "char": f"our own character table, kept in config.json under {TOKENIZER_KEY!r}; transformers has no "
        "tokenizer for it: encode with tokenizer.py, or import the directory back",
        "tiktoken": f"tiktoken {tokenizer.get('encoding')!r}, noted in config.json; with transformers use "
        "the matching Hugging Face tokenizer (GPT2TokenizerFast for gpt2)",
        "hf": f"the Hugging Face tokenizer in {tokenizer.get('path')}; copy its tokenizer files "
        f"into {hf_dir}",
    }
    print(f"exported {out_dir} -> {hf_dir} ({str(dtype).removeprefix('torch.')})")
    print(f"tokenizer: {notes.get(kind, 'none recorded in the checkpoint')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="our checkpoint -> a Hugging Face Llama directory")
    export.add_argument("out_dir", type=Path, help="run directory holding ckpt.pt")
    export.add_argument("hf_dir", type=Path, help="directory to write config.json and model.safetensors into")
    export.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="tensor dtype on disk (default: the checkpoint's)"
    )
    imp = commands.add_parser("import", help="a Hugging Face Llama directory -> our checkpoint")
    imp.add_argument(
        "hf_dir", type=Path, help="directory with config.json and model.safetensors (or shards + index)"
    )
    imp.add_argument("out_dir", type=Path, help="directory to write ckpt.pt into")
    imp.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="float32", help="tensor dtype in ckpt.pt (default: float32)"
    )
    imp.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
    args = parser.parse_args(argv)  # a bad argument exits 2, as a bad flag does in every CLI here

    def run() -> None:
        if args.command == "export":
            export_hf(args.out_dir, args.hf_dir, getattr(torch, args.dtype) if args.dtype else None)
        else:
            import_hf(args.hf_dir, args.out_dir, getattr(torch, args.dtype), args.force)

    exit_on_error(run)


if __name__ == "__main__":
    main()
