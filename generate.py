"""Generation from a GPT: sampling (temperature, top-k, top-p), the decode loop over a KV cache (prefill
once, then one token per step), the compiled decode step and when it pays, the cache's size (whether it
fits: memory.py). Apart from model.py, which holds the network only: sample.py and bench.py share it."""

import itertools
import time
from collections.abc import Callable, Iterator

import torch

from model import GPT, GPTConfig, KVCache
from runtime import UserError

# Tokens per sample from which should_compile compiles the decode step by default: where the compile
# repays itself for the main job's model on a 2-core CPU. Measured quietly: a compile of 3.6-8 s against
# ~0.85 ms saved a token (~740 -> ~2,000 tokens/s), repaid after 4,000-9,500 tokens. The first compile on
# a machine, with torch's compile cache cold, takes several times longer.
COMPILE_MIN_TOKENS = 10_000


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit (B, vocab) outside the top_k, and outside the nucleus: the smallest set
    of most likely tokens whose probabilities sum to at least top_p."""
    if top_k is not None and top_k < logits.size(-1):  # top_k >= vocab keeps all: skip a topk per token
        kth_best = torch.topk(logits, top_k).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = mass_before >= top_p  # those before it already reach top_p
        drop_sorted[:, 0] = False  # the most likely token always stays, even if top_p rounds to 0 in float32
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probabilities(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor | None:
    """The distribution (rows, vocab) sampling draws each row of logits (rows, vocab) from: the softmax of
    the filtered logits over temperature. None for temperature 0, greedy (argmax)."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or a float32 zero: the limit is greedy
        return None
    logits = logits.float()  # less the row's maximum: a tiny temperature then gives -inf, never inf - inf
    logits = filter_logits((logits - logits.amax(dim=-1, keepdim=True)) / temperature, top_k, top_p)
    return torch.softmax(logits, dim=-1)


def sample_next_token(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """One token per row of logits (B, vocab) -> (B, 1). temperature 0 is greedy (argmax)."""
    probs = probabilities(logits, temperature, top_k, top_p)
    return logits.argmax(dim=-1, keepdim=True) if probs is None else torch.multinomial(probs, num_samples=1)


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield max_new_tokens new tokens (B, 1), one per step, continuing the prompts idx (B, T).
    The prompt is prefilled into a KV cache once, eagerly; then each step feeds only the newest token
    at a position tensor: a step of one shape from the first token to the last, which compile=True
    runs compiled (compiled_forward). Context never exceeds block_size: a longer prompt keeps its last
    block_size tokens, and when the positions reach block_size the context restarts from the most
    recent block_size // 2 tokens, re-prefilled, so every token is predicted from between
    block_size // 2 and block_size tokens of context. A sliding-window model's cache holds only its
    window, a rolling buffer: up to block_size its tokens are exactly those of a full forward."""
    B, T = idx.shape
    if T == 0:
        raise ValueError("generation needs at least one prompt token (e.g. an end-of-text token)")
    block_size = model.config.block_size
    pos = min(T, block_size)  # the position of the next token fed
    context_len = min(block_size, pos + max_new_tokens)
    cache = KVCache(model.config.n_layer, kv_cache_length(model.config, T, max_new_tokens), idx.device)
    context = torch.empty(B, context_len, dtype=torch.long, device=idx.device)  # tokens at 0..pos-1
    context[:, :pos] = idx[:, -pos:]
    logits, _ = model(context[:, :pos], cache=cache)
    decode = compiled_forward(model) if compile else model
    if compile:
        mark_static(cache)
    position = torch.tensor([pos], device=idx.device)  # pos, as the decode step takes it
    for step in range(max_new_tokens):
        next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p)  # (B, 1)
        yield next_token
        if step == max_new_tokens - 1:
            break
        if pos == block_size:  # context full: restart it from the most recent tokens
            keep = max(1, block_size // 2)
            context[:, : keep - 1] = context[:, pos - keep + 1 : pos].clone()
            context[:, keep - 1] = next_token[:, 0]
            logits, _ = model(context[:, :keep], cache=cache)
            pos = keep
        else:
            context[:, pos] = next_token[:, 0]
            logits, _ = decode(next_token, cache=cache, pos=position.fill_(pos))
            pos += 1


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """The prompts idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens).
    sampling: generate_tokens' temperature (0 is greedy), top_k, top_p and compile; see generate_tokens
    for how context beyond block_size is handled."""
    return torch.cat([idx, *generate_tokens(model, idx, max_new_tokens, **sampling)], dim=1)


def kv_cache_length(config: GPTConfig, prompt_len: int, max_new_tokens: int, proposed: int = 0) -> int:
    """Slots in generate_tokens' KV cache: the positions the generation reaches, at most block_size
    (no more: a long-context model would otherwise reserve its whole context), and at most the
    sliding window, whose cache is a rolling buffer. A speculative decoder writes up to `proposed`
    positions ahead: a rolling buffer keeps that many more, so none of them overwrites the window."""
    context_len = min(config.block_size, prompt_len + max_new_tokens)
    return min(context_len, (config.sliding_window or context_len) + proposed)


def should_compile(requested: bool | None, max_new_tokens: int) -> bool:
    """Compile the decode step if requested; by default (None) from COMPILE_MIN_TOKENS tokens on."""
    return requested if requested is not None else max_new_tokens >= COMPILE_MIN_TOKENS


def compiled_forward(model: GPT) -> Callable[..., tuple[torch.Tensor, None]]:
    """model.forward under torch.compile, for the decode steps: their shapes never change, so one graph
    serves every position of every generation with the same batch size and cache length. On CUDA
    it replays as a CUDA graph (triton.cudagraphs, what mode="reduce-overhead" sets): one launch
    per token instead of hundreds. Without size_asserts, the run-time check of every library
    kernel's output shape, a debugging aid, goes: 6-8% of a Shakespeare-model step on CPU. Not
    fullgraph=True: past torch's limit of graphs per function (8), a new shape runs eagerly
    instead of failing. Made once per model, kept on it."""
    if getattr(model, "_compiled_forward", None) is None:
        # CUDA graphs: GPU only, checked by tests/gpu_check.py (compiled sampling gives eager's text)
        options = {"triton.cudagraphs": model.rope_cos.is_cuda, "size_asserts": False}
        model._compiled_forward = torch.compile(model.forward, options=options)
    return model._compiled_forward


def mark_static(cache: KVCache) -> None:
    """Give the compiler the cache's buffers as fixed addresses: CUDA graphs write in place only to those."""
    for buffer in [*cache.k, *cache.v, cache.held]:
        if buffer is not None:  # allocated by the first forward that stores in the cache
            torch._dynamo.mark_static_address(buffer)


def compile_decode_step(steps: Iterator[torch.Tensor]) -> float:
    """Compile the decode step for this batch and cache length by taking two tokens from steps, a
    compiled generation, and dropping it; the seconds it took. A failed compile (no C++ compiler, say)
    is a UserError."""
    started = time.perf_counter()
    try:
        for token in itertools.islice(steps, 2):
            token.cpu()  # waits for the device
    except torch._dynamo.exc.TorchDynamoException as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"compiling the decode step failed ({reason}); run with --compile=False") from None
    finally:
        steps.close()
    return time.perf_counter() - started
