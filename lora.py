"""LoRA: low-rank adapters on a trained GPT's linear layers, with the base frozen (Hu et al., 2021).

Each adapted part of a block's linear layers (q, k, v, o, gate, up, down) gets its own pair of matrices:
that part's output rows gain scale * B A dropout(x), with A (rank, in) random, B (rows, rank) zero, so
that training starts from the base exactly, and scale = alpha / rank (rsLoRA's alpha / sqrt(rank) is not
offered). q|k|v and gate|up are fused matrices in model.py; one pair per part maps one to one to PEFT's
adapters on Hugging Face's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj.

A training run meets LoRA in two calls: check_adapters (settings it cannot run) and add_adapters (the
loaded model's adapters, its base frozen in the run's dtype, what the checkpoint records of them).

The adapters are submodules of the layers they adapt (`layers.0.attn.wqkv.lora.A.q`), added to the
layer's output by a forward hook: the base's state_dict keys, and model.py, stay as they are.
"""

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import AT_LEAST_1_OR_NONE, BELOW_ONE, POSITIVE, check_values
from model import GPT, GPTConfig
from runtime import CheckpointError, ConfigError

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"lora_rank must be at least 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0 and 0 <= self.dropout < 1):
            raise ValueError(
                f"lora_alpha must be over 0 and lora_dropout in [0, 1): {self.alpha}, {self.dropout}"
            )
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"lora_targets names {', '.join(map(repr, unknown)) or 'nothing'}; "
                f"choose among {','.join(TARGETS)}"
            )


def adaptable(config: GPTConfig) -> dict[str, list[tuple[str, int]]]:
    """The linear layers of a block that LoRA may adapt, each with the parts fused into it in row
    order: (target, rows)."""
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    hidden, E = config.intermediate_size, config.n_embd
    return {
        "attn.wqkv": [("q", q), ("k", kv), ("v", kv)],
        "attn.wo": [("o", E)],
        "mlp.gate_up": [("gate", hidden), ("up", hidden)],
        "mlp.down": [("down", E)],
    }


