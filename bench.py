"""Speed of this project's Llama against transformers' LlamaForCausalLM: same config, same weights,
same machine, same run. Ours and the peer's measurements alternate, so background load slows both
alike; on a busy machine the ratios are the figures to trust, not the absolute numbers.

    python bench.py [--generation] [--device cuda --dtype bfloat16] [--json bench.json]

Measures: training tokens/s, MFU (of the matmul peak measured in the run) and step peak memory; greedy
generation at batch 1 and 8, ours compiled and eager: tokens/s, the share of the bandwidth bound (a
matrix-vector read rate measured in the run), time to first token, compile time, and that all give the
same tokens; on the README's Shakespeare model, decoding compiled, eager and without a KV cache (as
nanoGPT samples); eval.py's multiple-choice scoring, batched against one choice at a time. Our features
against themselves: bench_features.py.
"""

import argparse
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from checkpoint import find_checkpoint, load_model_and_tokenizer
from configurator import read_config_file
from generate import COMPILE_MIN_TOKENS, compile_decode_step, generate, generate_tokens, sample_next_token
from hf_mapping import hf_config, to_hf
from model import GPT, GPTConfig
from runtime import autocast, exit_on_error
from tasks import continuation_logprobs
from timing import (
    Preset,
    bench_arguments,
    check_json_path,
    measure_peak_flops,
    median_times,
    our_train_step,
    peak_matmul_size,
    random_batch,
    row,
    start,
    step_peak_memory,
    timed,
    write_json,
)

SHAKESPEARE_CONFIG = Path(__file__).parent / "configs" / "shakespeare_char.py"
SHAKESPEARE_VOCAB = 65  # distinct characters in Tiny Shakespeare


def to_peer(model: GPT):
    """transformers' LlamaForCausalLM holding a copy of our weights, mapped by hf_mapping.py."""
    from transformers import LlamaConfig, LlamaForCausalLM

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
        return load_model_and_tokenizer(out_dir, device, tokenizer="none")[0]
    values = read_config_file(str(SHAKESPEARE_CONFIG))
    shape = {key: value for key, value in values.items() if key in GPTConfig.__dataclass_fields__}
    return GPT(GPTConfig(vocab_size=SHAKESPEARE_VOCAB, **shape)).to(device).eval()


def bench_training(
    model: GPT, preset: Preset, device: torch.device, dtype: torch.dtype, peak_flops: float
) -> dict:
    """Training tokens/s, MFU and step peak memory, ours and the peer's: each model's forward + backward +
    AdamW step on the same random batch."""
    model.train()
    peer = to_peer(model).train()
    x = random_batch(preset, device)
    step_ours, optimizer = our_train_step(model, x, dtype)
    fused = optimizer.defaults["fused"]  # the same AdamW as ours: the comparison is of the models
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)

    def step_peer() -> None:
        with autocast(device, dtype):
            loss = peer(input_ids=x, labels=x).loss  # they shift the labels themselves
        loss.backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)

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

    def ours(compile: bool) -> None:
        with autocast(device, dtype):
            outputs["compiled" if compile else "eager"] = generate(
                model, prompt, preset.new_tokens, temperature=0, compile=compile
            )

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
        [lambda: ours(True), lambda: ours(False), lambda: outputs.update(peer=theirs(preset.new_tokens))],
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

        def cached(compile: bool) -> None:
            with autocast(device, dtype):
                generate(model, prompt, preset.no_cache_tokens, temperature=0, compile=compile)

        def uncached() -> None:
            with torch.inference_mode(), autocast(device, dtype):
                generate_without_cache(model, prompt, preset.no_cache_tokens)

        with autocast(device, dtype):
            compile_s = compile_decode_step(
                generate_tokens(model, prompt, preset.no_cache_tokens, temperature=0, compile=True)
            )
        dt_compiled, dt_eager, dt_uncached = median_times(
            [lambda: cached(True), lambda: cached(False), uncached], preset.no_cache_repeats, device
        )
        new_tokens = batch * preset.no_cache_tokens
        results[f"kv_cache_tokens_per_s_batch{batch}"] = {
            "compiled": new_tokens / dt_compiled,
            "eager": new_tokens / dt_eager,
            "no_cache": new_tokens / dt_uncached,
        }
        if batch == 1:
            saved_per_token = (dt_eager - dt_compiled) / preset.no_cache_tokens
            pays_after = compile_s / saved_per_token if saved_per_token > 0 else None
            results.update(compile_s=compile_s, compile_pays_after_tokens=pays_after)
    return results


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
        shares = (100 * decode[k] / bound for k in ("ours", "peer"))
        row(f"  of the bandwidth bound ({bound:,.0f}), compiled", *shares, fmt="{:.0f}%")
        first_token = pair(r, f"first_token_ms_batch{batch}")
        row(f"time to first token batch {batch} (ms)", *first_token, fmt="{:,.1f}")
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
        rows, speeds = r[key]["row_tokens"], pair(r, key, "batched", "one_at_a_time")
        row(f"examples/s, {name} ({rows}-token rows)", *speeds, fmt="{:,.1f}")


def main(argv: list[str] | None = None) -> None:
    exit_on_error(lambda: bench(argv))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_arguments(__doc__)
    parser.add_argument(
        "--out_dir", default=None, help="a Shakespeare checkpoint for the KV cache comparison"
    )
    parser.add_argument(
        "--generation",
        action="store_true",
        help="only: generation at batch 1 and 8, ours compiled and eager against transformers'",
    )
    args = parser.parse_args(argv)
    # What would fail only at the end of minutes of measuring fails now.
    if args.out_dir:
        find_checkpoint(args.out_dir)
    check_json_path(args.json)
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


def bench(argv: list[str] | None) -> None:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # their generate warns about settings we chose on purpose
    device, dtype, preset, model, results = start(args, {"transformers": transformers.__version__})
    if args.generation:
        results.update(bench_generation(model, preset, device, dtype))
        print(f"{'':<44} {'ours':>12} {'transformers':>12} {'ours/them':>9}")
        print_generation(results, preset)
    else:
        results.update(bench_everything(model, preset, args.out_dir, device, dtype))
        print_table(results, preset)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
