"""model.py against transformers' Llama, and the invariants generation relies on."""

import pytest
import torch
from conftest import context_sensitive_model, random_model

from bench import generate_without_cache
from generate import filter_logits, generate, kv_cache_length, sample_next_token
from model import GPT, GPTConfig, KVCache, rope_tables
from optim import make_optimizers

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides) -> GPTConfig:
    args = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    args.update(overrides)
    return GPTConfig(**args)


# Every option on: QK-norm, q/k/v biases, Llama 3 RoPE scaling, a window shorter than the sequences
# the tests run, a head size of its own (4 heads of 12 in a 32-wide model), GQA.
EVERY_OPTION = dict(
    qk_norm=True,
    attn_bias=True,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    sliding_window=5,
    head_dim=12,
)


def to_llama(model: GPT) -> "transformers.LlamaForCausalLM":
    cfg = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    q_size, kv_size = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.tok_embeddings.weight)
        hf.lm_head.weight.copy_(model.lm_head.weight)
        hf.model.norm.weight.copy_(model.norm.weight)
        for ours, theirs in zip(model.layers, hf.model.layers):
            q, k, v = ours.attn.wqkv.weight.split([q_size, kv_size, kv_size])
            gate, up = ours.mlp.gate_up.weight.chunk(2)
            for dst, src in [
                (theirs.self_attn.q_proj, q),
                (theirs.self_attn.k_proj, k),
                (theirs.self_attn.v_proj, v),
                (theirs.self_attn.o_proj, ours.attn.wo.weight),
                (theirs.mlp.gate_proj, gate),
                (theirs.mlp.up_proj, up),
                (theirs.mlp.down_proj, ours.mlp.down.weight),
                (theirs.input_layernorm, ours.attn_norm.weight),
                (theirs.post_attention_layernorm, ours.mlp_norm.weight),
            ]:
                dst.weight.copy_(src)
    return hf


