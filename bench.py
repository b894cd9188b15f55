"""Speed of this project's Llama against transformers' LlamaForCausalLM: same config, same weights,
same machine, same run. Ours and the peer's measurements alternate, so background load slows both
alike; on a busy machine the ratios are the figures to trust, not the absolute numbers.

    python bench.py                                    # small preset, about a minute on a 2-core CPU
    python bench.py --device cuda --dtype bfloat16 --json bench.json

Measures: training tokens/s (forward + backward + AdamW) and MFU, here the utilisation of the
device's matmul peak measured in the same run (train.py's MFU uses a GPU's datasheet peak instead);
greedy generation at batch 1 and 8, ours with the decode step compiled and eager: tokens/s, the
share of the memory-bandwidth bound (from a matrix-vector read rate measured in the same run), time
to first token and compile time, with a check that all produce the same tokens; peak memory of a
training step; on the README's Shakespeare model, our generation compiled, eager, and without a KV
cache (a full re-forward of the context per token, as nanoGPT samples), and the tokens that repay
the compile; and eval.py's multiple-choice scoring, batched against one choice at a time.

    python bench.py --lora                             # memory of LoRA against full fine-tuning
"""

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from checkpoint import find_checkpoint, load_checkpoint, load_model_and_tokenizer, model_from_checkpoint
from configurator import read_config_file
from dataset import ChatRows, load_meta
from generate import (
    COMPILE_MIN_TOKENS,
    compile_decode_step,
    generate,
    generate_tokens,
    kv_cache_length,
    sample_next_token,
)
from lora import LoRAConfig, add_lora, cast_base
from model import GPT, GPTConfig
from optim import make_optimizers
from runtime import DTYPE_NAMES, UserError, atomic_write, autocast, exit_on_error, pick_device, pick_dtype
from speculative import Draft, PromptLookup, Stats, speculative_tokens
from tasks import continuation_logprobs

SHAKESPEARE_CONFIG = Path(__file__).parent / "configs" / "shakespeare_char.py"
SHAKESPEARE_VOCAB = 65  # distinct characters in Tiny Shakespeare


@dataclass
class Preset:
    model: dict  # GPTConfig fields
    batch_size: int  # training batch, sequences of seq_len tokens
    seq_len: int
    train_steps: int  # timed steps per model, after one warm-up step
    prompt_len: int  # generation: a random prompt of prompt_len tokens, then new_tokens greedy ones
    new_tokens: int
    generate_repeats: int  # timed generations per model and batch size (a long call needs no warm-up)
    no_cache_tokens: int  # new tokens for the KV cache vs no cache comparison
    no_cache_repeats: int  # its gap is several-fold: fewer repeats do
    matmul_size: int  # n of the n x n x n matmul that measures the peak FLOP/s (on CUDA at least 8192)
    choice_examples: int  # multiple-choice scoring: random examples of 4 choices, scored twice
    speculative_tokens: int = 500  # --speculative: tokens per sample
    draft_tokens: int = 4  # --speculative: tokens proposed per verification


PRESETS = {
    "tiny": Preset(  # seconds; for the smoke test, not for numbers
        dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),
        batch_size=2,
        seq_len=32,
        train_steps=1,
        prompt_len=8,
        new_tokens=8,
        generate_repeats=1,
        no_cache_tokens=8,
        no_cache_repeats=1,
        matmul_size=256,
        choice_examples=2,
    ),
    "small": Preset(  # about a minute on a 2-core CPU
        dict(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_kv_head=2, n_embd=384),
        batch_size=8,
        seq_len=256,
        train_steps=3,
        prompt_len=64,
        new_tokens=256,
        generate_repeats=3,
        no_cache_tokens=500,
        no_cache_repeats=1,
        matmul_size=2048,
        choice_examples=32,
    ),
}


