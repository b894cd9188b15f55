"""tokenizer.py: the character and tiktoken tokenizers round-trip text and stream bytes."""

import pytest

from tokenizer import get_tokenizer, tokenizer_entry


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
    assert tokenizer_entry(meta) == {"tokenizer": "char", "chars": ["a"], "vocab_size": 1}
