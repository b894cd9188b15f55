"""The README's fine-tuning flow end to end, offline: a randomly initialised Qwen3 saved by transformers with
a tokenizer trained here -> convert.py import (then the source folder is deleted) ->
data/shakespeare/prepare.py --tokenizer -> train.py --init_from -> sample.py -> convert.py export, which
transformers loads back."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

import convert
import sample
import train
from checkpoint import CKPT_NAME, load_checkpoint, model_from_checkpoint
from generate import generate
from tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def run_cli(main, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0


@pytest.mark.slow
def test_imported_qwen3_fine_tunes_on_text_prepared_with_its_tokenizer_then_samples_and_exports(
    tmp_path, shakespeare_input, capsys
):
    text = shakespeare_input.read_text(encoding="utf-8")
    hf_dir = tmp_path / "qwen3"
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())  # byte-level BPE, as Qwen's
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([text[:100_000]], trainer)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    hf_tokenizer.save_pretrained(hf_dir)
    config = transformers.Qwen3Config(
        vocab_size=len(hf_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # 4 heads of 32 in a 64-wide model
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(hf_dir)

    out_qwen3, data_dir, out_ft = tmp_path / "out-qwen3", tmp_path / "data", tmp_path / "out-ft"
    run_cli(convert.main, ["import", str(hf_dir), str(out_qwen3), "--block_size=64"])
    shutil.rmtree(hf_dir)  # the imported out_dir holds the tokenizer's files: it no longer needs hf_dir
    run_cli(sample.main, [f"--out_dir={out_qwen3}", "--start=ROMEO:", "--max_new_tokens=4"])
    prepare = [sys.executable, REPO_ROOT / "data/shakespeare/prepare.py", "--input", shakespeare_input]
    subprocess.run(
        [*prepare, "--tokenizer", out_qwen3, "--out_dir", data_dir], check=True, capture_output=True
    )
    meta = json.loads((data_dir / "meta.json").read_text())
    assert (meta["tokenizer"], meta["path"], meta["vocab_size"]) == (
        "hf",
        str((out_qwen3 / "tokenizer").resolve()),
        512,
    )
    train_ids = np.fromfile(data_dir / "train.bin", dtype=meta["dtype"])
    assert train_ids[:200].tolist() == hf_tokenizer.encode(text[:2000])[:200]

    flags = ["--batch_size=4", "--gradient_accumulation_steps=1", "--max_iters=20", "--eval_interval=20"]
    flags += ["--eval_iters=2", "--log_interval=1", "--learning_rate=3e-3", "--warmup_iters=2"]
    flags += ["--eval_full=False", "--compile=False", "--always_save_checkpoint=True"]
    run_cli(train.main, [f"--init_from={out_qwen3}", f"--data_dir={data_dir}", f"--out_dir={out_ft}", *flags])
    records = [json.loads(line) for line in (out_ft / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    checkpoint = load_checkpoint(out_ft / CKPT_NAME)
    assert checkpoint["model_args"]["qk_norm"] and checkpoint["model_args"]["head_dim"] == 32
    assert checkpoint["tokenizer"] == {k: meta[k] for k in ("tokenizer", "path", "vocab_size")}

    capsys.readouterr()
    run_cli(sample.main, [f"--out_dir={out_ft}", "--start=ROMEO:", "--max_new_tokens=20", "--temperature=0"])
    model = model_from_checkpoint(checkpoint).eval()
    prompt = hf_tokenizer.encode("ROMEO:")
    new_ids = generate(model, torch.tensor([prompt]), 20, temperature=0)[0, len(prompt) :].tolist()
    streamed = get_tokenizer(checkpoint["tokenizer"]).decode_bytes(new_ids).decode("utf-8", errors="replace")
    assert capsys.readouterr().out == "ROMEO:" + streamed + "\n"

    run_cli(convert.main, ["export", str(out_ft), str(tmp_path / "hf-ft")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-ft", torch_dtype=torch.float32)
    assert type(theirs).__name__ == "Qwen3ForCausalLM"
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf-ft")
    assert exported_tokenizer.encode(text[:500]) == hf_tokenizer.encode(text[:500])
    idx = torch.tensor([train_ids[:64].tolist()])
    with torch.no_grad():
        ours = model(idx, targets=idx)[0]
        torch.testing.assert_close(ours, theirs.eval()(idx).logits, atol=1e-4, rtol=0)
