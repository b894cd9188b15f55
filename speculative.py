"""Speculative decoding: a cheap proposer guesses the next k tokens, the model checks them all in one
forward pass over its KV cache, keeps the longest prefix it agrees with and adds one token of its own.
A step that verifies k + 1 positions costs about one decode step (both read every weight once), so each
accepted proposal is a token for free. It is exact:
- greedy: a proposal is kept while it is the model's own argmax, so the output is plain greedy's;
- sampling: proposal d, drawn with probability q(d), is kept with probability min(1, p(d) / q(d)); the
  first one refused is replaced by a draw from the residual max(0, p - q), normalised, and when all k
  are kept a last token is drawn from p. Every token then follows p, the model's own (filtered)
  distribution (Leviathan et al. and Chen et al., 2023).

Proposers: a smaller draft model with the same tokenizer (Draft), or prompt lookup (PromptLookup): the
tokens that followed the latest earlier occurrence of the context's last n-gram, no model at all, a
proposal of probability 1. Rejected tokens need no rollback: the KV cache masks the positions past the
one it is at (model.KVCache). One sequence at a time: rows would keep different numbers of tokens.
"""

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from generate import compiled_forward, kv_cache_length, mark_static, probabilities
from model import GPT, KVCache
from runtime import ConfigError, UserError

MAX_DRAFT_TOKENS = 32  # a verification longer than this costs more than a decode step, even on a GPU


@dataclass
class Stats:
    proposed: int = 0  # tokens proposed
    accepted: int = 0  # proposed tokens kept
    steps: int = 0  # the model's forward passes after the prefill, each one verification
    tokens: int = 0  # tokens generated

    def summary(self) -> str:
        rate = self.accepted / self.proposed if self.proposed else 0.0
        per_step = self.tokens / self.steps if self.steps else 0.0
        return f"acceptance {rate:.0%} of {self.proposed} proposed, {per_step:.2f} tokens per model step"


class Draft:
    """Proposals from a smaller model, decoded one token at a time over its own KV cache."""

    def __init__(self, draft: GPT, cache_length: int, compile: bool):
        self.draft, self.cache_length, self.compile = draft, cache_length, compile
        self.step = compiled_forward(draft) if compile else draft
        self.cache, self.fed = KVCache(draft.config.n_layer, cache_length, draft.rope_cos.device), 0

    def restart(self, context: torch.Tensor, pos: int) -> None:
        """context[0, :pos] is the history from here on (a start, or a restart past block_size)."""
        prefill(self.draft, self.cache, context, pos, self.compile)
        self.fed = pos - 1  # positions below this are in the cache

    def propose(self, context: torch.Tensor, pos: int, k: int, sampling: tuple) -> tuple[list[int], list]:
        """k tokens for positions pos.., and the distributions they were drawn from (None: greedy)."""
        position = torch.zeros(1, dtype=torch.long, device=context.device)
        for p in range(self.fed, pos):  # the tokens kept since the last proposal: one, or two
            logits = self.step(context[:, p : p + 1], cache=self.cache, pos=position.fill_(p))[0]
        tokens, dists = [], []
        for i in range(k):
            dist = probabilities(logits[0, -1:], *sampling)  # (1, vocab), or None for greedy
            tokens.append(logits[0, -1].argmax() if dist is None else torch.multinomial(dist[0], 1)[0])
            dists.append(None if dist is None else dist[0])
            if i < k - 1:
                logits = self.step(tokens[-1].view(1, 1), cache=self.cache, pos=position.fill_(pos + i))[0]
        self.fed = pos + k - 1
        return [int(t) for t in tokens], dists

    def kept(self, pos: int, n: int) -> None:
        """n of the proposals for positions pos.. were kept: the cache is good up to position pos + n - 1."""
        self.fed = min(self.fed, pos + n)


