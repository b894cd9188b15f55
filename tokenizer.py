"""Tokenizers: text to token ids and back, as recorded in a data set's meta.json and in checkpoints.

get_tokenizer(meta)    the tokenizer meta describes: "char" (the characters of the training text),
                       "tiktoken" (a named encoding, e.g. gpt2) or "hf" (a Hugging Face tokenizer folder)

Each one also saves itself as a Hugging Face tokenizer (save_hf), built offline with the `tokenizers`
library, so that an exported model folder is complete for transformers.
"""

import json
import shutil
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import tiktoken

from runtime import UserError

# The meta.json entries that describe a tokenizer; the rest describe the token files.
TOKENIZER_KEYS = ("tokenizer", "chars", "encoding", "eot_token", "path", "vocab_size", "chat_template")


def tokenizer_entry_from_meta(meta: dict) -> dict:
    """What a checkpoint records of its data set's meta.json: the tokenizer, not the token files."""
    return {key: meta[key] for key in TOKENIZER_KEYS if key in meta}


class Tokenizer:
    """Maps text to token ids and back; get_tokenizer(meta) builds the one a data set was made with."""

    vocab_size: int
    eot_token: int | None  # end-of-text id between documents; None where the vocabulary has none
    bos_token: int | None  # the id a document starts with, where the vocabulary has one (export notes it)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ids. An id past the vocabulary (a model's padding: GPT-2's 50,257 ids padded to
        50,304) stands for nothing; an untrained model samples them."""
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """UTF-8 bytes of ids; a BPE token can end mid-character, so streams decode these incrementally."""
        raise NotImplementedError

    def save_hf(self, directory: Path) -> None:
        """Write files that AutoTokenizer.from_pretrained(directory) loads as this tokenizer."""
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    def __init__(self, chars: list[str]):
        self.itos = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.eot_token = self.bos_token = None

    def encode(self, text: str) -> list[int]:
        missing = set(text) - self.stoi.keys()
        if missing:
            shown = " ".join(repr(ch) for ch in sorted(missing)[:20])
            raise ValueError(
                f"{len(missing)} character(s) not in the vocabulary of the training text: {shown}"
            )
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids if i < self.vocab_size)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def save_hf(self, directory: Path) -> None:
        tokenizers = import_tokenizers()
        backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(self.stoi, unk_token=None))
        # Every character on its own ("\n" included), looked up whole; decoded by joining them.
        any_char = tokenizers.Regex(r"[\s\S]")
        backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(any_char, behavior="isolated")
        backend.decoder = tokenizers.decoders.Fuse()
        # An end-of-text token just past the characters: tools such as lm-eval need one to exist; it is
        # special, so no text encodes to it, and the model never sees its id.
        backend.add_special_tokens(["<|endoftext|>"])
        write_hf_tokenizer(directory, backend, {"eos_token": "<|endoftext|>"})


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding: str):
        self.enc = load_tiktoken(encoding)
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.bos_token = self.enc.eot_token  # GPT-2: <|endoftext|> starts documents too

    def encode(self, text: str) -> list[int]:
        # a user may type "<|endoftext|>" in a prompt to mean a document boundary
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([i for i in ids if i < self.vocab_size])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes([i for i in ids if i < self.vocab_size])

    def save_hf(self, directory: Path) -> None:
        """A byte-level BPE tokenizer.json from tiktoken's own ranks and split pattern (no download)."""
        tokenizers = import_tokenizers()
        # tiktoken has no public accessor for these; they are the encoding's definition.
        ranks, pattern, special = self.enc._mergeable_ranks, self.enc._pat_str, self.enc._special_tokens
        as_text = byte_to_unicode()

        def text(token: bytes) -> str:
            return "".join(as_text[b] for b in token)

        # tiktoken merges the adjacent pair whose joined token has the lowest rank: as BPE merges, each
        # split of a token into two tokens, ranked by the joined token's rank.
        merges = sorted(
            (rank, ranks[token[:i]], text(token[:i]), text(token[i:]))
            for token, rank in ranks.items()
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        )
        vocab = {**{text(token): rank for token, rank in ranks.items()}, **special}
        # ignore_merges: a piece that is a token as a whole is that token, as tiktoken looks it up first.
        model = tokenizers.models.BPE(vocab, [m[2:] for m in merges], ignore_merges=True)
        backend = tokenizers.Tokenizer(model)
        backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
            [
                tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
                tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = tokenizers.decoders.ByteLevel()
        backend.add_special_tokens(list(special))
        eot = self.enc.decode([self.eot_token])
        write_hf_tokenizer(directory, backend, {"bos_token": eot, "eos_token": eot})


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet, which byte-level BPE vocabularies (GPT-2, Llama 3, Qwen) are written
    in: printable bytes stand for themselves, the other 68 for the characters from U+0100 on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise UserError(
            "writing a Hugging Face tokenizer needs the tokenizers library: pip install tokenizers"
        ) from e
    return tokenizers


def write_hf_tokenizer(directory: Path, backend, special_tokens: dict[str, str] | None = None) -> None:
    """tokenizer.json and a tokenizer_config.json naming the generic fast tokenizer class, which every
    transformers version since 4 loads; clean-up off, as it would change spaces before punctuation."""
    backend.save(str(Path(directory) / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    text = json.dumps({**config, **(special_tokens or {})}, indent=2) + "\n"
    (Path(directory) / "tokenizer_config.json").write_text(text, encoding="utf-8")


def load_tiktoken(name: str) -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # on first use tiktoken downloads its files; any failure there lands here
        raise UserError(
            f"cannot load the tiktoken encoding {name!r} ({type(e).__name__}: {e}); connect to the network "
            "once, or set TIKTOKEN_CACHE_DIR to a folder holding its cached files"
        ) from e


# The files a Hugging Face tokenizer may consist of; save_hf copies those present.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class HFTokenizer(Tokenizer):
    """The Hugging Face tokenizer of a model directory (checkpoints made by convert.py import).
    transformers is an optional dependency, imported only here."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise UserError(
                f"this checkpoint uses the Hugging Face tokenizer in {path}: pip install transformers"
            ) from e
        if not Path(path).is_dir():
            raise UserError(
                f"the Hugging Face tokenizer folder {path} named in the checkpoint does not exist"
            )
        if not has_hf_tokenizer(Path(path)):
            raise UserError(
                f"{path} holds no tokenizer: none of {', '.join(HF_TOKENIZER_FILES)} is there; give a "
                "checkpoint folder or a Hugging Face model folder with its tokenizer files"
            )
        try:  # local_files_only: nothing here may turn into a download attempt
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load a Hugging Face tokenizer from {path} ({type(e).__name__}: {e}); put the "
                "model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) there"
            ) from e
        self.path = Path(path)
        self.vocab_size = len(self.tok)
        self.eot_token, self.bos_token = self.tok.eos_token_id, self.tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        # With the model's own special tokens (Llama: a leading BOS); verbose=False: a corpus may be
        # longer than the model's context without that being a mistake.
        return self.tok.encode(text, verbose=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if self._token_bytes is None:  # a vocabulary of whole characters (WordPiece, ...)
            return self.decode(ids).encode("utf-8")
        return b"".join(self._token_bytes.get(i, b"") for i in ids)

    @cached_property
    def _token_bytes(self) -> dict[int, bytes] | None:
        """The bytes each id stands for, where tokens can split a character: byte-level BPE (GPT-2,
        Llama 3, Qwen), whose alphabet spells bytes, and SentencePiece (Llama 2, Mistral), with "▁" for
        a space and <0xNN> tokens for single bytes. Added tokens stand for their text."""
        backend = getattr(self.tok, "backend_tokenizer", None)  # a slow (Python) tokenizer has none
        if backend is None:
            return None
        decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder else {}
        kinds = {step["type"] for step in decoder.get("decoders", [decoder]) if step}
        vocab = backend.get_vocab(with_added_tokens=False)
        if "ByteLevel" in kinds:
            to_byte = {char: b for b, char in byte_to_unicode().items()}
            token_bytes = {i: bytes(to_byte[char] for char in token) for token, i in vocab.items()}
        elif kinds & {"Metaspace", "Replace"}:
            token_bytes = {
                i: sentencepiece_bytes(token, "ByteFallback" in kinds) for token, i in vocab.items()
            }
        else:
            return None
        added = {i: token.content.encode("utf-8") for i, token in self.tok.added_tokens_decoder.items()}
        return {**token_bytes, **added}

    def save_hf(self, directory: Path) -> None:
        copy_hf_tokenizer(self.path, Path(directory))


def has_hf_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in HF_TOKENIZER_FILES)


def copy_hf_tokenizer(source: Path, target: Path) -> None:
    """The Hugging Face tokenizer files of folder source, copied into folder target (made if need be)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in HF_TOKENIZER_FILES:
        if (source / name).is_file() and (source / name).resolve() != (target / name).resolve():
            shutil.copyfile(source / name, target / name)


def sentencepiece_bytes(token: str, byte_fallback: bool) -> bytes:
    if byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("▁", " ").encode("utf-8")


def get_tokenizer(meta: dict) -> Tokenizer:
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(meta["encoding"])
    if kind == "hf":
        return HFTokenizer(meta["path"])
    raise ValueError(f"unknown tokenizer {kind!r} in meta.json: expected 'char', 'tiktoken' or 'hf'")
