"""Convert between our checkpoints and Hugging Face model directories (config.json, safetensors, tokenizer)
of the Llama, Qwen2, Qwen3 and Mistral families.

  python convert.py export OUT_DIR HF_DIR   # OUT_DIR/ckpt.pt -> HF_DIR for transformers, vLLM, llama.cpp
  python convert.py import HF_DIR OUT_DIR   # Llama 3.2, Qwen2.5, Qwen3, Mistral, ... -> OUT_DIR/ckpt.pt

A LoRA run's checkpoint (train.py --lora_rank) exports as a PEFT adapter folder (adapter_config.json,
adapter_model.safetensors) for the base model's folder, or with --merge as a plain model folder.

The options of model.py that each family carries (export picks the family a checkpoint's options need,
plain Llama when it uses none; rope_scaling 'llama3' and head_dim go with any of them):
  llama    LlamaForCausalLM     -
  qwen2    Qwen2ForCausalLM     attn_bias (always), sliding_window
  qwen3    Qwen3ForCausalLM     qk_norm (always), sliding_window
  mistral  MistralForCausalLM   sliding_window
What a family may carry and model.py cannot compute is refused with a message naming the field.

RoPE layout: model.py rotates the pairs (x[i], x[i + head_dim/2]) ("rotate half") exactly as HF's Llama
does, so q_proj and k_proj copy over unchanged. The q/k row permutation other converters apply belongs
between Meta's original checkpoints (interleaved pairs) and HF; it has no place here.
"""

import argparse
import json
import os
import re
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chat import ChatFormat
from checkpoint import (
    CKPT_NAME,
    TOKENIZER_DIR,
    clean_state_dict,
    find_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    tokenizer_entry_in,
)
from lora import adaptable, is_adapter
from model import LLAMA3_SCALING_KEYS, GPTConfig
from runtime import DTYPE_NAMES, UserError, atomic_write, atomic_write_by_name, exit_on_error
from tokenizer import HFTokenizer, Tokenizer, copy_hf_tokenizer, get_tokenizer, has_hf_tokenizer

