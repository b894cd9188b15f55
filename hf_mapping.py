"""The maps between our model and Hugging Face's Llama, Qwen2, Qwen3 and Mistral: config.json to and
from GPTConfig, weight names and fused tensors, our LoRA adapters to PEFT's names. No files: convert.py.

The options of model.py that each family carries (export picks the family a checkpoint's options need,
plain Llama when it uses none; rope_scaling 'llama3' and head_dim go with any of them):
  llama    LlamaForCausalLM     -
  qwen2    Qwen2ForCausalLM     attn_bias (always), sliding_window
  qwen3    Qwen3ForCausalLM     qk_norm (always), sliding_window
  mistral  MistralForCausalLM   sliding_window
What a family may carry and model.py cannot compute is refused with a message naming the field.

RoPE layout: model.py rotates the pairs (x[i], x[i + head_dim/2]) as HF's Llama does, so q_proj and
k_proj copy over unchanged (the q/k permutation of other converters is for Meta's original files).
"""

import torch

from lora import adaptable, is_adapter
from model import LLAMA3_SCALING_KEYS, GPTConfig
from runtime import UserError

ARCHITECTURES = {  # model_type: the class of each family we convert
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
Layout = list[tuple[str, list[tuple[str, tuple[int, ...]]]]]
SIZE_KEYS = (  # config.json fields that size the model
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
        qkv = [(hf + f"self_attn.{x}_proj.", rows) for x, rows in zip("qkv", (q_rows, kv_rows, kv_rows))]
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
        if (found := tuple(tensors[name].shape)) != shape:
            raise ConvertError(f"{name} has shape {found}, but config.json implies {shape}")


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