def to_peer(model: GPT):
    """transformers' LlamaForCausalLM holding a copy of our weights, mapped by convert.py."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert import hf_config, to_hf  # needs safetensors, as transformers does

    cfg = model.config
    dtype = model.lm_head.weight.dtype
    # No bos/eos ids (LlamaConfig would say 1 and 2), so random weights never stop generation early.
    # sdpa: their fastest built-in attention on every device, as ours uses.
    peer_config = LlamaConfig(
        **hf_config(cfg, dtype), bos_token_id=None, eos_token_id=None, attn_implementation="sdpa"
    )
    peer = LlamaForCausalLM(peer_config)
    weights = to_hf(model.state_dict(), cfg, dtype)
    missing, unexpected = peer.load_state_dict(weights, strict=False)
    # A tied lm_head has no entry of its own.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return peer.to(model.lm_head.weight.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_times(
    fns: list[Callable], repeats: int, device: torch.device, warm_up: bool = False
) -> list[float]:
    """Median seconds of each of fns. Calls alternate, and who goes first rotates, so that load from
    other processes and cache warmth fall on all alike."""
    if warm_up:
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for j in range(len(fns)):
            k = (i + j) % len(fns)
            times[k].append(timed(fns[k], device))
    return [statistics.median(t) for t in times]


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """The best FLOP/s of an n x n x n matmul in dtype: the device's practical peak, measured, not
    looked up, so MFU means the same on a laptop CPU as on a datacenter GPU."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: library initialisation, kernel selection
    best = min(timed(lambda: a @ b, device) for _ in range(5))
    return 2 * n**3 / best


CUDA_MATMUL_SIZE = 8192  # a datacenter GPU reaches its peak only on large matmuls: at 2048 an H100 does not


def peak_matmul_size(preset: Preset, device: torch.device) -> int:
    return max(preset.matmul_size, CUDA_MATMUL_SIZE) if device.type == "cuda" else preset.matmul_size


def peak_rss_bytes() -> int:
    """This process's peak RSS since the last reset (VmHWM): no library reads it after a reset."""
    line = next(
        line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")
    )
    return int(line.split()[1]) * 1024


def step_peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Bytes a training step needs at its peak beyond what was allocated before it: activations,
    gradients, temporaries. CPU: peak RSS over RSS before (Linux with glibc only, else None)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap to the OS: a step cannot hide in it
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak RSS, to the current RSS
    except OSError:
        return None
    before = psutil.Process().memory_info().rss
    step()
    return peak_rss_bytes() - before


def our_train_step(model: GPT, x: torch.Tensor, dtype: torch.dtype) -> tuple[Callable, torch.optim.AdamW]:
    """One forward + backward + AdamW step of our model on the batch x, and its optimizer."""
    (optimizer,) = make_optimizers(model, 0.1, 1e-4, (0.9, 0.95), x.device.type)

    def step() -> None:
        with autocast(x.device, dtype):
            loss = model(x, x)[1]  # not holding the logits: they would stay alive through backward
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def random_batch(preset: Preset, device: torch.device) -> torch.Tensor:
    return torch.randint(0, preset.model["vocab_size"], (preset.batch_size, preset.seq_len), device=device)


def train_step_fns(
    model: GPT, peer, preset: Preset, device: torch.device, dtype: torch.dtype
) -> tuple[Callable, Callable]:
    """One forward + backward + AdamW step for each model, on the same random batch."""
    x = random_batch(preset, device)
    ours, optimizer = our_train_step(model, x, dtype)
    fused = optimizer.defaults["fused"]  # the same AdamW as ours: the comparison is of the models
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)

    def peer_step() -> None:
        with autocast(device, dtype):
            loss = peer(input_ids=x, labels=x).loss  # they shift the labels themselves
        loss.backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)

    return ours, peer_step


