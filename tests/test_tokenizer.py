"""tokenizer.py: the character and tiktoken tokenizers round-trip text and stream bytes."""

import subprocess
import sys
from pathlib import Path

import pytest

from tokenizer import Tokenizer, get_tokenizer, tokenizer_entry_from_meta

REPO = Path(__file__).resolve().parents[1]


def test_char_tokenizer_names_the_characters_it_lacks():
    tokenizer = get_tokenizer({"tokenizer": "char", "chars": list("\n abc")})
    assert tokenizer.decode(tokenizer.encode("cab a\n")) == "cab a\n"
    assert tokenizer.eot_token is None and tokenizer.vocab_size == 5
    with pytest.raises(ValueError, match="2 character.*'z' 'é'"):
        tokenizer.encode("zébab")


def test_bpe_decode_bytes_splits_characters_for_streaming():
    tokenizer = get_tokenizer({"tokenizer": "tiktoken", "encoding": "gpt2"})
    assert (tokenizer.vocab_size, tokenizer.eot_token) == (50257, 50256)
    assert tokenizer.encode("<|endoftext|>") == [50256]
    text = "naïve 🙂 日本語"
    ids = tokenizer.encode(text)
    assert b"".join(tokenizer.decode_bytes([i]) for i in ids) == text.encode("utf-8")
    assert any(not _is_utf8(tokenizer.decode_bytes([i])) for i in ids)  # some tokens hold part of a character


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_a_checkpoint_records_the_tokenizer_entries_of_meta_json_only():
    meta = {
        "tokenizer": "char",
        "chars": ["a"],
        "vocab_size": 1,
        "dtype": "uint16",
        "train_tokens": 9,
        "val_tokens": 1,
    }
    assert tokenizer_entry_from_meta(meta) == {"tokenizer": "char", "chars": ["a"], "vocab_size": 1}


STREAM_TEXT = "naïve café — ✓ 日本語 🙂 and plain ASCII."


def hf_tokenizer(directory, backend) -> Tokenizer:
    """Our "hf" tokenizer for a `tokenizers` object, saved as a Hugging Face tokenizer folder."""
    transformers = pytest.importorskip("transformers")
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(directory)
    return get_tokenizer({"tokenizer": "hf", "path": str(directory)})


def test_hf_byte_level_bpe_decode_bytes_streams_characters_split_across_tokens(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    # The 256 bytes and a few merges: multi-byte characters stay split.
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=264, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([STREAM_TEXT] * 3, trainer)
    tokenizer = hf_tokenizer(tmp_path, backend)
    ids = tokenizer.encode(STREAM_TEXT)
    pieces = [tokenizer.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == STREAM_TEXT.encode("utf-8")
    assert any(not _is_utf8(piece) for piece in pieces)  # some tokens hold part of a character


def test_hf_sentencepiece_byte_fallback_decode_bytes_streams_bytes_and_spaces(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    # As Llama 2's, TinyLlama's, Mistral's tokenizer.json: "▁" for a space, <0xNN> for bytes outside it.
    vocab = {"<unk>": 0, "▁": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    vocab.update({piece: len(vocab) + n for n, piece in enumerate(["a", "▁a", "n", "d"])})
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.Prepend("▁"), tokenizers.normalizers.Replace(" ", "▁")]
    )
    decoders = tokenizers.decoders
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = hf_tokenizer(tmp_path, backend)
    text = "a and 🙂 d"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode_bytes([i]) for i in ids]
    assert tokenizer.decode(ids) == text
    assert b"".join(pieces) == b" " + text.encode("utf-8")  # continuing a text: its first space kept
    assert b"\xf0" in pieces  # the emoji is four byte tokens


def test_gpt2_saved_as_hf_tokenizer_encodes_every_text_like_tiktoken(tmp_path, shakespeare_input):
    transformers = pytest.importorskip("transformers")
    ours = get_tokenizer({"tokenizer": "tiktoken", "encoding": "gpt2"})
    ours.save_hf(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tricky = "it's  I'll\n\n\n  x\t\ty 1234567 <|endoftext|>naïve 🙂 日本語\r\n trailing   "
    for text in (shakespeare_input.read_text(encoding="utf-8"), tricky):
        ids = ours.encode(text)
        assert theirs.encode(text) == ids and theirs.decode(ids) == text
    assert theirs.eos_token_id == theirs.bos_token_id == 50256


def test_a_tokenizer_folder_without_tokenizer_files_is_named_in_one_line(tmp_path, shakespeare_input):
    pytest.importorskip("transformers")
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "data/shakespeare/prepare.py"), "--input", str(shakespeare_input),
         "--tokenizer", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "holds no tokenizer" in result.stderr