def all_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits at every position (B, T, vocab): passing targets makes forward return them all."""
    logits, _ = model(idx, targets=torch.zeros_like(idx))
    return logits


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_logits_match_transformers_llama(n_kv_head, tie_embeddings):
    config = tiny_config(n_kv_head=n_kv_head, tie_embeddings=tie_embeddings, rope_theta=500.0, norm_eps=1e-6)
    model = random_model(config, seed=n_kv_head)
    hf = to_llama(model)
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    with torch.no_grad():
        ours = all_logits(model, idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_logits_match_transformers_with_explicit_mlp_size_and_mqa():
    config = tiny_config(n_layer=3, n_head=6, n_kv_head=1, n_embd=48, intermediate_size=80)
    model = random_model(config, seed=7)
    idx = torch.randint(0, config.vocab_size, (3, 20))
    with torch.no_grad():
        assert (all_logits(model, idx) - to_llama(model)(idx).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("options", [{}, EVERY_OPTION], ids=["plain", "every-option"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_cached_decode_matches_full_forward(batch_size, options):
    config = tiny_config(**options)  # every-option: the window of 5 is shorter than the 7-token prompt
    model = random_model(config)
    idx = torch.randint(0, config.vocab_size, (batch_size, config.block_size))
    prompt_len = 7
    cache = KVCache(config.n_layer, kv_cache_length(config, prompt_len, config.block_size), idx.device)
    assert cache.length == (5 if options else config.block_size)  # a sliding window: a rolling buffer
    with torch.no_grad():
        full = all_logits(model, idx)
        logits, _ = model(idx[:, :prompt_len], cache=cache)
        assert (logits[:, -1] - full[:, prompt_len - 1]).abs().max().item() < 1e-5
        for pos in range(prompt_len, config.block_size):  # the rolling buffer wraps 5 times
            logits, _ = model(idx[:, pos : pos + 1], cache=cache, pos=torch.tensor([pos]))
            assert (logits[:, -1] - full[:, pos]).abs().max().item() < 1e-5


@pytest.mark.parametrize("options", [{}, EVERY_OPTION], ids=["plain", "every-option"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_generate_with_cache_equals_repeated_full_forwards(batch_size, options):
    config = tiny_config(**options)  # every-option: a 6-token prompt is longer than the window of 5
    model = context_sensitive_model(config, seed=1)
    prompt = torch.randint(0, config.vocab_size, (batch_size, 6))
    with torch.no_grad():
        expected = generate_without_cache(model, prompt, config.block_size - 6)  # a full forward per token
    assert torch.equal(generate(model, prompt, config.block_size - 6, temperature=0), expected)


def greedy_with_restarting_context(model: GPT, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding by a full forward per token over the context generate_tokens documents: the
    prompt's last block_size tokens and, once block_size is reached, the most recent block_size // 2."""
    block_size = model.config.block_size
    context, new_tokens = prompt[:, -block_size:], []
    for _ in range(max_new_tokens):
        new_tokens.append(all_logits(model, context)[:, -1:].argmax(dim=-1))  # (B, 1)
        if context.size(1) == block_size:
            context = context[:, block_size - block_size // 2 + 1 :]
        context = torch.cat([context, new_tokens[-1]], dim=1)
    return torch.cat([prompt, *new_tokens], dim=1)


@pytest.mark.parametrize("options", [{}, EVERY_OPTION], ids=["plain", "every-option"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_generate_past_block_size_restarts_from_the_last_half_block(batch_size, options):
    config = tiny_config(block_size=16, **options)
    model = context_sensitive_model(config, seed=2)
    prompt = torch.randint(0, config.vocab_size, (batch_size, 20))  # longer than the context: last 16 kept
    out = generate(model, prompt, 40, temperature=0)  # restarts at 16 positions, three times
    with torch.no_grad():
        expected = greedy_with_restarting_context(model, prompt, 40)
    assert out.shape == (batch_size, 60) and torch.equal(out, expected)


@pytest.mark.parametrize("options", [{}, EVERY_OPTION], ids=["plain", "every-option"])
def test_compiled_decode_gives_eager_tokens_with_one_graph(options):
    config = tiny_config(block_size=16, **options)
    model = context_sensitive_model(config, seed=3)
    prompt = torch.randint(0, config.vocab_size, (3, 5))
    eager = generate(model, prompt, 30, temperature=0)  # past block_size: re-prefills run eagerly between
    counters = torch._dynamo.utils.counters  # torch's own tallies: graphs compiled, graph breaks
    counters.clear()
    assert torch.equal(generate(model, prompt, 30, temperature=0, compile=True), eager)
    assert torch.equal(generate(model, prompt, 30, temperature=0, compile=True), eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_changing_a_token_never_changes_earlier_logits():
    config = tiny_config()
    model = random_model(config, seed=3)
    idx = torch.randint(0, config.vocab_size, (1, config.block_size))
    with torch.no_grad():
        before = all_logits(model, idx)
        for t in (0, 7, config.block_size - 1):
            changed = idx.clone()
            changed[0, t] = (changed[0, t] + 1) % config.vocab_size
            after = all_logits(model, changed)
            assert torch.equal(after[:, :t], before[:, :t])
            assert not torch.allclose(after[:, t], before[:, t])


def test_sliding_window_hides_keys_w_or_more_positions_back():
    config = tiny_config(n_layer=1, sliding_window=4)  # one layer: nothing relays older tokens forward
    model = random_model(config, seed=5)
    idx = torch.randint(0, config.vocab_size, (1, config.block_size))
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % config.vocab_size
    with torch.no_grad():
        moved = (all_logits(model, changed) - all_logits(model, idx)).abs().amax(dim=-1)[0]
    assert moved[:10].max() == 0 and moved[10:14].min() > 0 and moved[14:].max() == 0


def test_llama3_rope_scaling_stretches_long_wavelengths_only():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (_, sin), (_, scaled_sin) = rope_tables(64, 2, 10000.0), rope_tables(64, 2, 10000.0, scaling)
    angle, scaled = sin[1, :32].asin(), scaled_sin[1, :32].asin()  # position 1: the frequencies themselves
    wavelength = 2 * torch.pi / angle
    short, long = wavelength < 64 / 4, wavelength > 64 / 1
    assert short.any() and long.any() and (~short & ~long).any()  # all three bands are there
    torch.testing.assert_close(scaled[short], angle[short])
    torch.testing.assert_close(scaled[long], angle[long] / 8)
    between = ~short & ~long
    assert ((scaled[between] < angle[between]) & (scaled[between] > angle[between] / 8)).all()


def test_top_k_one_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    for _ in range(5):
        assert torch.equal(
            sample_next_token(logits, temperature=1.3, top_k=1), logits.argmax(-1, keepdim=True)
        )
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1, keepdim=True))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.25, 0.2]])
    logits = probs.log()

    def kept(p: float) -> list[int]:
        return (filter_logits(logits, top_p=p) > float("-inf"))[0].nonzero().flatten().tolist()

    assert kept(0.39) == [1]  # the top token alone reaches it
    assert kept(0.41) == [1, 3]  # 0.4 + 0.25
    assert kept(0.64) == [1, 3]
    assert kept(0.66) == [1, 3, 4]  # 0.4 + 0.25 + 0.2
    assert kept(0.96) == [0, 1, 2, 3, 4]
    assert kept(1.0) == [0, 1, 2, 3, 4]
    # Sampling never leaves the nucleus, and reaches all of it.
    torch.manual_seed(0)
    samples = sample_next_token(logits.expand(200, -1), top_p=0.5)
    assert set(samples.flatten().tolist()) == {1, 3}


