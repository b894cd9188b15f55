"""A Llama-class decoder-only transformer in one file.

Token embedding -> n_layer pre-norm blocks (RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual) -> RMSNorm -> LM head. No biases by default.

Options of today's open models, each off by default (GPTConfig): QK-norm (Qwen3), q/k/v biases (Qwen2),
Llama 3.1 RoPE scaling, sliding-window attention (Mistral), a head size of its own (Qwen3).

The rotary embedding uses the "rotate half" layout of Hugging Face's Llama, so weights map one to one
to `LlamaForCausalLM` (q/k projections included) and logits match it.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    block_size: int = 1024  # trained context length; also the length of the RoPE tables
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # key/value heads: None = n_head (MHA), 1 = MQA, between = GQA
    n_embd: int = 768
    head_dim: int | None = None  # size of each head; None = n_embd // n_head (Qwen3 sets its own)
    intermediate_size: int | None = None  # SwiGLU hidden size; None derives it Llama-style
    multiple_of: int = 64  # the derived hidden size is rounded up to a multiple of this
    rope_theta: float = 10000.0
    # None, or Llama 3.1's {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}: longer context than trained
    rope_scaling: dict | None = None
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3, OLMo 2)
    attn_bias: bool = False  # biases on the q, k and v projections, not the output one (Qwen2)
    sliding_window: int | None = None  # a query attends to the W most recent positions, itself included
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # share the token embedding with the LM head
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        head_size = f"head_dim {self.head_dim}"
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
            head_size = f"head size n_embd / n_head = {self.n_embd} / {self.n_head} = {self.head_dim}"
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"{head_size} must be even and positive for rotary embeddings")
        scaling = self.rope_scaling
        if scaling is not None and (
            scaling.keys() != {"rope_type", *LLAMA3_SCALING_KEYS} or scaling["rope_type"] != "llama3"
        ):
            raise ValueError(
                f"rope_scaling must be None or hold rope_type 'llama3' and {', '.join(LLAMA3_SCALING_KEYS)}; "
                f"got {scaling}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be None or at least 1, got {self.sliding_window}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.intermediate_size is None:
            # Llama: 2/3 of the usual 4x width keeps SwiGLU's three matrices at the cost of two.
            hidden = int(2 * 4 * self.n_embd / 3)
            self.intermediate_size = self.multiple_of * math.ceil(hidden / self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: the mean of squares loses too much in bf16.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(
    head_dim: int, length: int, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions 0..length-1, each (length, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, *(scaling[key] for key in LLAMA3_SCALING_KEYS))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (length, head_dim): both halves share a frequency
    return angles.cos(), angles.sin()


def llama3_frequencies(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: frequencies whose wavelength exceeds original / low_freq_factor are
    divided by factor, those shorter than original / high_freq_factor are kept, and the band between
    moves smoothly from one to the other."""
    wavelength = 2 * math.pi / inv_freq
    band = high_freq_factor - low_freq_factor
    # 0 at the long-wavelength edge of the band, 1 at the short one, clamped outside it
    smooth = ((original_max_position_embeddings / wavelength - low_freq_factor) / band).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + head_dim/2]) by their position's angle. x: (B, T, heads, head_dim),
    cos and sin: (T, 1, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


class KVCache:
    """Keys and values of every layer for one generation, in buffers of one shape from the first token
    to the last. Position p is written in place at slot p % length, and decoded tokens attend to all
    slots under a mask: a decode step never changes shape, so one compiled graph serves them all.
    A sliding-window model's cache can be as short as its window W, a rolling buffer: a slot is
    overwritten `length` positions later, when its key has left the window of every query to come.
    The cache records the position each slot holds, so tokens written past the current position (a
    speculative proposal that was rejected) are masked until overwritten: rolling back is free."""

    def __init__(self, n_layer: int, length: int, device: torch.device):
        self.length = length
        self.k: list[torch.Tensor | None] = [None] * n_layer  # each (B, n_kv_head, length, head_dim)
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.held = torch.full((length,), -1, device=device)  # the position in each slot; -1: none yet
        self.slots = self.held[:0]  # the slots of the current forward's tokens
        self.decoding = False  # the current forward's tokens attend to the cache, not only to each other

    def begin(self, positions: torch.Tensor, decoding: bool, window: int | None) -> torch.Tensor | None:
        """Start a forward over the tokens at positions (T,). A prefill (decoding False) keeps the last
        `length` of them and returns None; decoding returns the mask (T, length) of the slots each token
        attends to: those holding a position at or before its own (and within the window)."""
        kept = positions[-self.length :]
        self.slots, self.decoding = kept % self.length, decoding
        self.held.index_copy_(0, self.slots, kept)
        if not decoding:
            return None
        held, query = self.held[None, :], positions[:, None]
        visible = (held >= 0) & (held <= query)
        return visible if window is None else visible & (held > query - window)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the keys and values k, v (B, n_kv_head, T, head_dim) of this forward's kept tokens to
        their slots, in place."""
        if self.k[layer] is None:  # allocated on first use, so it takes the dtype autocast gave k and v
            B, n_kv_head, _, head_dim = k.shape
            self.k[layer] = k.new_zeros(B, n_kv_head, self.length, head_dim)
            self.v[layer] = v.new_zeros(B, n_kv_head, self.length, head_dim)
        kept = -self.slots.size(0)
        self.k[layer].index_copy_(2, self.slots, k[:, :, kept:])
        self.v[layer].index_copy_(2, self.slots, v[:, :, kept:])


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.wqkv = nn.Linear(
            config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.attn_bias
        )
        self.wo = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # one gain of head size for all query heads, one for all key heads
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope_cos, rope_sin, mask=None, cache: KVCache | None = None):
        """With a cache, the keys and values of x's tokens are stored in it (see KVCache.begin)."""
        B, T, _ = x.shape
        n_qk = self.n_head + self.n_kv_head
        qkv = self.wqkv(x).view(B, T, n_qk + self.n_kv_head, self.head_dim)
        qk = qkv[:, :, :n_qk]  # (B, T, n_head + n_kv_head, head_dim)
        if self.qk_norm:
            q, k = qk.split((self.n_head, self.n_kv_head), dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
        # q and k are neighbours in the fused projection: rotate both in one pass. Back to v's dtype:
        # under autocast the float32 norm gains make q and k float32, and the KV cache takes k's dtype.
        qk = apply_rope(qk, rope_cos, rope_sin).to(qkv.dtype)
        q = qk[:, :, : self.n_head].transpose(1, 2)  # (B, n_head, T, head_dim)
        k = qk[:, :, self.n_head :].transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = qkv[:, :, n_qk:].transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        if cache is not None:
            cache.store(self.layer_idx, k, v)
            if cache.decoding:  # decoded tokens attend to the whole cache, under the cache's mask
                k, v = cache.k[self.layer_idx], cache.v[self.layer_idx]  # (B, n_kv_head, length, head_dim)
        # Causal for T > 1 (training, or a prefill from position 0) unless a sliding-window mask is given;
        # decoded tokens see the slots their mask allows. enable_gqa: each K/V head serves its query group.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=T > 1 and mask is None,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.wo(y))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up computed by one matmul."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # each (B, T, intermediate_size)
        return self.dropout(self.down(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope_cos, rope_sin, mask=None, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), rope_cos, rope_sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, zero_init_out_proj: bool = False):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # Computed once; not saved in checkpoints since they follow from the config.
        rope_cos, rope_sin = rope_tables(
            config.head_dim, config.block_size, config.rope_theta, config.rope_scaling
        )
        self.register_buffer("rope_cos", rope_cos, persistent=False)  # (block_size, head_dim)
        self.register_buffer("rope_sin", rope_sin, persistent=False)
        self.activation_checkpointing = False  # a way to run, not part of the architecture: train.py sets it
        self.apply(self._init_weights)
        # GPT-2: shrink the projections that add into the residual stream, one pair per layer. Or, as
        # the speed runs do, start them at zero: each block begins as the identity.
        out_proj_std = 0.0 if zero_init_out_proj else 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.layers:
            for proj in (block.attn.wo, block.mlp.down):
                nn.init.normal_(proj.weight, mean=0.0, std=out_proj_std)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding: bool = False) -> int:
        """Parameter count. non_embedding leaves out the input embedding table, unless it is tied to the
        LM head (then it is a matmul weight too): the count that drives FLOPs."""
        n_params = sum(p.numel() for p in self.parameters())  # a tied weight is counted once
        if non_embedding and not self.config.tie_embeddings:
            n_params -= self.tok_embeddings.weight.numel()
        return n_params

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pos: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids. With targets (B, T): logits (B, T, vocab) and the cross-entropy over the
        targets that are not -1: their mean, or with reduction "sum" their sum (0 where there are none).
        Without: logits of the last position only (B, 1, vocab), loss None.
        segments (B, T), without a cache: which packed sequence (conversation) each position belongs to;
        a query then attends only to the keys of its own segment.
        With a cache, the keys and values of idx are stored in it: without pos, idx holds positions
        0..T-1 (a prefill); with pos, a (1,) tensor, idx continues the cached tokens from position pos
        on, each token attending to the cache, and the logits are those of every position (B, T, vocab):
        one decoded token, or a speculative proposal to verify. The caller keeps the positions below
        block_size (generate.py does)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        if pos is not None and cache is None:
            raise ValueError("pos is for decoding with a KV cache: the position of idx's first token")
        if segments is not None and cache is not None:
            raise ValueError("segments are for training and evaluation, not with a KV cache")
        x = self.tok_embeddings(idx)  # (B, T, n_embd)
        # A position tensor, not a Python int: a compiled decode step then has one graph for every position.
        positions = torch.arange(T, device=idx.device)  # (T,)
        positions = positions if pos is None else pos + positions
        rope_cos = self.rope_cos[positions, None]  # (T, 1, head_dim): broadcast over heads
        rope_sin = self.rope_sin[positions, None]
        mask = self.attention_mask(positions, cache, pos is not None, segments)
        for block in self.layers:
            if self.activation_checkpointing and self.training:  # keep only x; recompute the rest in backward
                x = checkpoint(block, x, rope_cos, rope_sin, mask, use_reentrant=False)
            else:
                x = block(x, rope_cos, rope_sin, mask, cache)
        x = self.norm(x)
        if targets is None:  # sampling needs the last position's logits only, unless it verifies a proposal
            return self.lm_head(x if pos is not None else x[:, -1:, :]), None
        logits = self.lm_head(x)  # (B, T, vocab)
        flat_logits = logits.view(-1, logits.size(-1)).float()
        # A sum over no targets is 0, where a mean would be NaN.
        loss = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=-1, reduction=reduction)
        return logits, loss

    def attention_mask(
        self, positions: torch.Tensor, cache: KVCache | None, decoding: bool, segments: torch.Tensor | None
    ) -> torch.Tensor | None:
        """True where a query attends to a key, or None for plain causal attention. positions (T,)."""
        W, T = self.config.sliding_window, positions.size(0)
        # The cache's slots and mask are computed once here rather than in every layer: a step is short.
        mask = None if cache is None else cache.begin(positions, decoding=decoding, window=W)
        if mask is None and W is not None and T > W:  # T <= W is plain causal attention
            # Query i sees key j iff i - W < j <= i: transformers' sliding_window_overlay (masking_utils),
            # which its Mistral, Qwen2 and Qwen3 use.
            back = positions[:, None] - positions
            mask = (back >= 0) & (back < W)  # (T, T)
        if segments is not None:
            # Causal within a query's own segment only. RoPE needs no reset at a segment's start: its
            # attention scores depend on relative positions alone, the same at any offset in the row.
            same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()  # (T, T)
            confined = (same & causal)[:, None]  # (B, 1, T, T): broadcast over heads
            mask = confined if mask is None else confined & mask
        return mask

    def param_groups(self, weight_decay: float, muon: bool) -> tuple[list[dict], list[dict]]:
        """AdamW's and Muon's parameter groups (optim.make_optimizers). AdamW decays matrices (embeddings,
        projections), not norm gains or biases. With muon, Muon takes the 2-D matrices inside the blocks,
        one group per way of splitting them: "parts", the row counts of the matrices fused into each
        (q|k|v, gate|up), or None for whole ones (wo, down)."""
        params = [p for p in self.parameters() if p.requires_grad]
        in_blocks = {id(p) for p in self.layers.parameters()}
        muon_params = [p for p in params if p.dim() == 2 and id(p) in in_blocks] if muon else []
        adamw_params = [p for p in params if id(p) not in {id(q) for q in muon_params}]
        adamw_groups = [
            {"params": [p for p in adamw_params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in adamw_params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # q, k, v (and gate, up) are orthogonalised apart, as if unfused: measured better than whole.
        cfg = self.config
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        parts_of = {id(b.attn.wqkv.weight): (q, kv, kv) for b in self.layers}
        parts_of |= {id(b.mlp.gate_up.weight): (cfg.intermediate_size,) * 2 for b in self.layers}
        muon_groups = [
            {"params": [p for p in muon_params if parts_of.get(id(p)) == parts], "parts": parts}
            for parts in dict.fromkeys(parts_of.get(id(p)) for p in muon_params)
        ]
        return adamw_groups, muon_groups

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward + backward FLOPs per token: 6 per matmul weight, plus attention over seq_len positions."""
        cfg = self.config
        T = seq_len or cfg.block_size
        attended = min(T, cfg.sliding_window or T)  # keys per query, at most
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * attended
        return 6 * self.get_num_params(non_embedding=True) + attention