def bench_chat_packing(
    data_dir: Path, shape: dict, block_size: int, batch_size: int, steps: int, device: torch.device,
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

    def train_on(batches: list) -> Callable[[], None]:
        def step() -> None:
            for x, y, segments in batches:
                with autocast(device, dtype):
                    loss = model(x, y, segments=segments, reduction="sum")[1]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return step

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
        fns.append(
            train_on([chat.batch(rows[i : i + batch_size], device) for i in range(0, len(rows), batch_size)])
        )
    for name, seconds in zip(results, median_times(fns, 3, device, warm_up=True)):
        results[name]["learned_tokens_per_s"] = results[name].pop("learned_tokens") / seconds
    return results


def generate_without_cache(model: GPT, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding as nanoGPT samples: each token re-runs the whole context, cropped to block_size."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, sample_next_token(logits[:, -1], temperature=0)], dim=1)
    return idx


def shakespeare_model(out_dir: str | None, device: torch.device) -> GPT:
    """The README's Shakespeare model: trained weights from out_dir, else random weights in the shape
    configs/shakespeare_char.py gives (random weights decode exactly as fast)."""
    if out_dir:
        return model_from_checkpoint(load_checkpoint(out_dir, device)).to(device).eval()
    values = read_config_file(str(SHAKESPEARE_CONFIG))
    shape = {key: value for key, value in values.items() if key in GPTConfig.__dataclass_fields__}
    return GPT(GPTConfig(vocab_size=SHAKESPEARE_VOCAB, **shape)).to(device).eval()


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def bench_training(
    model: GPT, preset: Preset, device: torch.device, dtype: torch.dtype, peak_flops: float
) -> dict:
    """Training tokens/s, MFU and step peak memory, ours and the peer's."""
    model.train()
    peer = to_peer(model).train()
    step_ours, step_peer = train_step_fns(model, peer, preset, device, dtype)
    # The warm-up step creates AdamW's state.
    dt_ours, dt_peer = median_times([step_ours, step_peer], preset.train_steps, device, warm_up=True)
    tokens = preset.batch_size * preset.seq_len
    flops = model.flops_per_token(preset.seq_len) * tokens  # the same count for both: same architecture
    return {
        "train_tokens_per_s": {"ours": tokens / dt_ours, "peer": tokens / dt_peer},
        "mfu": {"ours": flops / dt_ours / peak_flops, "peer": flops / dt_peer / peak_flops},
        "train_peak_memory_bytes": {
            "ours": step_peak_memory(step_ours, device),
            "peer": step_peak_memory(step_peer, device),
        },
        **bench_activation_checkpointing(model, step_ours, preset, device),
    }


def bench_activation_checkpointing(model: GPT, step: Callable, preset: Preset, device: torch.device) -> dict:
    """Our training step without and with activation checkpointing: tokens/s and step peak memory."""

    def checkpointed_step() -> None:
        model.activation_checkpointing = True
        step()
        model.activation_checkpointing = False

    dt_off, dt_on = median_times([step, checkpointed_step], preset.train_steps, device)
    tokens = preset.batch_size * preset.seq_len
    return {
        "checkpointing_tokens_per_s": {"off": tokens / dt_off, "on": tokens / dt_on},
        "checkpointing_peak_memory_bytes": {
            "off": step_peak_memory(step, device),
            "on": step_peak_memory(checkpointed_step, device),
        },
    }


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


def measure_read_rate(weights: list[torch.Tensor]) -> float:
    """Bytes/s that matrix-vector products read from weights, one product per weight in turn (best of 5
    after a warm-up): memory bandwidth, measured in the run rather than looked up."""
    vectors = [torch.randn(w.size(1), device=w.device, dtype=w.dtype) for w in weights]

    def read_all() -> None:
        with torch.no_grad():
            for weight, vector in zip(weights, vectors):
                weight @ vector

    read_all()
    return sum(w.nbytes for w in weights) / min(timed(read_all, weights[0].device) for _ in range(5))


def bench_generation(model: GPT, preset: Preset, device: torch.device, dtype: torch.dtype) -> dict:
    """Greedy generation at batch 1 and 8, ours with the decode step compiled and eager against
    transformers' generate, each model with its own KV cache: tokens/s (new tokens over the whole call,
    prefill included), time to first token, our compile time, whether all three gave the same tokens,
    and the bound memory bandwidth puts on tokens/s: every step reads every matrix once, so at most
    batch x (read rate) / (matrix bytes) tokens/s, the read rate that of one float32 matrix-vector
    product over a matrix as large as all of the model's. The model's own matrices, one product each,
    read slower (smaller matrices): their rate is reported too, the ceiling of the matmuls alone."""
    model.eval()
    peer = to_peer(model).eval()
    matrices = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]  # read every step
    weight_bytes = sum(w.nbytes for w in matrices)
    n = math.isqrt(weight_bytes // 4)
    one_matrix = [torch.randn(n, n, device=device)]
    results: dict = {"weight_bytes_per_step": weight_bytes}
    for batch in (1, 8):
        prompt = torch.randint(0, model.config.vocab_size, (batch, preset.prompt_len), device=device)
        with autocast(device, dtype):  # compiles for this batch size; then the timed calls reuse the graph
            results[f"compile_s_batch{batch}"] = compile_decode_step(
                generate_tokens(model, prompt, preset.new_tokens, temperature=0, compile=True)
            )
        read_rate, model_read_rate = measure_read_rate(one_matrix), measure_read_rate(matrices)
        tokens_per_s, first_token_ms, identical = time_generation(model, peer, prompt, preset, device, dtype)
        results[f"decode_tokens_per_s_batch{batch}"] = tokens_per_s
        results[f"first_token_ms_batch{batch}"] = first_token_ms
        results[f"read_bytes_per_s_batch{batch}"] = read_rate
        results[f"model_matrices_read_bytes_per_s_batch{batch}"] = model_read_rate
        results[f"bandwidth_bound_tokens_per_s_batch{batch}"] = batch * read_rate / weight_bytes
        results[f"greedy_tokens_identical_batch{batch}"] = identical
    return results


def time_generation(
    model: GPT, peer, prompt: torch.Tensor, preset: Preset, device: torch.device, dtype: torch.dtype
) -> tuple[dict, dict, bool]:
    """Greedy generation of preset.new_tokens after prompt, ours with the decode step compiled (already)
    and eager and the peer's, timed alternately: tokens/s of the whole call and time to first token
    (ms), ours against the peer's, and whether all three gave the same tokens."""
    outputs = {}

    def ours(compile: bool) -> Callable[[], None]:
        def run() -> None:
            with autocast(device, dtype):
                outputs["compiled" if compile else "eager"] = generate(
                    model, prompt, preset.new_tokens, temperature=0, compile=compile
                )

        return run

    def theirs(new_tokens: int) -> torch.Tensor:
        with torch.inference_mode(), autocast(device, dtype):
            return peer.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
            )

    def our_first_token() -> None:
        with autocast(device, dtype):
            next(generate_tokens(model, prompt, preset.new_tokens, temperature=0))

    dt_compiled, dt_eager, dt_peer = median_times(
        [ours(compile=True), ours(compile=False), lambda: outputs.update(peer=theirs(preset.new_tokens))],
        preset.generate_repeats,
        device,
    )
    first_ours, first_peer = median_times(
        [our_first_token, lambda: theirs(1)], preset.generate_repeats, device
    )
    tokens = prompt.size(0) * preset.new_tokens
    tokens_per_s = {"ours": tokens / dt_compiled, "ours_eager": tokens / dt_eager, "peer": tokens / dt_peer}
    first_token_ms = {"ours": 1000 * first_ours, "peer": 1000 * first_peer}
    identical = all(torch.equal(outputs[key], outputs["peer"]) for key in ("compiled", "eager"))
    return tokens_per_s, first_token_ms, identical


def bench_kv_cache(model: GPT, preset: Preset, device: torch.device, dtype: torch.dtype) -> dict:
    """Our greedy generation tokens/s with the decode step compiled, eager, and without a KV cache,
    at batch 1 and 8, from one token as sample.py starts; and how many tokens at batch 1 pay for the
    compile (what sample.py's default rule weighs)."""
    results: dict = {"no_cache_model": asdict(model.config)}
    for batch in (1, 8):
        prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)

        def cached(compile: bool) -> Callable[[], None]:
            def run() -> None:
                with autocast(device, dtype):
                    generate(model, prompt, preset.no_cache_tokens, temperature=0, compile=compile)

            return run

        def uncached() -> None:
            with torch.inference_mode(), autocast(device, dtype):
                generate_without_cache(model, prompt, preset.no_cache_tokens)

        with autocast(device, dtype):
            compile_s = compile_decode_step(
                generate_tokens(model, prompt, preset.no_cache_tokens, temperature=0, compile=True)
            )
        dt_compiled, dt_eager, dt_uncached = median_times(
            [cached(compile=True), cached(compile=False), uncached], preset.no_cache_repeats, device
        )
        new_tokens = batch * preset.no_cache_tokens
        results[f"kv_cache_tokens_per_s_batch{batch}"] = {
            "compiled": new_tokens / dt_compiled,
            "eager": new_tokens / dt_eager,
            "no_cache": new_tokens / dt_uncached,
        }
        if batch == 1:
            saved_per_token = (dt_eager - dt_compiled) / preset.no_cache_tokens
            results["compile_s"] = compile_s
            results["compile_pays_after_tokens"] = (
                compile_s / saved_per_token if saved_per_token > 0 else None
            )
    return results


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
        row(
            f"{name} (MiB)",
            *(r[key] / 2**20 if r[key] is not None else None for r in (lora, full)),
            fmt="{:,.2f}",
        )