class PromptLookup:
    """Proposals copied from the context: what followed the latest earlier occurrence of its last n
    tokens, for the longest n up to max_ngram that occurs; the last token repeated if none does."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram

    def restart(self, context: torch.Tensor, pos: int) -> None:
        pass

    def propose(self, context: torch.Tensor, pos: int, k: int, sampling: tuple) -> tuple[list[int], list]:
        history = context[0, :pos]
        for n in range(min(self.max_ngram, pos - 1), 0, -1):
            # Earlier windows of n tokens, each with a token after it: starts 0 .. pos - n - 1.
            starts = (history[: pos - 1].unfold(0, n, 1) == history[pos - n :]).all(dim=1).nonzero()
            if len(starts):
                follow = history[int(starts[-1]) + n :][:k].tolist()
                return follow + follow[-1:] * (k - len(follow)), [None] * k
        return [int(history[-1])] * k, [None] * k

    def kept(self, pos: int, n: int) -> None:
        pass


def verify(logits: torch.Tensor, proposal: list[int], dists: list, sampling: tuple) -> list[int]:
    """The tokens to keep: the accepted prefix of proposal, then one of the model's. logits (k + 1,
    vocab) are the model's at the proposal's positions and one past them; dists are the proposer's
    distributions (None: the proposal had probability 1)."""
    p = probabilities(logits, *sampling)  # (k + 1, vocab), or None for greedy
    if p is None:
        best = logits.argmax(dim=-1).tolist()
        n = next((i for i, token in enumerate(proposal) if token != best[i]), len(proposal))
        return proposal[:n] + [best[n]]
    for i, (token, q) in enumerate(zip(proposal, dists)):
        q_token = 1.0 if q is None else float(q[token])
        if float(torch.rand(())) * q_token < float(p[i, token]):  # kept with probability min(1, p / q)
            continue
        residual = p[i].clone()
        if q is None:
            residual[token] = 0.0
        else:
            residual = (residual - q).clamp(min=0.0)
        total = float(residual.sum())
        return proposal[:i] + [int(torch.multinomial(residual / total if total > 0 else p[i], 1))]
    return proposal + [int(torch.multinomial(p[-1], 1))]


@torch.inference_mode()
def speculative_tokens(
    model: GPT,
    proposer: Draft | PromptLookup,
    idx: torch.Tensor,
    max_new_tokens: int,
    k: int,
    sampling: tuple = (1.0, None, None),
    compile: bool = False,
    stats: Stats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield max_new_tokens tokens (1, 1) continuing the prompt idx (1, T), as generate.generate_tokens
    would (sampling: its temperature, top_k and top_p; the same context rule past block_size), k
    proposed per verification. The verification of k + 1 positions runs compiled with compile=True."""
    if idx.size(0) != 1:
        raise ValueError("speculative decoding continues one prompt at a time (batch 1)")
    stats = Stats() if stats is None else stats
    block_size = model.config.block_size
    pos = min(idx.size(1), block_size)  # tokens so far; the last, at pos - 1, not yet fed to the model
    context = torch.empty(1, block_size + 1, dtype=torch.long, device=idx.device)
    context[:, :pos] = idx[:, -pos:]
    cache = KVCache(model.config.n_layer, kv_cache_length(model.config, pos, max_new_tokens, k), idx.device)
    step = compiled_forward(model) if compile else model
    position = torch.zeros(1, dtype=torch.long, device=idx.device)
    prefill(model, cache, context, pos, compile)
    proposer.restart(context, pos)
    while stats.tokens < max_new_tokens:
        if pos == block_size + 1:  # the last token cannot be fed: restart from the most recent tokens
            keep = max(1, block_size // 2)
            context[:, :keep] = context[:, pos - keep : pos].clone()
            pos = keep
            prefill(model, cache, context, pos, compile)
            proposer.restart(context, pos)
        n = min(k, block_size - pos, max_new_tokens - stats.tokens - 1)  # tokens to propose
        proposal, dists = proposer.propose(context, pos, n, sampling) if n else ([], [])
        fed = torch.tensor([context[0, pos - 1].item(), *proposal], device=idx.device)[None]
        forward = step if n == k and cache.k[0] is not None else model  # one compiled shape: k + 1
        logits = forward(fed, cache=cache, pos=position.fill_(pos - 1))[0][0]  # (n + 1, vocab)
        kept = verify(logits, proposal, dists, sampling)
        proposer.kept(pos, len(kept) - 1)
        stats.steps += 1
        stats.proposed += n
        stats.accepted += len(kept) - 1
        for token in kept:
            context[0, pos] = token
            pos, stats.tokens = pos + 1, stats.tokens + 1
            yield context[:, pos - 1 : pos].clone()


def prefill(model: GPT, cache: KVCache, context: torch.Tensor, pos: int, compile: bool) -> None:
    """Fill cache with the tokens context[0, :pos] but the last (the next step feeds that one)."""
    if pos > 1:
        model(context[:, : pos - 1], cache=cache)
    if compile:
        mark_static(cache)


def check_draft(model: GPT, draft: GPT, same_tokenizer: bool, k: int, context_needed: int) -> None:
    """Refuse a draft that cannot propose for model, and k out of range; warn of a draft larger than it."""
    if not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ConfigError(f"draft_tokens must be in 1..{MAX_DRAFT_TOKENS}, got {k}")
    if draft is None:
        return
    if not same_tokenizer or draft.config.vocab_size != model.config.vocab_size:
        raise UserError(
            "the draft model has another tokenizer or vocabulary than the model (vocabularies of "
            f"{draft.config.vocab_size:,} and {model.config.vocab_size:,}): a draft must share its tokenizer"
        )
    if draft.config.block_size < context_needed:
        raise UserError(
            f"the draft model's context (block_size {draft.config.block_size}) is shorter than the "
            f"{context_needed} positions this request reaches: use a draft trained with a longer context"
        )
    if draft.get_num_params() >= model.get_num_params():
        print(
            f"warning: the draft ({draft.get_num_params() / 1e6:.1f}M parameters) is not smaller than the "
            f"model ({model.get_num_params() / 1e6:.1f}M): speculative decoding will be slower than plain",
            file=sys.stderr,
        )
