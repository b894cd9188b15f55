"""Our features measured against themselves, one per run (bench.py measures us against transformers):
--options (training speed, each model option on against all off), --lora (memory against full
fine-tuning), --speculative MODEL_DIR DRAFT_DIR (plain, draft and prompt-lookup decoding), --chat_packing
DATA_DIR (rows packed against one conversation per row); --preset, --device, --dtype, --json as bench.py.
"""

import argparse
from functools import partial
from pathlib import Path

import numpy as np
import torch

from checkpoint import load_model_and_tokenizer
from dataset import ChatRows, load_meta
from generate import generate_tokens, kv_cache_length
from lora import LoRAConfig, add_lora, cast_base
from model import GPT, GPTConfig
from optim import make_optimizers
from runtime import UserError, autocast, exit_on_error
from speculative import Draft, PromptLookup, Stats, speculative_tokens
from timing import (
    Preset,
    bench_arguments,
    check_json_path,
    median_times,
    our_train_step,
    random_batch,
    row,
    start,
    step_peak_memory,
    write_json,
)

OPTIONS = {  # model.py's options, as bench_options turns each on (sliding_window: half the sequence)
    "qk_norm": {"qk_norm": True},
    "attn_bias": {"attn_bias": True},
    "rope_scaling": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128}},
    "sliding_window": {"sliding_window": 128},
}  # fmt: skip


def bench_options(preset: Preset, device: torch.device, dtype: torch.dtype) -> dict:
    """Our training tokens/s with each model option on, against all off, timed alternately."""
    tokens = preset.batch_size * preset.seq_len
    results = {}
    for name, option in OPTIONS.items():
        steps = []
        for overrides in ({}, option):
            torch.manual_seed(0)
            model = GPT(GPTConfig(**preset.model, **overrides)).to(device).train()
            steps.append(our_train_step(model, random_batch(preset, device), dtype)[0])
        dt_off, dt_on = median_times(steps, preset.train_steps, device, warm_up=True)
        results[name] = {"off": tokens / dt_off, "on": tokens / dt_on}
        print(
            f"{name:<16} on {tokens / dt_on:>10,.0f} tokens/s, off {tokens / dt_off:>10,.0f}: "
            f"{dt_off / dt_on:.3f}x"
        )
    return results


LORA = LoRAConfig(rank=16, alpha=32.0)  # --lora: train.py's default targets, every block matrix


