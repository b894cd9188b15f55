"""Convert between our checkpoints and Hugging Face model directories (config.json, safetensors, tokenizer)
of the Llama, Qwen2, Qwen3 and Mistral families.

  python convert.py export OUT_DIR HF_DIR   # OUT_DIR/ckpt.pt -> HF_DIR for transformers, vLLM, llama.cpp
  python convert.py import HF_DIR OUT_DIR   # Llama 3.2, Qwen2.5, Qwen3, Mistral, ... -> OUT_DIR/ckpt.pt

A LoRA run's checkpoint (train.py --lora_rank) exports as a PEFT adapter folder (adapter_config.json,
adapter_model.safetensors) for the base model's folder, or with --merge as a plain model folder.
The maps themselves (config fields, weight names, PEFT's adapter names): hf_mapping.py.
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
    LATEST_SHARDED,
    TOKENIZER_DIR,
    clean_state_dict,
    find_checkpoint,
    load_model_and_tokenizer,
    save_checkpoint,
    tokenizer_entry_from_checkpoint,
)
from hf_mapping import (
    PEFT_PREFIX,
    ConvertError,
    check_config_fields,
    check_tensors,
    from_hf,
    gpt_config_from_hf,
    hf_config,
    to_hf,
    to_peft,
)
from model import GPTConfig
from runtime import DTYPE_NAMES, atomic_write, atomic_write_by_name, exit_on_error
from tokenizer import HFTokenizer, Tokenizer, copy_hf_tokenizer, has_hf_tokenizer

TOKENIZER_KEY = (
    "nanogpt_tokenizer"  # our checkpoint's tokenizer entry, kept in config.json so import restores it
)


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
    if (hf_dir / CKPT_NAME).exists() or (hf_dir / LATEST_SHARDED).exists():  # its config.json is the run's
        raise ConvertError(f"HF_DIR {hf_dir} holds a training run: export into a folder of its own")
    if hf_dir.is_dir() and any(hf_dir.iterdir()) and not force:
        raise ConvertError(
            f"HF_DIR {hf_dir} is not empty: choose a new folder, or pass --force to write into it "
            "(files of the same names are replaced, others stay)"
        )
    found = find_checkpoint(out_dir)
    # Refuses a foreign or damaged checkpoint, adapters on another base, or an unusable tokenizer entry
    # (an export without the tokenizer its checkpoint records is not one), before writing anything.
    model, tokenizer, checkpoint = load_model_and_tokenizer(found, tokenizer="optional")
    config, state_dict = GPTConfig(**checkpoint["model_args"]), clean_state_dict(checkpoint["model"])
    if merge and not checkpoint.get("lora"):
        raise ConvertError(f"--merge: {found} holds no LoRA adapters to merge; export it without --merge")
    if checkpoint.get("lora") and not merge:
        return export_adapter(checkpoint["lora"], state_dict, config, hf_dir, found)
    dtype = dtype or state_dict["tok_embeddings.weight"].dtype  # a LoRA run's: its base's
    state_dict = model.state_dict() if merge else state_dict  # merged in float32
    config_json = hf_config(config, dtype)  # first: it refuses what no family represents
    entry = tokenizer_entry_from_checkpoint(checkpoint, found) if tokenizer else {}
    note = "none: the checkpoint records none"
    chat = export_chat_format(entry, tokenizer)
    hf_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(to_hf(state_dict, config, dtype), hf_dir / "model.safetensors")
    bos, eos = None, None  # explicit None without a tokenizer: LlamaConfig would say 1 and 2
    if tokenizer is not None:
        tokenizer.save_hf(hf_dir)
        bos, eos = tokenizer.bos_token, tokenizer.eot_token
        note = f"{entry['tokenizer']}, for AutoTokenizer.from_pretrained"
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
