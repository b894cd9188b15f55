"""train.py's config: every key with its default and meaning (nanoGPT's defaults block, as a dataclass),
the checks that refuse values no run can use, and how the command line, config files and a resumed
run's config.json give a run its values (`python train.py --help` lists them).
"""

import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from checkpoint import CKPT_NAME, CheckpointError, find_checkpoint
from configurator import AT_LEAST_1, BELOW_ONE, NOT_NEGATIVE, POSITIVE, check_values, one_of, parse_config
from lora import check_adapters
from runtime import ConfigError, UserError, print0
from tasks import task_names

RUN_CONFIG_NAME = "config.json"  # the run's resolved config, what --init_from=resume restores
# How a run is launched, not what it is: --init_from=resume takes them from the command line (or their
# defaults), not from config.json, so a run resumes on whatever machine and process count is at hand.
LAUNCH_KEYS = ("device", "parallelism", "compile")


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # ckpt.pt, config.json and metrics.jsonl go here
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint to start anew from
    eval_interval: int = 250  # iterations between evaluations; a checkpoint is saved when val loss improves
    eval_iters: int = 100  # batches per split in each evaluation (the same batches every time)
    eval_only: bool = False  # evaluate the model init_from gives, then exit
    eval_full: bool = True  # after training (and with eval_only) also the loss over every val token once
    eval_tasks: str = ""  # eval.py's multiple-choice tasks to score at each evaluation, e.g. 'hellaswag'
    eval_task_examples: int = 100  # the first N examples of each of eval_tasks (the same ones every time)
    log_interval: int = 10  # iterations between log lines: the only points the host waits for the device
    always_save_checkpoint: bool = False  # save at every evaluation, not only when val loss improves
    wandb_log: bool = False
    wandb_project: str = "llm-train"
    wandb_run_name: str = "run"
    # data
    dataset: str = "openwebtext"  # a prepared folder under the repo's data/
    data_dir: str | None = None  # any prepared folder instead of data/<dataset>
    batch_size: int = 12  # sequences per micro-step in each process
    block_size: int = 1024  # tokens per sequence, and the model's context length
    gradient_accumulation_steps: int = 40  # micro-steps per iteration, all processes together
    chat_packing: bool = True  # a chat set's rows: conversations packed one after another, or one per row
    # model: from scratch only; a loaded checkpoint brings its own shape
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # key/value heads; None = n_head
    n_embd: int = 768
    head_dim: int | None = None  # size of each attention head; None = n_embd // n_head
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3)
    attn_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    rope_scaling: dict | None = None  # Llama 3.1's {"rope_type": "llama3", ...}; see model.py
    sliding_window: int | None = None  # attend to the W most recent positions only (Mistral)
    tie_embeddings: bool = True  # the LM head shares the token embedding's weights (GPT-2, small Llamas)
    dropout: float = 0.0
    zero_init_out_proj: bool = False  # start attention's and the MLP's output projections at zero
    # optimizer: AdamW, or Muon for the blocks' matrices and AdamW for the rest
    optimizer: str = "adamw"  # 'adamw' or 'muon'
    muon_lr: float = 0.02  # Muon's learning rate (AdamW's is learning_rate); the schedule scales both alike
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations that orthogonalise each Muon update
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    warmup_iters: int = 2000
    lr_decay_iters: int | None = None  # where the decay reaches min_lr; None = max_iters
    min_lr: float = 6e-5
    lr_schedule: str = "cosine"  # after warmup: 'cosine' decay, or 'wsd' (constant, then a linear decay)
    decay_frac: float = 0.2  # wsd: the last fraction of lr_decay_iters that decays linearly to min_lr
    # LoRA (docs/lora.md): train low-rank adapters on a loaded model's matrices, the base frozen
    lora_rank: int | None = None  # the adapters' rank; None = no LoRA, train every weight
    lora_alpha: float = 32.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "q,k,v,o,gate,up,down"  # the matrices to adapt: attention's and the MLP's
    # parallelism (under torchrun) and memory
    parallelism: str = "ddp"  # 'ddp': each process holds the whole model; 'fsdp': shard it over them
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    # system
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), or a torch device such as 'cpu', 'cuda:1'
    dtype: str = "auto"  # 'auto': bfloat16 on CUDA (float16 if unsupported), else float32; or one of those
    compile: bool | None = None  # torch.compile the model; None = only on CUDA
    seed: int = 1337
    # A process that waits this long in a collective for another one ends the run (one stopped, stuck
    # or dead). Healthy waits stay far below it: rank 0 saving ckpt.pt while the others wait in their
    # next all-reduce (measured: 0.32 GiB/s fsynced on this CI machine's disk, so 600 s is a ~190 GiB
    # checkpoint), or one rank compiling longer than another (seconds to a minute or two cold).
    collective_timeout_s: float = 600