TOKENIZER_KEY = (
    "nanogpt_tokenizer"  # our checkpoint's tokenizer entry, kept in config.json so import restores it
)
ARCHITECTURES = {  # model_type: the class of each family we convert
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
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
        qkv = [
            (hf + f"self_attn.{x}_proj.", rows) for x, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))
        ]
        layout += [
            (ours + "attn_norm.weight", [(hf + "input_layernorm.weight", (E,))]),
            (ours + "attn.wqkv.weight", [(name + "weight", (rows, E)) for name, rows in qkv]),
            (ours + "attn.wo.weight", [(hf + "self_attn.o_proj.weight", (E, q_rows))]),
            (ours + "mlp_norm.weight", [(hf + "post_attention_layernorm.weight", (E,))]),
            (
                ours + "mlp.gate_up.weight",
                [(hf + "mlp.gate_proj.weight", (hidden, E)), (hf + "mlp.up_proj.weight", (hidden, E))],
            ),
            (ours + "mlp.down.weight", [(hf + "mlp.down_proj.weight", (E, hidden))]),
        ]
        if config.attn_bias:  # Qwen2
            layout.append((ours + "attn.wqkv.bias", [(name + "bias", (rows,)) for name, rows in qkv]))
        if config.qk_norm:  # Qwen3
            layout += [
                (ours + f"attn.{x}_norm.weight", [(hf + f"self_attn.{x}_norm.weight", (hd,))]) for x in "qk"
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


# --- export: our config -> the family's config.json ---------------------------------------------------


def family_for(config: GPTConfig) -> str:
    """The model_type whose options the checkpoint uses: plain Llama when it uses none."""
    if config.qk_norm and config.attn_bias:
        raise ConvertError(
            "qk_norm and attn_bias are both on, which no Hugging Face family has (Qwen3: QK-norm and no "
            "q/k/v bias; Qwen2: q/k/v bias and no QK-norm): this checkpoint cannot be exported"
        )
    if config.qk_norm:
        return "qwen3"
    if config.attn_bias:
        return "qwen2"
    return "llama" if config.sliding_window is None else "mistral"


def hf_config(config: GPTConfig, dtype: torch.dtype) -> dict:
    """config.json of the family the checkpoint's options need (without the tokenizer's entries)."""
    family = family_for(config)
    rope = config.rope_scaling or {"rope_type": "default"}
    hf = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        # Both spellings, which load the same: transformers 4 and the hub's files read rope_theta and
        # rope_scaling, transformers 5 rope_parameters (it reads a rope_scaling first, if there is one).
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "rope_parameters": {**rope, "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if family in ("llama", "qwen3"):
        hf["attention_bias"] = False  # true would add biases to o_proj as well
    if family == "llama":
        hf["mlp_bias"] = False
    if family in ("qwen2", "qwen3"):  # a window on every layer: from layer 0 on
        window = config.sliding_window
        hf.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
    if family == "mistral":
        hf["sliding_window"] = config.sliding_window
    return hf


# --- import: a family's config.json -> our config ---------------------------------------------------


def gpt_config_from_hf(hf: dict) -> GPTConfig:
    """Our config for a config.json of a family we convert; refuses what our model would compute otherwise."""
    family = hf.get("model_type")
    architectures = hf.get("architectures") or [ARCHITECTURES.get(family, "no architectures")]
    if family not in ARCHITECTURES or architectures != [ARCHITECTURES[family]]:
        supported = ", ".join(f"{kind} ({cls})" for kind, cls in ARCHITECTURES.items())
        raise ConvertError(
            f"model_type {family!r} ({', '.join(architectures)}) is not supported; these convert: {supported}"
        )
    refuse_unsupported_fields(hf, family)
    try:
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        rope_theta, rope_scaling = rope_from_hf(hf)
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf["max_position_embeddings"],
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=n_embd,
            head_dim=hf.get("head_dim") or (128 if family == "qwen3" else n_embd // n_head),
            intermediate_size=hf["intermediate_size"],
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            qk_norm=family == "qwen3",
            attn_bias=family == "qwen2",
            sliding_window=sliding_window_from_hf(hf, family),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=hf.get("tie_word_embeddings", False),
        )  # the defaults above are the families' own (Qwen3Config: head_dim 128), for keys a file leaves out
    except KeyError as e:
        raise ConvertError(f"config.json has no {e.args[0]!r}, which a {family} config needs") from e
    except ValueError as e:
        raise ConvertError(f"config.json describes a model ours cannot build: {e}") from e


def check_config_fields(hf: object) -> None:
    """config.json is an object whose size fields are positive integers and whose other fields read
    here have their JSON types (a string or 0 would otherwise surface later as a confusing error)."""
    if not isinstance(hf, dict):
        raise ConvertError("config.json must hold a JSON object of the model's settings")
    for key in SIZE_KEYS:
        value = hf.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise ConvertError(f"config.json: {key} must be a positive integer, got {value!r}")
    for key, (kinds, what) in FIELD_TYPES.items():
        value = hf.get(key)
        items_ok = not isinstance(value, list) or all(isinstance(item, str) for item in value)
        if value is not None and (type(value) not in kinds or not items_ok):
            raise ConvertError(f"config.json: {key} must be {what}, got {value!r}")
    eps = hf.get("rms_norm_eps")
    if eps is not None and not eps > 0:
        raise ConvertError(f"config.json: rms_norm_eps must be a positive number, got {eps!r}")


NUMBER = (int, float)
FIELD_TYPES = {  # the other fields gpt_config_from_hf reads: (JSON types, as said in an error)
    "model_type": ((str,), "a string"),
    "architectures": ((list,), "a list of strings"),
    "layer_types": ((list,), "a list of strings"),
    "rope_scaling": ((dict,), "an object"),
    "rope_parameters": ((dict,), "an object"),
    "rope_theta": (NUMBER, "a number"),
    "partial_rotary_factor": (NUMBER, "a number"),
    "rms_norm_eps": (NUMBER, "a positive number"),
    "tie_word_embeddings": ((bool,), "true or false"),
    "use_sliding_window": ((bool,), "true or false"),
    "attention_bias": ((bool,), "true or false"),
    "mlp_bias": ((bool,), "true or false"),
    "hidden_act": ((str,), "a string"),
    "sliding_window": ((int,), "an integer or null"),
    "max_window_layers": ((int,), "an integer"),
}


def refuse_unsupported_fields(hf: dict, family: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"hidden_act {hf['hidden_act']!r} is not supported; our MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise ConvertError("mlp_bias is true, but our MLP has no biases; such a model cannot be converted")
    if hf.get("attention_bias") and family in ("llama", "qwen3"):
        raise ConvertError(
            f"attention_bias is true: {ARCHITECTURES[family]} then biases o_proj as well as q/k/v, and our "
            "model has q/k/v biases only (as Qwen2); such a model cannot be converted"
        )
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(key):
            raise ConvertError(f"{key} is {hf[key]}: mixture-of-experts layers are not supported")


def rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """rope_theta and our rope_scaling. Hub files and transformers 4 write rope_theta and rope_scaling,
    transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; as transformers 5 does, a
    rope_scaling wins over rope_parameters."""
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(field) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ConvertError(
            f"rope scaling {kind!r} ({field} {rope}) is not implemented by model.py; plain RoPE and "
            "'llama3' convert"
        )
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConvertError(f"partial_rotary_factor is {partial}; our RoPE rotates the whole head")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    missing = [key for key in LLAMA3_SCALING_KEYS if key not in rope]
    if missing:
        raise ConvertError(f"{field} of rope_type 'llama3' has no {', '.join(missing)}")
    return theta, {"rope_type": "llama3", **{key: rope[key] for key in LLAMA3_SCALING_KEYS}}


def sliding_window_from_hf(hf: dict, family: str) -> int | None:
    """The window all layers use, or None; a window on only some layers is refused."""
    if family == "llama":
        return None  # LlamaForCausalLM has no sliding window, whatever config.json says
    kinds = set(hf.get("layer_types") or [])
    if len(kinds) > 1 or kinds - {"full_attention", "sliding_attention"}:
        raise ConvertError(
            f"layer_types holds {sorted(kinds)}: our attention is full, or one sliding window, on every "
            "layer alike; such a model cannot be converted"
        )
    window = hf.get("sliding_window", 4096)  # the default of MistralConfig, Qwen2Config and Qwen3Config
    if family == "mistral":
        return window  # MistralForCausalLM slides on every layer when a window is set
    # Qwen2/Qwen3 files often set sliding_window with use_sliding_window false: then there is no window.
    if not hf.get("use_sliding_window") or window is None:
        return None
    if kinds:  # transformers 5 writes the layer kinds out
        return window if kinds == {"sliding_attention"} else None
    first, n_layer = hf.get("max_window_layers", 28), hf.get("num_hidden_layers", 0)  # 28: Qwen's default
    if 0 < first < n_layer:
        raise ConvertError(
            f"max_window_layers is {first} with use_sliding_window true: only layers {first} to "
            f"{n_layer - 1} of {n_layer} slide, and our model slides on every layer or none"
        )
    return window if first <= 0 else None


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


def check_tensors(tensors: dict, config: GPTConfig, family: str) -> None:
    """Exactly the tensors the config implies, each of the shape it implies: nothing dropped or guessed."""
    for name in [n for n in tensors if n.endswith("rotary_emb.inv_freq")]:
        del tensors[name]  # a buffer some older conversions saved; it follows from rope_theta
    embedding = tensors.get("model.embed_tokens.weight")
    if config.tie_embeddings and "lm_head.weight" in tensors:  # some files keep the tied head anyway
        if embedding is not None and not torch.equal(tensors.pop("lm_head.weight"), embedding):
            raise ConvertError(
                "tie_word_embeddings is true, but lm_head.weight differs from model.embed_tokens.weight; "
                "if the head is a weight of its own, set tie_word_embeddings to false in config.json"
            )
    if not config.tie_embeddings and "lm_head.weight" not in tensors:
        raise ConvertError("tie_word_embeddings is false, but the weights hold no lm_head.weight")
    expected = {name: shape for _, parts in weight_layout(config) for name, shape in parts}
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ConvertError(
            f"the weights do not match a {family} model of this config.json: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ConvertError(
                f"{name} has shape {tuple(tensors[name].shape)}, but config.json implies {shape}"
            )


def read_hf_config(hf_dir: Path) -> dict:
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(
            f"cannot read {hf_dir / 'config.json'} ({e}); HF_DIR must be a Hugging Face model directory"
        ) from e
    check_config_fields(hf)
    return hf


def import_hf(
    hf_dir: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    block_size: int | None = None,
) -> Path:
    """Write out_dir/ckpt.pt from a HF model directory: weights and config only, iteration 0.
    block_size: a context shorter than max_position_embeddings, to fine-tune and sample at."""
    hf_dir, ckpt_path = Path(hf_dir).resolve(), Path(out_dir) / CKPT_NAME
    if ckpt_path.exists() and not force:
        raise ConvertError(
            f"{ckpt_path} already exists; choose another OUT_DIR or pass --force to replace it"
        )
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConvertError(f"OUT_DIR {out_dir} is a file: choose a folder")
    hf = read_hf_config(hf_dir)
    config = gpt_config_from_hf(hf)
    if block_size is not None:
        if not 1 <= block_size <= config.block_size:
            raise ConvertError(
                f"--block_size {block_size} must be between 1 and the model's max_position_embeddings "
                f"{config.block_size}"
            )
        config = replace(config, block_size=block_size)
    tensors = read_safetensors(hf_dir)
    check_tensors(tensors, config, hf["model_type"])
    tokenizer = imported_tokenizer(hf, hf_dir, Path(out_dir), config.vocab_size)
    checkpoint = {
        "model": from_hf(tensors, config, dtype),
        "model_args": asdict(config),
        "iter_num": 0,
        "best_val_loss": float("inf"),
        "config": {},
        "tokenizer": tokenizer,
    }
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer and tokenizer["tokenizer"] == "hf":
        copy_hf_tokenizer(hf_dir, Path(tokenizer["path"]))
    save_checkpoint(checkpoint, ckpt_path)
    kind = tokenizer["tokenizer"] if tokenizer else f"none (no tokenizer files in {hf_dir})"
    print(
        f"imported {hf_dir} ({hf['model_type']}) -> {ckpt_path} ({config.n_layer} layers, n_embd "
        f"{config.n_embd}, block_size {config.block_size}, tokenizer {kind})"
    )
    return ckpt_path


def imported_tokenizer(hf: dict, hf_dir: Path, out_dir: Path, vocab_size: int) -> dict | None:
    """The tokenizer entry of an imported checkpoint. An export of ours restores its own tokenizer;
    anything else samples through the HF tokenizer, whose files import copies into out_dir/tokenizer,
    so that out_dir does not depend on hf_dir (a hub cache, say); None if hf_dir holds none."""
    if hf.get(TOKENIZER_KEY):
        return hf[TOKENIZER_KEY]
    if not has_hf_tokenizer(hf_dir):
        return None
    return {"tokenizer": "hf", "path": str((out_dir / TOKENIZER_DIR).resolve()), "vocab_size": vocab_size}


def export_hf(
    out_dir: Path, hf_dir: Path, dtype: torch.dtype | None = None, force: bool = False, merge: bool = False
) -> None:
    """config.json, model.safetensors and the tokenizer of out_dir's checkpoint into hf_dir (dtype: as stored,
    by default), as the family its options need. A non-empty hf_dir only with force: one export's
    tokenizer files would otherwise sit beside another's. A LoRA checkpoint: its adapters in PEFT's
    format (export_adapter), or with merge the model with the adapters folded into its weights."""
    hf_dir = Path(hf_dir)
    if hf_dir.exists() and not hf_dir.is_dir():
        raise ConvertError(f"HF_DIR {hf_dir} is a file: choose a folder")
    if hf_dir.is_dir() and any(hf_dir.iterdir()) and not force:
        raise ConvertError(
            f"HF_DIR {hf_dir} is not empty: choose a new folder, or pass --force to write into it "
            "(files of the same names are replaced, others stay)"
        )
    found = find_checkpoint(out_dir)
    checkpoint = load_checkpoint(found)  # ckpt.pt or a sharded checkpoint
    # Refuses a foreign or damaged checkpoint, or adapters on another base, before writing anything.
    model = model_from_checkpoint(checkpoint)
    config, state_dict = GPTConfig(**checkpoint["model_args"]), clean_state_dict(checkpoint["model"])
    if merge and not checkpoint.get("lora"):
        raise ConvertError(f"--merge: {found} holds no LoRA adapters to merge; export it without --merge")
    if checkpoint.get("lora") and not merge:
        return export_adapter(checkpoint["lora"], state_dict, config, hf_dir, found)
    dtype = dtype or state_dict["tok_embeddings.weight"].dtype  # a LoRA run's: its base's
    state_dict = model.state_dict() if merge else state_dict  # merged in float32
    config_json = hf_config(config, dtype)  # first: it refuses what no family represents
    entry, tokenizer, note = export_tokenizer(checkpoint, found)  # before any file is written
    chat = export_chat_format(entry, tokenizer)
    hf_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(to_hf(state_dict, config, dtype), hf_dir / "model.safetensors")
    bos, eos = None, None  # explicit None without a tokenizer: LlamaConfig would say 1 and 2
    if tokenizer is not None:
        tokenizer.save_hf(hf_dir)
        bos, eos = tokenizer.bos_token, tokenizer.eot_token
    if chat is not None:
        note += write_chat_files(hf_dir, chat, tokenizer)
    config_json.update(bos_token_id=bos, eos_token_id=eos)
    # An HF tokenizer is not ours to record: its files are beside the weights, where import looks.
    config_json[TOKENIZER_KEY] = entry if entry.get("tokenizer") in ("char", "tiktoken") else None
    # config.json last: transformers treats the directory as a model only once it is there.
    text = json.dumps(config_json, indent=2) + "\n"
    atomic_write(hf_dir / "config.json", lambda f: f.write(text.encode("utf-8")))
    print(
        f"exported {out_dir} -> {hf_dir} ({config_json['architectures'][0]}, "
        f"{str(dtype).removeprefix('torch.')}); tokenizer: {note}"
    )


def export_tokenizer(checkpoint: dict, found: Path) -> tuple[dict, Tokenizer | None, str]:
    """The checkpoint's tokenizer entry, the tokenizer it names (None without one) and a note for the
    summary line. An export without the tokenizer its checkpoint records is not one: refused."""
    entry = tokenizer_entry_in(checkpoint, found) if checkpoint.get("tokenizer") else {}
    if not entry:
        return entry, None, "none: the checkpoint records none"
    try:
        tokenizer = get_tokenizer(entry)
    except (KeyError, ValueError) as e:
        raise ConvertError(f"the checkpoint's tokenizer entry is unusable ({type(e).__name__}: {e})") from e
    return entry, tokenizer, f"{entry['tokenizer']}, for AutoTokenizer.from_pretrained"


def export_chat_format(entry: dict, tokenizer: Tokenizer | None) -> ChatFormat | None:
    """The chat format of a tokenizer with a chat template (the one its entry carries, from
    data/chat/prepare.py --chat_template, else its folder's own); None for one without. Made before
    the export writes anything: a template that cannot chat stops it."""
    template = entry.get("chat_template")
    if not isinstance(tokenizer, HFTokenizer) or not (template or tokenizer.tok.chat_template):
        return None
    return ChatFormat(tokenizer, template, source="the checkpoint's tokenizer")


def write_chat_files(hf_dir: Path, chat: ChatFormat, tokenizer: Tokenizer) -> str:
    """What transformers' apply_chat_template and generate need to reply as sample.py --chat does: the
    template as chat_template.jinja (read before tokenizer_config.json's chat_template, which a
    copied tokenizer may hold too: then set to the same), and generation_config.json, whose
    eos_token_id list ends a reply at its end-of-turn token as well as at end of text. The special
    tokens themselves are in the tokenizer files. A note for the summary line."""
    if isinstance(chat.template, str):  # not a folder's dict of named templates, copied as they are
        (hf_dir / "chat_template.jinja").write_text(chat.template, encoding="utf-8")
        config_path = hf_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        if "chat_template" in config:
            config["chat_template"] = chat.template
            config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    eos = [chat.end_of_turn, *sorted(chat.stop_ids - {chat.end_of_turn})]
    generation = {"bos_token_id": tokenizer.bos_token, "eos_token_id": eos}
    (hf_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    end = chat.tok.convert_ids_to_tokens(chat.end_of_turn)
    return f"; chat template, and generation_config.json ending a reply at {end}"


PEFT_PREFIX = "base_model.model."  # PEFT's names: its wrapper, then the transformers model's own


def to_peft(state_dict: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our adapters under PEFT's names, float32: layers.0.attn.wqkv.lora.A.k ->
    base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight (A and B keep their shapes)."""
    hf_parts = {ours: [name for name, _ in parts] for ours, parts in weight_layout(config)}
    tensors = {}
    for key in filter(is_adapter, state_dict):
        layer, _, rest = key.partition(".lora.")  # layers.0.attn.wqkv, A.k
        matrix, target = rest.split(".")
        targets = [name for name, _ in adaptable(config)[layer.split(".", 2)[2]]]  # the fused order
        module = hf_parts[layer + ".weight"][targets.index(target)].removesuffix(".weight")
        tensors[f"{PEFT_PREFIX}{module}.lora_{matrix}.weight"] = state_dict[key].float().contiguous()
    return tensors


def export_adapter(lora: dict, state_dict: dict, config: GPTConfig, hf_dir: Path, found: Path) -> None:
    """A LoRA run's adapters as PEFT writes them, for the base's Hugging Face folder (convert.py export of
    the checkpoint the run started from): PeftModel.from_pretrained, transformers' load_adapter and
    vLLM's --enable-lora read it."""
    tensors = to_peft(state_dict, config)
    modules = sorted({name.removeprefix(PEFT_PREFIX).split(".")[-3] for name in tensors})  # q_proj, ...
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,  # no hub name here: the base is the folder one loads it onto
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "target_modules": modules,
        "bias": "none",
        "use_rslora": False,  # the scale is alpha / r
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    hf_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, hf_dir / "adapter_model.safetensors")
    text = json.dumps(adapter_config, indent=2) + "\n"
    atomic_write(hf_dir / "adapter_config.json", lambda f: f.write(text.encode("utf-8")))
    print(
        f"exported the LoRA adapters of {found} -> {hf_dir} (PEFT, rank {lora['rank']}, "
        f"{', '.join(modules)}); their base: convert.py export of the checkpoint the run started from; "
        "a merged model: --merge"
    )


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    def write(tmp_path: Path) -> None:
        try:
            save_file(tensors, tmp_path, metadata={"format": "pt"})
        except SafetensorError as e:  # its I/O errors carry their errno only in the message
            found = re.search(r"os error (\d+)", str(e))
            if found is None:
                raise
            raise OSError(int(found[1]), os.strerror(int(found[1])), str(tmp_path)) from e

    atomic_write_by_name(path, write)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="our checkpoint -> a Hugging Face model directory")
    export.add_argument("out_dir", type=Path, help="run directory holding ckpt.pt")
    export.add_argument(
        "hf_dir", type=Path, help="directory to write config.json, model.safetensors and the tokenizer into"
    )
    export.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="tensor dtype on disk (default: the checkpoint's)"
    )
    export.add_argument("--force", action="store_true", help="write into a non-empty HF_DIR")
    export.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA run: fold the adapters into the base and write a plain model (default: the adapters)",
    )
    imp = commands.add_parser("import", help="a Hugging Face model directory -> our checkpoint")
    imp.add_argument(
        "hf_dir", type=Path, help="directory with config.json and model.safetensors (or shards + index)"
    )
    imp.add_argument("out_dir", type=Path, help="directory to write ckpt.pt into")
    imp.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="float32", help="tensor dtype in ckpt.pt (default: float32)"
    )
    imp.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
    imp.add_argument(
        "--block_size",
        type=int,
        help="context length, if shorter than the model's max_position_embeddings: what train.py trains "
        "at (init_from takes the checkpoint's) and sample.py samples at",
    )
    args = parser.parse_args(argv)  # a bad argument exits 2, as a bad flag does in every CLI here

    def run() -> None:
        if args.command == "export":
            dtype = getattr(torch, args.dtype) if args.dtype else None
            export_hf(args.out_dir, args.hf_dir, dtype, args.force, args.merge)
        else:
            import_hf(args.hf_dir, args.out_dir, getattr(torch, args.dtype), args.force, args.block_size)

    exit_on_error(run)


if __name__ == "__main__":
    main()