def bench_multiple_choice(
    model: GPT, n_examples: int, context_len: int, choice_len: int, device: torch.device, dtype: torch.dtype
) -> dict:
    """eval.py's multiple-choice scorer in examples/s, choices batched 32 to a forward pass against
    one choice per pass, on random examples of 4 choices, cut to the model's block_size as the scorer
    cuts them. All rows are equally long, so the batches carry no padding."""
    model.eval()
    generator = torch.Generator().manual_seed(0)

    def random_ids(n: int) -> list[int]:
        return torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist()

    rows = [(random_ids(context_len), random_ids(choice_len)) for _ in range(4 * n_examples)]
    continuation_logprobs(model, rows[:4], 4, device, autocast(device, dtype))  # warm-up
    results = {"row_tokens": min(context_len + choice_len, model.config.block_size + 1)}
    for name, batch_size in (("batched", 32), ("one_at_a_time", 1)):
        seconds = timed(
            lambda: continuation_logprobs(model, rows, batch_size, device, autocast(device, dtype)), device
        )
        results[name] = n_examples / seconds
    return results


def row(name: str, *values: float | None, fmt: str = "{:,.0f}") -> None:
    """A table's row: the values in columns, then the first over the second."""
    cells = "".join(f" {fmt.format(v) if v is not None else 'n/a':>12}" for v in values)
    ratio = f"{values[0] / values[1]:.2f}x" if values[0] and values[1] else ""
    print(f"{name:<44}{cells} {ratio:>9}")