class LoRA(nn.Module):
    """The adapters of one linear layer: a low-rank update of each targeted part of its output."""

    def __init__(self, in_features: int, parts: list[tuple[str, int]], lora: LoRAConfig):
        super().__init__()
        self.in_features = in_features
        self.parts = parts  # every part, targeted or not: the layout of the layer's output
        targeted = [(name, rows) for name, rows in parts if name in lora.targets]
        self.A = nn.ParameterDict({name: torch.empty(lora.rank, in_features) for name, _ in targeted})
        self.B = nn.ParameterDict({name: torch.zeros(rows, lora.rank) for name, rows in targeted})
        for a in self.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear, and PEFT, initialise A
        self.scale = lora.alpha / lora.rank
        self.dropout = nn.Dropout(lora.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        updates = [
            F.linear(F.linear(x, self.A[name]), self.B[name]) * self.scale
            if name in self.A
            else x.new_zeros(*x.shape[:-1], rows)  # an untargeted part of a fused layer
            for name, rows in self.parts
        ]
        return torch.cat(updates, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the layer's weight: scale * B A per part, zero elsewhere (out, in)."""
        any_b = next(iter(self.B.values()))
        return torch.cat(
            [
                self.B[name] @ self.A[name] * self.scale
                if name in self.A
                else any_b.new_zeros(rows, self.in_features)
                for name, rows in self.parts
            ]
        )


def add_adapter_output(linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook of an adapted layer: its output plus its adapters'."""
    return output + linear.lora(args[0]).to(output.dtype)


def add_lora(model: GPT, lora: LoRAConfig) -> None:
    """Freeze every weight of model and attach lora's adapters, which alone train."""
    layers = {
        path: parts
        for path, parts in adaptable(model.config).items()
        if any(name in lora.targets for name, _ in parts)
    }
    for path, parts in layers.items():  # every block alike: the first one's layers tell
        cols = model.layers[0].get_submodule(path).in_features
        for name, rows in parts:
            if name in lora.targets and lora.rank > min(rows, cols):
                raise ValueError(
                    f"lora_rank {lora.rank} is larger than the {name} matrix ({rows} x {cols}) allows: "
                    f"at most {min(rows, cols)}, where B A could already be any matrix"
                )
    model.requires_grad_(False)
    for block in model.layers:
        for path, parts in layers.items():
            linear = block.get_submodule(path)
            linear.lora = LoRA(linear.in_features, parts, lora).to(linear.weight.device)
            linear.lora.hook = linear.register_forward_hook(add_adapter_output)


def adapted_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(getattr(module, "lora", None), LoRA)]


@torch.no_grad()
def merge_lora(model: GPT) -> None:
    """Fold every adapter into its layer's weight and remove it: model becomes a plain GPT again."""
    for linear in adapted_layers(model):
        linear.weight += linear.lora.delta_weight().to(linear.weight.dtype)
        linear.lora.hook.remove()
        del linear.lora
    model.requires_grad_(True)


def is_adapter(name: str) -> bool:
    """Whether a parameter name (of named_parameters or state_dict) is an adapter's."""
    return ".lora." in name


def cast_base(model: GPT, dtype: torch.dtype) -> None:
    """Hold the frozen base in dtype (a 16-bit one on a GPU: half the memory of float32), the adapters in
    float32: their updates are too small for 16 bits."""
    for name, p in model.named_parameters():
        if not is_adapter(name):
            p.data = p.data.to(dtype)  # a tied embedding and LM head are one parameter: cast once


def base_fingerprint(model: GPT) -> str:
    """A hash of the base's weights (names and float32 values, so the same in any lossless dtype)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not is_adapter(name):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def lora_config(entry: dict) -> LoRAConfig:
    """The adapters' settings in a checkpoint's lora entry (which also holds the base's fingerprint)."""
    try:
        if entry.keys() != {"rank", "alpha", "dropout", "targets", "base_fingerprint"}:
            raise ValueError(f"its keys are {', '.join(entry)}")
        return LoRAConfig(**{key: value for key, value in entry.items() if key != "base_fingerprint"})
    except (AttributeError, TypeError, ValueError) as e:  # not a dict, a value of the wrong type, ...
        raise CheckpointError(f"the checkpoint's lora entry is damaged ({e}): use the run's own") from None


def check_lora_base(model: GPT, entry: dict, hint: str = "") -> None:
    """Refuse adapters on a base other than the one they were trained on: a fingerprint of the base's
    weights is recorded when a LoRA run starts, and every load checks it."""
    found = base_fingerprint(model)
    if found != entry["base_fingerprint"]:
        raise CheckpointError(
            f"the base weights differ from those the LoRA adapters were trained on (fingerprint {found}, "
            f"recorded {entry['base_fingerprint']}): "
            + (hint or "the checkpoint was edited or damaged; use the one the LoRA run saved")
        )


class LoRARun(Protocol):
    """The settings of a training run that LoRA reads (train.py's TrainConfig)."""

    lora_rank: int | None
    lora_alpha: float
    lora_dropout: float
    lora_targets: str
    init_from: str
    out_dir: str
    parallelism: str
    optimizer: str


@dataclass
class Adapted:  # what add_adapters made of a model, for the run to record and print
    checkpoint_entries: dict  # {"lora": the settings and the base's fingerprint, or None without LoRA}
    summary: str | None  # the start-up line: the settings, the parameters trained and frozen


def lora_settings(run: LoRARun) -> LoRAConfig | None:
    if run.lora_rank is None:
        return None
    targets = tuple(target.strip() for target in run.lora_targets.split(","))
    try:
        return LoRAConfig(run.lora_rank, run.lora_alpha, run.lora_dropout, targets)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_adapters(run: LoRARun) -> None:
    """The settings, and what LoRA cannot be combined with, refused before any work."""
    check_values(run, {"lora_rank": AT_LEAST_1_OR_NONE, "lora_alpha": POSITIVE, "lora_dropout": BELOW_ONE})
    if lora_settings(run) is None:
        return
    if run.init_from == "scratch":
        raise ConfigError(
            "lora_rank: LoRA adapts a trained model, and a from-scratch one has nothing worth freezing; "
            "start from a checkpoint (--init_from=DIR, e.g. one convert.py imported), or drop lora_rank"
        )
    if run.parallelism == "fsdp":
        raise ConfigError(
            "lora_rank: LoRA runs with parallelism='ddp' (every process holds the 16-bit base), not 'fsdp'"
        )
    if run.optimizer != "adamw":
        raise ConfigError("lora_rank: the adapters train with AdamW; set optimizer='adamw'")


def add_adapters(run: LoRARun, model: GPT, checkpoint: dict | None, dtype: torch.dtype) -> Adapted:
    """With lora_rank: freeze model and give it adapters (a resumed run's own came with it), its base held
    in the run's dtype. Before DDP and the optimizers, which must see what trains."""
    wanted = lora_settings(run)
    saved = checkpoint.get("lora") if run.init_from == "resume" else None
    if run.init_from == "resume" and wanted != (saved and lora_config(saved)):
        had = f"LoRA {lora_config(saved)}" if saved else "no LoRA"
        raise ConfigError(
            f"the run in {run.out_dir} was trained with {had}: resume it with its own lora_* settings "
            f"(config.json holds them), or start a new run from its weights: --init_from={run.out_dir}"
        )
    if wanted is None:
        return Adapted({"lora": None}, None)
    if saved is None:
        try:
            add_lora(model, wanted)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    cast_base(model, dtype)
    entry = {**asdict(wanted), "base_fingerprint": base_fingerprint(model)}
    if saved:  # a base saved in float32 would be rounded by a 16-bit dtype: another base
        stored = str(checkpoint["model"]["tok_embeddings.weight"].dtype).removeprefix("torch.")
        check_lora_base(model, saved, f"its base was saved in {stored}; resume with --dtype={stored}")
    return Adapted({"lora": entry}, lora_summary(model, entry))


def lora_summary(model: GPT, entry: dict) -> str:
    """LoRA's line: its settings, and the parameters trained (the adapters) and frozen, with dtypes."""
    trained, frozen = {}, {}
    for name, p in model.named_parameters():
        side = trained if is_adapter(name) else frozen
        side[p.dtype] = side.get(p.dtype, 0) + p.numel()

    def count(side: dict) -> str:
        return ", ".join(
            f"{n / 1e6:.3g}M in {str(dtype).removeprefix('torch.')}" for dtype, n in side.items()
        )

    return (
        f"LoRA rank {entry['rank']}, alpha {entry['alpha']:g}, dropout {entry['dropout']:g} on "
        f"{','.join(entry['targets'])}: trains {count(trained)} (AdamW), {count(frozen)} frozen; "
        f"base fingerprint {entry['base_fingerprint']}"
    )
