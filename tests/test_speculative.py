"""Speculative decoding (speculative.py, sample.py --draft / --prompt_lookup): greedy output equals plain
greedy decoding token for token, the accept/reject rule keeps the model's own distribution, and bad
requests are refused in one line. Tiny models; the trained pair learns character bigrams in seconds."""

import pytest
import torch
import torch.nn.functional as F
from conftest import context_sensitive_model, random_model
from test_sample import save_tiny_checkpoint

import sample
from generate import generate, kv_cache_length
from model import GPT, GPTConfig
from speculative import Draft, PromptLookup, Stats, speculative_tokens, verify

GREEDY = (0.0, None, None)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained_pair(shakespeare_input) -> tuple[GPT, GPT, list[str]]:
    """A model and a smaller draft trained briefly on Tiny Shakespeare characters, and the vocabulary."""
    text = shakespeare_input.read_text(encoding="utf-8")[:200_000]
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    models = []
    for n_layer, n_embd in ((2, 48), (1, 24)):
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=len(chars), block_size=32, n_layer=n_layer, n_head=2, n_embd=n_embd)
        model = GPT(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(120):
            starts = torch.randint(0, len(data) - 33, (16,))
            window = torch.stack([data[s : s + 33] for s in starts])
            _, loss = model(window[:, :-1], window[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        models.append(model.eval())
    return models[0], models[1], chars


def speculative(model: GPT, proposer, prompt: torch.Tensor, n: int, k: int, sampling=GREEDY, **kw):
    stats = Stats()
    tokens = torch.cat(
        list(speculative_tokens(model, proposer, prompt, n, k, sampling, stats=stats, **kw)), 1
    )
    return tokens, stats


def proposers(model: GPT, draft: GPT, prompt_len: int, n: int, k: int) -> dict:
    return {
        "draft": Draft(draft, kv_cache_length(draft.config, prompt_len, n, k), compile=False),
        "model as its own draft": Draft(
            model, kv_cache_length(model.config, prompt_len, n, k), compile=False
        ),
        "prompt lookup": PromptLookup(3),
    }


@pytest.mark.parametrize("window", [None, 6], ids=["full attention", "sliding window"])
@pytest.mark.parametrize("prompt_len", [1, 5, 30], ids=["one-token prompt", "short prompt", "long prompt"])
def test_greedy_speculative_output_equals_plain_greedy_for_random_models(window, prompt_len):
    config = GPTConfig(vocab_size=32, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    config.sliding_window = window
    model = context_sensitive_model(config, seed=1)
    draft = context_sensitive_model(
        GPTConfig(**{**vars(config), "n_layer": 1, "n_head": 2, "n_kv_head": 1}), seed=2
    )
    prompt = torch.randint(0, 32, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    n = 70  # past block_size 24: the context restarts from its last half, as in plain decoding
    plain = generate(model, prompt, n, temperature=0)[:, -n:]
    for k in (1, 4):
        for name, proposer in proposers(model, draft, prompt_len, n, k).items():
            tokens, stats = speculative(model, proposer, prompt, n, k)
            assert torch.equal(tokens, plain), (k, name)
            assert stats.tokens == n and stats.steps < n
            if name == "model as its own draft":
                assert stats.accepted == stats.proposed  # it always agrees with itself


def test_greedy_speculative_output_equals_plain_greedy_for_trained_models(trained_pair):
    model, draft, chars = trained_pair
    prompt = torch.tensor([[chars.index(c) for c in "ROMEO:\nWhat say"]])
    n = 100
    plain = generate(model, prompt, n, temperature=0)[:, -n:]
    for name, proposer in proposers(model, draft, prompt.size(1), n, 4).items():
        tokens, stats = speculative(model, proposer, prompt, n, 4)
        assert torch.equal(tokens, plain), name
        assert stats.accepted > 0  # trained on the same text, draft and model agree on common bigrams


def test_compiled_verification_gives_the_eager_tokens(trained_pair):
    model, draft, chars = trained_pair
    prompt = torch.tensor([[chars.index(c) for c in "KING:"]])
    eager, _ = speculative(model, Draft(draft, 32, compile=False), prompt, 40, 3)
    compiled, _ = speculative(model, Draft(draft, 32, compile=True), prompt, 40, 3, compile=True)
    assert torch.equal(compiled, eager)


def chi_squared(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum().detach())


# chi-squared with 7 degrees of freedom exceeds 24.32 with probability 0.001
CHI2_7_DOF_P001 = 24.32


@pytest.mark.parametrize("proposer", ["draft", "prompt lookup"])
def test_the_accept_reject_rule_draws_from_the_models_distribution(proposer):
    """The first token kept after one proposal, over many draws, follows p, whatever q proposes."""
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(2, 8) * 1.5, torch.randn(8) * 1.5
    p = torch.softmax(p_logits[0], dim=-1)
    q = torch.softmax(q_logits, dim=-1)
    counts = torch.zeros(8)
    for _ in range(4_000):
        proposed = int(torch.multinomial(q, 1)) if proposer == "draft" else 3  # lookup: always token 3
        kept = verify(p_logits, [proposed], [q if proposer == "draft" else None], (1.0, None, None))
        counts[kept[0]] += 1
    assert chi_squared(counts, p) < CHI2_7_DOF_P001


def test_a_draft_equal_to_the_model_is_never_refused():
    torch.manual_seed(0)
    logits = torch.randn(4, 8)
    p = torch.softmax(logits, dim=-1)
    for _ in range(200):
        proposal = [int(torch.multinomial(p[i], 1)) for i in range(3)]
        assert verify(logits, proposal, list(p[:3]), (1.0, None, None))[:3] == proposal


def test_sampled_speculative_tokens_follow_the_models_first_token_distribution():
    """End to end, temperature 0.8 and top_k 6: the first new token's frequencies match the model's own
    filtered softmax (whose draws the proposals must not change)."""
    config = GPTConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model, draft = random_model(config, seed=4), random_model(config, seed=5)
    with torch.no_grad():
        for m in (model, draft):
            m.lm_head.weight.mul_(40)  # logits of a few units: a distribution far from uniform
    prompt = torch.tensor([[1, 2, 3]])
    logits, _ = model(prompt)
    kept = logits[0, -1].topk(6).indices
    probs = torch.zeros(8)
    probs[kept] = F.softmax(logits[0, -1, kept] / 0.8, dim=-1)
    counts = torch.zeros(8)
    torch.manual_seed(0)
    for _ in range(800):
        tokens, _ = speculative(model, Draft(draft, 16, False), prompt, 2, 1, sampling=(0.8, 6, None))
        counts[tokens[0, 0]] += 1
    assert counts[probs == 0].sum() == 0  # never a token outside the top 6
    present = probs > 0
    stat = chi_squared(counts[present], probs[present])
    assert stat < 20.52  # chi-squared with 5 degrees of freedom: p = 0.001


@pytest.fixture(scope="module")
def trained_dirs(trained_pair, tmp_path_factory):
    model, draft, chars = trained_pair
    meta = {"tokenizer": "char", "chars": chars, "vocab_size": len(chars)}
    root = tmp_path_factory.mktemp("speculative")
    return save_tiny_checkpoint(root / "model", model, meta), save_tiny_checkpoint(
        root / "draft", draft, meta
    )


def run_sample(capsys, *flags: str) -> tuple[str, str]:
    with pytest.raises(SystemExit) as exit_info:
        sample.main(list(flags))
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_sample_py_speculative_prints_the_plain_text_and_the_acceptance(capsys, trained_dirs):
    model_dir, draft_dir = trained_dirs
    common = (f"--out_dir={model_dir}", "--start=ROMEO:", "--max_new_tokens=80", "--temperature=0")
    plain, _ = run_sample(capsys, *common)
    for flag in (f"--draft={draft_dir}", "--prompt_lookup=3"):
        out, err = run_sample(capsys, *common, flag, "--draft_tokens=3")
        assert out == plain
        assert "acceptance" in err and "tokens per model step" in err


@pytest.mark.parametrize(
    "flags, code, message",
    [
        (["--prompt_lookup=3", "--draft_tokens=0"], 2, "draft_tokens must be in 1..32"),
        (["--prompt_lookup=3", "--draft_tokens=1000"], 2, "draft_tokens must be in 1..32"),
        (["--prompt_lookup=-1"], 2, "prompt_lookup must not be negative"),
        (["--prompt_lookup=3", "--num_samples=2"], 2, "one sample at a time"),
        (["--prompt_lookup=3", "--draft=DRAFT"], 2, "set one of them"),
        (["--draft=OTHER_VOCAB"], 1, "another tokenizer or vocabulary"),
        (["--draft=SHORT_CONTEXT"], 1, "shorter than the"),
    ],
)
def test_bad_speculative_requests_are_refused_in_one_line(
    capsys, trained_dirs, tmp_path, flags, code, message
):
    model_dir, draft_dir = trained_dirs
    other_vocab = GPT(GPTConfig(vocab_size=70, block_size=32, n_layer=1, n_head=2, n_embd=16))
    chars = [chr(32 + i) for i in range(70)]
    save_tiny_checkpoint(
        tmp_path / "other", other_vocab, {"tokenizer": "char", "chars": chars, "vocab_size": 70}
    )
    meta = torch.load(draft_dir / "ckpt.pt", weights_only=True)["tokenizer"]
    short = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=8, n_layer=1, n_head=2, n_embd=16))
    save_tiny_checkpoint(tmp_path / "short", short, meta)
    paths = {
        "DRAFT": str(draft_dir),
        "OTHER_VOCAB": str(tmp_path / "other"),
        "SHORT_CONTEXT": str(tmp_path / "short"),
    }
    flags = [flag.split("=")[0] + "=" + paths.get(flag.split("=")[1], flag.split("=")[1]) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        sample.main([f"--out_dir={model_dir}", "--max_new_tokens=20", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_a_draft_larger_than_the_model_is_warned_about(capsys, trained_dirs):
    model_dir, draft_dir = trained_dirs
    _, err = run_sample(capsys, f"--out_dir={draft_dir}", f"--draft={model_dir}", "--max_new_tokens=5")
    assert "warning: the draft" in err and "not smaller than the model" in err


def test_acceptance_is_reported_as_a_fraction_of_proposals():
    stats = Stats(proposed=8, accepted=6, steps=4, tokens=10)
    assert stats.summary() == "acceptance 75% of 8 proposed, 2.50 tokens per model step"