def pair(r: dict, key: str, a: str = "ours", b: str = "peer") -> tuple:
    return r[key][a], r[key][b]


def print_table(r: dict, preset: Preset) -> None:
    """The results as tables: ours against transformers', then ours alone (print_ours)."""
    mib = {k: v / 2**20 if v is not None else None for k, v in r["train_peak_memory_bytes"].items()}
    print(f"\npeak matmul throughput ({r['dtype']}, measured): {r['peak_flops'] / 1e9:,.1f} GFLOP/s")
    print(f"{'':<44} {'ours':>12} {'transformers':>12} {'ours/them':>9}")
    row(f"train tokens/s (batch {preset.batch_size} x {preset.seq_len})", *pair(r, "train_tokens_per_s"))
    row("train MFU (of measured peak)", *(100 * v for v in pair(r, "mfu")), fmt="{:.1f}%")
    row("train step peak memory (MiB)", mib["ours"], mib["peer"])
    print_generation(r, preset)
    print_ours(r, preset)


def print_generation(r: dict, preset: Preset) -> None:
    """Generation, ours against transformers'."""
    for batch in (1, 8):
        decode = r[f"decode_tokens_per_s_batch{batch}"]
        bound = r[f"bandwidth_bound_tokens_per_s_batch{batch}"]
        row(f"decode tokens/s batch {batch}, compiled", decode["ours"], decode["peer"])
        row(f"decode tokens/s batch {batch}, eager", decode["ours_eager"], decode["peer"])
        row(
            f"  of the bandwidth bound ({bound:,.0f}), compiled",
            *(100 * decode[k] / bound for k in ("ours", "peer")),
            fmt="{:.0f}%",
        )
        row(
            f"time to first token batch {batch} (ms)", *pair(r, f"first_token_ms_batch{batch}"), fmt="{:,.1f}"
        )
    same = all(r[f"greedy_tokens_identical_batch{b}"] for b in (1, 8))
    print(
        f"decode: greedy, {preset.prompt_len}-token prompt + {preset.new_tokens}, tokens/s of the whole call"
    )
    print(
        f"greedy tokens identical, ours compiled and eager and transformers' (batch 1 and 8): "
        f"{'yes' if same else 'NO'}"
    )
    mb = r["weight_bytes_per_step"] / 1e6
    rates = ", ".join(f"{r[f'read_bytes_per_s_batch{b}'] / 1e9:.1f}" for b in (1, 8))
    print(
        f"bandwidth bound: batch x matrix-vector read rate over one {mb:.1f} MB matrix (measured before "
        f"batch 1 and 8: {rates} GB/s) / {mb:.1f} MB of matrices read per step"
    )
    model_rate = r["model_matrices_read_bytes_per_s_batch1"]
    print(
        f"the model's own matrices, one matrix-vector product each, alone: {model_rate / 1e9:.1f} GB/s, "
        f"{model_rate / r['weight_bytes_per_step']:,.0f} tokens/s at batch 1"
    )
    compile_s = ", ".join(f"{r[f'compile_s_batch{b}']:.1f}" for b in (1, 8))
    print(
        f"compiling the decode step, the first compiled call's first two tokens (batch 1, 8): {compile_s} s"
    )