def bench_lora(preset: Preset, device: torch.device, dtype: torch.dtype) -> dict:
    """Memory of a training step (forward, backward, AdamW) on the preset's model, fine-tuned in full or
    with LoRA (base held in dtype, as train.py holds it): the bytes of the weights, of the gradients
    (one per trained parameter) and of AdamW's state (counted in the optimizer after a step), of the
    activations the forward saves for backward (storages counted once), and the step's peak above what
    was allocated before it (step_peak_memory; on a CPU, peak RSS, allocator slack included)."""
    results = {}
    for name in ("full", "lora"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**preset.model)).to(device).train()
        if name == "lora":
            add_lora(model, LORA)
            cast_base(model, dtype)
        step, optimizer = our_train_step(model, random_batch(preset, device), dtype)
        step()  # AdamW's state exists from the first step on
        x = random_batch(preset, device)
        saved = {}  # storage -> bytes, of every tensor autograd keeps for backward

        def keep(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast(device, dtype):
            model(x, x)
        trained = [p for p in model.parameters() if p.requires_grad]
        results[name] = {
            "trained_params": sum(p.numel() for p in trained),
            "weight_bytes": sum(p.nbytes for p in model.parameters()),
            "gradient_bytes": sum(p.nbytes for p in trained),
            "optimizer_state_bytes": sum(
                t.nbytes for state in optimizer.state.values() for t in state.values() if t.dim() > 0
            ),
            "saved_activation_bytes": sum(saved.values()),
            "step_peak_bytes": step_peak_memory(step, device),
        }
        del model, step, optimizer
    return results


def print_lora(results: dict, preset: Preset) -> None:
    print(
        f"\nLoRA rank {LORA.rank} on {','.join(LORA.targets)} against full fine-tuning "
        f"(AdamW, batch {preset.batch_size} x {preset.seq_len})"
    )
    print(f"{'':<44} {'lora':>12} {'full':>12} {'lora/full':>9}")
    lora, full = results["lora"], results["full"]
    row("trained parameters", lora["trained_params"], full["trained_params"], fmt="{:,.0f}")
    for key, name in (
        ("weight_bytes", "weights"),
        ("gradient_bytes", "gradients"),
        ("optimizer_state_bytes", "optimizer state"),
        ("saved_activation_bytes", "activations saved for backward"),
        ("step_peak_bytes", "step peak above weights and state"),
    ):
        mib = (r[key] / 2**20 if r[key] is not None else None for r in (lora, full))
        row(f"{name} (MiB)", *mib, fmt="{:,.2f}")


SPECULATIVE_PROMPT = "ROMEO:\n"  # the README's Shakespeare prompt; any text the model's tokenizer encodes


def bench_speculative(model_dir: str, draft_dir: str, preset: Preset, device: torch.device, dtype) -> dict:
    """Tokens/s of one sample of preset.speculative_tokens tokens, greedy and at sample.py's default
    sampling (temperature 0.8, top_k 200): plain decoding, a draft proposing preset.draft_tokens tokens
    per verification, and prompt lookup (n-grams up to 3), eager and compiled, timed alternately."""
    model, tokenizer, _ = load_model_and_tokenizer(model_dir, device)
    draft = load_model_and_tokenizer(draft_dir, device)[0]
    prompt = torch.tensor([tokenizer.encode(SPECULATIVE_PROMPT)], device=device)
    n, k = preset.speculative_tokens, preset.draft_tokens
    length = kv_cache_length(draft.config, prompt.size(1), n, k)
    results: dict = {"model_params": model.get_num_params(), "draft_params": draft.get_num_params()}
    print(f"\n{n} tokens after {SPECULATIVE_PROMPT!r}, {k} proposed per verification: tokens/s")
    for compile in (False, True):
        for sampling in ((0.0, None, None), (0.8, 200, None)):
            stats = {"draft": Stats(), "prompt lookup": Stats()}

            def speculate(name: str, proposer) -> None:
                vars(stats[name]).update(vars(Stats()))  # the counts of the last run only
                list(speculative_tokens(model, proposer, prompt, n, k, sampling, compile, stats[name]))

            runs = [
                lambda: list(generate_tokens(model, prompt, n, *sampling, compile)),
                lambda: speculate("draft", Draft(draft, length, compile)),
                lambda: speculate("prompt lookup", PromptLookup(3)),
            ]
            with autocast(device, dtype):
                plain, *others = (n / t for t in median_times(runs, preset.generate_repeats, device, True))
            label = f"{'compiled' if compile else 'eager'}, temperature {sampling[0]}"
            results[label] = {"plain": plain, **{name: vars(st) for name, st in stats.items()}}
            print(f"{label:<26} plain {plain:,.0f}")
            for (name, st), tokens_per_s in zip(stats.items(), others):
                results[label][name]["tokens_per_s"] = tokens_per_s
                print(f"{'':<26} {name} {tokens_per_s:,.0f} ({tokens_per_s / plain:.2f}x), {st.summary()}")
    return results


def bench_chat_packing(
    data_dir: str | Path, shape: dict, block_size: int, batch_size: int, steps: int, device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> dict:  # fmt: skip
    """Chat rows packed against one conversation per row, on steps batches of data_dir's train split:
    the fraction of row positions holding a learned target and holding a conversation's token at all,
    and learned tokens trained per second (forward + backward + AdamW of a model of shape)."""
    meta = load_meta(Path(data_dir))
    if not meta.get("chat"):
        raise UserError(f"{data_dir} is not a chat set: prepare one with data/chat/prepare.py")
    torch.manual_seed(0)
    config = GPTConfig(**{**shape, "vocab_size": meta["vocab_size"], "block_size": block_size})
    model = GPT(config).to(device)
    (optimizer,) = make_optimizers(model, 0.1, 1e-4, (0.9, 0.95), device.type)

    def train_on(batches: list) -> None:
        for x, y, segments in batches:
            with autocast(device, dtype):
                loss = model(x, y, segments=segments, reduction="sum")[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    results, fns = {}, []
    for name, packed in (("packed", True), ("one per row", False)):
        chat, rng = ChatRows(Path(data_dir), meta, "train", block_size, packed), np.random.default_rng(0)
        rows = [chat.draw(rng) for _ in range(steps * batch_size)]
        positions = len(rows) * block_size
        results[name] = {
            "learned_fraction": chat.learned(rows) / positions,
            "real_fraction": sum(chat.positions(c) for row in rows for c in row) / positions,
            "conversations_per_row": sum(map(len, rows)) / len(rows),
            "learned_tokens": chat.learned(rows),
        }
        batches = [chat.batch(rows[i : i + batch_size], device) for i in range(0, len(rows), batch_size)]
        fns.append(partial(train_on, batches))
    for name, seconds in zip(results, median_times(fns, 3, device, warm_up=True)):
        results[name]["learned_tokens_per_s"] = results[name].pop("learned_tokens") / seconds
    return results


def run_chat_packing(data_dir: str, preset: Preset, device: torch.device, dtype: torch.dtype) -> dict:
    """--chat_packing: bench_chat_packing with the preset's model, rows of its seq_len, and a table."""
    shape = {k: v for k, v in preset.model.items() if k not in ("vocab_size", "block_size")}
    steps = 4 * preset.train_steps  # more rows than the timing needs: the fractions are averages
    packing = bench_chat_packing(data_dir, shape, preset.seq_len, preset.batch_size, steps, device, dtype)
    print(f"rows of {preset.seq_len} positions  learned  real  conversations/row  learned tokens/s")
    for name, r in packing.items():
        print(
            f"{name:<28} {r['learned_fraction']:>6.1%} {r['real_fraction']:>6.1%} "
            f"{r['conversations_per_row']:>18.2f} {r['learned_tokens_per_s']:>17,.0f}"
        )
    return packing


def main(argv: list[str] | None = None) -> None:
    exit_on_error(lambda: bench_features(argv))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_arguments(__doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--options", action="store_true", help="our training speed with each model option on against all off"
    )
    what.add_argument(
        "--lora",
        action="store_true",
        help="memory of a training step, LoRA (rank 16) against full fine-tuning",
    )
    what.add_argument(
        "--speculative",
        nargs=2,
        metavar=("MODEL_DIR", "DRAFT_DIR"),
        help="MODEL_DIR's checkpoint decoding plainly, with DRAFT_DIR's as its draft, by prompt lookup",
    )
    what.add_argument(
        "--chat_packing",
        metavar="DATA_DIR",
        help="rows of DATA_DIR's chat set packed against one conversation per row (block: seq_len)",
    )
    args = parser.parse_args(argv)
    check_json_path(args.json)
    return args


def bench_features(argv: list[str] | None) -> None:
    args = parse_args(argv)
    device, dtype, preset, _, results = start(args, {})
    if args.chat_packing:
        results["chat_packing"] = run_chat_packing(args.chat_packing, preset, device, dtype)
    elif args.speculative:
        results["speculative"] = bench_speculative(*args.speculative, preset, device, dtype)
    elif args.lora:
        results["lora_memory"] = bench_lora(preset, device, dtype)
        print_lora(results["lora_memory"], preset)
    else:
        results["option_tokens_per_s"] = bench_options(preset, device, dtype)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