SHAPE_KEYS = (  # TrainConfig keys that are also GPTConfig fields: the model's shape and options
    *("block_size", "n_layer", "n_head", "n_kv_head", "n_embd"),
    *("head_dim", "qk_norm", "attn_bias", "rope_scaling", "sliding_window", "tie_embeddings"),
)


def check_config(cfg: TrainConfig) -> None:
    """Values no run can use, refused before any work (exit code 2)."""
    at_least_1 = ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters")
    at_least_1 += ("eval_task_examples", "muon_ns_steps", "log_interval")
    not_negative = ("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip")
    rules = dict.fromkeys(at_least_1, AT_LEAST_1) | dict.fromkeys(not_negative, NOT_NEGATIVE)
    rules |= dict.fromkeys(("beta1", "beta2", "dropout", "muon_momentum"), BELOW_ONE)
    rules |= dict.fromkeys(("learning_rate", "muon_lr"), POSITIVE)
    rules |= {"seed": (lambda v: 0 <= v < 2**63, "must be in [0, 2**63)")}
    rules |= {"optimizer": one_of("adamw", "muon"), "lr_schedule": one_of("cosine", "wsd")}
    rules |= {"decay_frac": (lambda v: 0 < v <= 1, "must be in (0, 1]")}
    check_values(cfg, rules)
    check_adapters(cfg)
    task_names(cfg.eval_tasks)  # an unknown task stops the run before it starts
    if cfg.parallelism not in ("ddp", "fsdp"):
        raise ConfigError(f"parallelism must be 'ddp' or 'fsdp', got {cfg.parallelism!r}")
    # nanoGPT's init_from=gpt2, gpt2-medium, ...: a clear no, with what to use instead
    if cfg.init_from.startswith("gpt2") and not Path(cfg.init_from).exists():
        raise ConfigError(
            f"init_from={cfg.init_from!r}: GPT-2's architecture (learned positions, LayerNorm, GELU) is not "
            "this model's (RoPE, RMSNorm, SwiGLU). Import a Llama-family model instead, e.g. SmolLM2-135M "
            "(GPT-2 small's size, far stronger): python convert.py import path/to/SmolLM2-135M "
            "out-smollm2, then --init_from=out-smollm2"
        )
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={cfg.out_dir!r} exists and is not a directory: choose another out_dir")


def fit_to_processes(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """cfg with gradient_accumulation_steps, the micro-steps of all processes together, rounded up to a
    multiple of the number of processes, so that each runs as many (said once; config.json keeps it)."""
    steps = math.ceil(cfg.gradient_accumulation_steps / world_size) * world_size
    if steps != cfg.gradient_accumulation_steps:
        print0(
            f"note: gradient_accumulation_steps {cfg.gradient_accumulation_steps} -> {steps}, rounded up to "
            f"a multiple of the {world_size} processes: {steps // world_size} per process"
        )
    return replace(cfg, gradient_accumulation_steps=steps)


def read_config(argv: list[str] | None) -> TrainConfig:
    """The config the command line gives. With --init_from=resume it starts from the run's own
    out_dir/config.json, so `train.py --out_dir=X --init_from=resume` alone continues the run; the
    command line's files and flags still apply on top."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(
        TrainConfig(), argv, prog="train.py", description="Train a GPT (model.py) on a prepared data set."
    )
    saved = Path(cfg.out_dir) / RUN_CONFIG_NAME
    if cfg.init_from != "resume":
        return cfg
    if not saved.is_file():
        try:
            find_checkpoint(cfg.out_dir)
        except CheckpointError:  # before anything else: the defaults' data set is not what is missing
            raise UserError(
                f"no checkpoint in {cfg.out_dir} to resume (no {RUN_CONFIG_NAME}, {CKPT_NAME} or sharded "
                "checkpoint): check --out_dir, or start a run without --init_from=resume"
            ) from None
        return cfg
    resumed = parse_config(TrainConfig(), [str(saved), *argv])
    resumed = replace(resumed, **{key: getattr(cfg, key) for key in LAUNCH_KEYS})
    saved_cfg = parse_config(TrainConfig(), [str(saved)])
    changes = [
        f"{k}={v!r}"
        for k, v in asdict(resumed).items()
        if v != getattr(saved_cfg, k) and k not in ("init_from", *LAUNCH_KEYS)
    ]
    print0(
        f"resuming with {saved}"
        + (f", changed: {', '.join(changes)}" if changes else "")
        + f"; {', '.join(LAUNCH_KEYS)} follow this machine and command line, not the saved run"
    )
    return resumed