def print_ours(r: dict, preset: Preset) -> None:
    """Our own comparisons: activation checkpointing, the Shakespeare model's decoding, multiple choice."""
    print("\nours, activation checkpointing (train.py --activation_checkpointing=True)")
    print(f"{'':<44} {'on':>12} {'off':>12} {'on/off':>9}")
    row("train tokens/s", *pair(r, "checkpointing_tokens_per_s", "on", "off"))
    on, off = (r["checkpointing_peak_memory_bytes"][k] for k in ("on", "off"))
    row("train step peak memory (MiB)", *(v / 2**20 if v is not None else None for v in (on, off)))
    shape = r["no_cache_model"]
    print(
        f"\nours, Shakespeare char model (n_layer {shape['n_layer']}, n_embd {shape['n_embd']}, "
        f"block_size {shape['block_size']}): {preset.no_cache_tokens} new tokens from one"
    )
    print(f"{'':<44} {'compiled':>12} {'eager':>12} {'no cache':>12} {'comp/eager':>9}")
    for batch in (1, 8):
        tokens_per_s = r[f"kv_cache_tokens_per_s_batch{batch}"]
        row(f"decode tokens/s batch {batch}", *(tokens_per_s[k] for k in ("compiled", "eager", "no_cache")))
    pays_after = r["compile_pays_after_tokens"]
    repaid = f"after {pays_after:,.0f} tokens" if pays_after else "never"
    print(
        f"compiling the decode step: {r['compile_s']:.1f} s at batch 1, repaid {repaid} "
        f"(sample.py compiles by default from {COMPILE_MIN_TOKENS:,})"
    )
    print("\nours, multiple-choice scoring (eval.py), 4 choices per example, random tokens")
    print(f"{'':<44} {'batched 32':>12} {'one by one':>12} {'ratio':>9}")
    for key, name in (
        ("choice_examples_per_s", r["preset"]),
        ("choice_examples_per_s_shakespeare", "Shakespeare"),
    ):
        rows = r[key]["row_tokens"]
        row(
            f"examples/s, {name} ({rows}-token rows)",
            *pair(r, key, "batched", "one_at_a_time"),
            fmt="{:,.1f}",
        )


def main(argv: list[str] | None = None) -> None:
    exit_on_error(lambda: bench(argv))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) or a torch device")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default="auto",
        help="float32, or autocast to a 16-bit type (auto: as train.py chooses)",
    )
    parser.add_argument(
        "--out_dir", default=None, help="a Shakespeare checkpoint for the KV cache comparison"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--options",
        action="store_true",
        help="only: our training speed with each model option on against all off",
    )
    parser.add_argument(
        "--generation",
        action="store_true",
        help="only: generation at batch 1 and 8, ours compiled and eager against transformers'",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="only: memory of a training step, LoRA (rank 16) against full fine-tuning",
    )
    parser.add_argument(
        "--speculative",
        nargs=2,
        metavar=("MODEL_DIR", "DRAFT_DIR"),
        help="only: MODEL_DIR's checkpoint decoding plainly, with DRAFT_DIR's as its draft, by prompt lookup",
    )
    parser.add_argument(
        "--chat_packing",
        metavar="DATA_DIR",
        help="only: rows of DATA_DIR's chat set packed against one conversation per row (block: seq_len)",
    )
    args = parser.parse_args(argv)
    # What would fail only at the end of minutes of measuring fails now.
    if args.out_dir:
        find_checkpoint(args.out_dir)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"--json {args.json}: its folder does not exist; create it or choose another path")
    return args