def test_fixed_seed_gives_the_same_sample():
    config = tiny_config()
    model = random_model(config, seed=4)
    prompt = torch.randint(0, config.vocab_size, (2, 4))
    runs = []
    for seed in (123, 123, 124):
        torch.manual_seed(seed)
        runs.append(generate(model, prompt, 20, temperature=1.0, top_k=20, top_p=0.9))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    config = tiny_config(n_layer=2, n_embd=64, n_head=4, n_kv_head=1, block_size=16)
    model = GPT(config)
    (optimizer,) = make_optimizers(model, 0.0, 3e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, config.vocab_size, (4, 16))
    y = torch.roll(x, -1, dims=1)
    for step in range(300):  # noqa: B007 (the message below reports it)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step + 1} steps"


def test_targets_of_minus_one_are_ignored():
    config = tiny_config()
    model = random_model(config)
    x = torch.randint(0, config.vocab_size, (2, 10))
    y = torch.randint(0, config.vocab_size, (2, 10))
    y_masked = y.clone()
    y_masked[:, 5:] = -1
    _, loss_masked = model(x, y_masked)
    logits, _ = model(x, y)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :5].reshape(-1, config.vocab_size), y[:, :5].reshape(-1)
    )
    assert torch.allclose(loss_masked, expected)


def test_bf16_autocast_on_cpu_runs():
    config = tiny_config()
    model = random_model(config)
    x = torch.randint(0, config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, x)
        generated = generate(model, x[:, :4], 5, temperature=0)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert generated.shape == (2, 9)


@pytest.mark.parametrize(
    "overrides, names",
    [
        (dict(n_embd=30, n_head=4), ["n_embd", "30", "n_head", "4"]),
        (dict(n_head=4, n_kv_head=3), ["n_head", "4", "n_kv_head", "3"]),
        (dict(n_embd=36, n_head=4, n_kv_head=4), ["n_embd", "n_head", "9", "even"]),
        (dict(n_layer=0), ["n_layer", "0"]),
        (dict(dropout=1.0), ["dropout"]),
        (dict(head_dim=7), ["head_dim", "7", "even"]),
        (dict(sliding_window=0), ["sliding_window", "0"]),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["rope_scaling", "llama3", "yarn"]),
    ],
)
def test_bad_config_raises_value_error_naming_fields(overrides, names):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    for name in names:
        assert name in str(error.value)


def test_mlp_size_is_derived_llama_style():
    assert GPTConfig(n_embd=768, n_head=12).intermediate_size == 2048
    assert GPTConfig(n_embd=4096, n_head=32, multiple_of=256).intermediate_size == 11008  # Llama 7B
    assert GPTConfig(n_embd=64, n_head=4, intermediate_size=100).intermediate_size == 100


def test_weight_decay_only_on_matrices_and_init_scales_residual_projections():
    config = tiny_config(n_layer=8, n_embd=128)
    model = GPT(config)
    decay, no_decay = make_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")[0].param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert abs(model.layers[0].attn.wqkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].attn.wo.weight.std().item() - 0.02 / 4) < 0.001  # 1/sqrt(2 * 8)


def test_options_off_add_no_weights_and_on_add_only_their_own():
    plain = set(GPT(tiny_config()).state_dict())
    assert not any(name.endswith(("bias", "q_norm.weight", "k_norm.weight")) for name in plain)
    every = set(GPT(tiny_config(**EVERY_OPTION)).state_dict())
    assert every - plain == {
        f"layers.{i}.attn.{name}"
        for i in range(2)
        for name in ("wqkv.bias", "q_norm.weight", "k_norm.weight")
    }


def test_num_params_counts_a_tied_weight_once():
    tied, untied = GPT(tiny_config()), GPT(tiny_config(tie_embeddings=False))
    embedding = 97 * 32
    assert untied.get_num_params() == tied.get_num_params() + embedding
    assert untied.get_num_params(non_embedding=True) == tied.get_num_params(non_embedding=True)


def test_loss_accepts_non_contiguous_targets_and_generate_rejects_empty_prompts():
    model = random_model(tiny_config())
    tokens = torch.randint(0, 97, (2, 17))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])  # a slice: not contiguous
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate(model, tokens[:, :0], 3)