def bench_everything(model: GPT, preset: Preset, out_dir: str | None, device: torch.device, dtype) -> dict:
    """Every measurement but the speculative, options and generation-only ones."""
    results = {"peak_flops": measure_peak_flops(device, dtype, peak_matmul_size(preset, device))}
    results.update(bench_training(model, preset, device, dtype, results["peak_flops"]))
    results.update(bench_generation(model, preset, device, dtype))
    shakespeare = shakespeare_model(out_dir, device)
    results.update(bench_kv_cache(shakespeare, preset, device, dtype))
    # HellaSwag's rough size (an assumption: the set cannot be downloaded here): 64 + 32 GPT-2 tokens;
    # in characters, 256 + 96, which the Shakespeare model's 128-token context cuts to its last 129.
    n = preset.choice_examples
    results["choice_examples_per_s"] = bench_multiple_choice(model, n, 64, 32, device, dtype)
    results["choice_examples_per_s_shakespeare"] = bench_multiple_choice(
        shakespeare, n, 256, 96, device, dtype
    )
    return results


def run_chat_packing(data_dir: str, preset: Preset, device: torch.device, dtype: torch.dtype) -> dict:
    """--chat_packing: bench_chat_packing with the preset's model, rows of its seq_len, and a table."""
    shape = {k: v for k, v in preset.model.items() if k not in ("vocab_size", "block_size")}
    steps = 4 * preset.train_steps  # more rows than the timing needs: the fractions are averages
    packing = bench_chat_packing(
        Path(data_dir), shape, preset.seq_len, preset.batch_size, steps, device, dtype
    )
    print(f"rows of {preset.seq_len} positions  learned  real  conversations/row  learned tokens/s")
    for name, r in packing.items():
        print(
            f"{name:<28} {r['learned_fraction']:>6.1%} {r['real_fraction']:>6.1%} "
            f"{r['conversations_per_row']:>18.2f} {r['learned_tokens_per_s']:>17,.0f}"
        )
    return packing


def bench(argv: list[str] | None) -> None:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # their generate warns about settings we chose on purpose
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    preset = PRESETS[args.preset]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**preset.model)).to(device)
    results: dict = {
        "preset": args.preset,
        "machine": machine_name(device),
        "device": device.type,
        "dtype": dtype_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "model": asdict(model.config),
        "params": model.get_num_params(),
    }
    print(
        f"machine: {results['machine']} | torch {torch.__version__} | transformers {transformers.__version__}"
        f" | {results['threads']} threads | {device.type} {dtype_name}"
    )
    print(f"preset {args.preset}: {model.get_num_params() / 1e6:.1f}M params, {preset.model}")

    if args.chat_packing:
        results["chat_packing"] = run_chat_packing(args.chat_packing, preset, device, dtype)
    elif args.speculative:
        results["speculative"] = bench_speculative(*args.speculative, preset, device, dtype)
    elif args.lora:
        results["lora_memory"] = bench_lora(preset, device, dtype)
        print_lora(results["lora_memory"], preset)
    elif args.options:
        results["option_tokens_per_s"] = bench_options(preset, device, dtype)
    elif args.generation:
        results.update(bench_generation(model, preset, device, dtype))
        print(f"{'':<44} {'ours':>12} {'transformers':>12} {'ours/them':>9}")
        print_generation(results, preset)
    else:
        results.update(bench_everything(model, preset, args.out_dir, device, dtype))
        print_table(results, preset)
    if args.json:
        text = json.dumps(results, indent=2) + "\n"
        atomic_write(args.json, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
