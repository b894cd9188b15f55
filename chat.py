"""Chat conversations: reading them, rendering them with the tokenizer's own chat template, and which of
their tokens a fine-tune learns. data/chat/prepare.py, sample.py --chat and eval.py's generative tasks
all go through ChatFormat, so a conversation is rendered the same way in training and at inference.

A conversation is the `messages` list of transformers, TRL and the OpenAI API:
    [{"role": "system" | "user" | "assistant", "content": "..."}, ...]
Its tokens are exactly transformers' `apply_chat_template(messages, tokenize=True, return_dict=True)`.
Learned tokens: each assistant reply and the special token that ends its turn (<|im_end|>, <|eot_id|>);
not the system or user turns, nor the template's own tokens around a reply (its header, and a newline
some templates put after the end-of-turn token). The reply's span is found by rendering the
conversation up to that turn with the generation prompt, so no {% generation %} markers are needed.
"""

import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import jinja2

from runtime import UserError
from tokenizer import HFTokenizer, Tokenizer

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


def check_messages(messages: object, where: str) -> Messages:
    """messages if it is a valid conversation, else a UserError naming where it came from."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserError(f"{where}: message {n} is not an object with a 'role'")
        if message["role"] not in ROLES:
            raise UserError(
                f"{where}: message {n} has role {message['role']!r}; roles are {', '.join(ROLES)}"
            )
        content = message.get("content")
        if not isinstance(content, str) or not content:
            raise UserError(f"{where}: message {n} ({message['role']}) has empty or non-text content")
        check_text(content, f"{where}: message {n}")
    if messages[0]["role"] == "assistant":
        raise UserError(
            f"{where}: message 1 is the assistant's; a conversation starts with a system or user one"
        )
    if not any(message["role"] == "assistant" for message in messages):
        raise UserError(f"{where}: no assistant turn, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_text(text: str, what: str) -> str:
    """text, if it is Unicode a tokenizer can encode: a lone surrogate (JSON's "\\ud800", or an argument
    of bytes that are not UTF-8) is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid Unicode text ({e.reason} at character {e.start})") from None
    return text


def read_conversations(path: Path) -> list[Messages]:
    """One conversation per line of a JSONL file: {"messages": [...]} (blank lines are skipped)."""
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    conversations = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where} is not valid JSON ({e})") from None
                if not isinstance(record, dict) or "messages" not in record:
                    raise UserError(f"{where}: expected an object with a 'messages' list")
                conversations.append(check_messages(record["messages"], where))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e})") from None
    if not conversations:
        raise UserError(f"{path} holds no conversations")
    return conversations


class ChatFormat:
    """A Hugging Face tokenizer with a chat template: the template of its folder, or `template` (a
    Jinja file, or its text) in its place."""

    def __init__(
        self, tokenizer: Tokenizer, template: str | Path | None = None, source: str = "the tokenizer"
    ):
        self.origin = f"in {template}" if isinstance(template, Path) else f"of {source}"
        if isinstance(template, Path):
            template = read_text_file(template, "the chat template")
        if not isinstance(tokenizer, HFTokenizer):
            raise UserError(
                f"{source} is a {type(tokenizer).__name__} without a chat template or end-of-turn token: "
                "chat needs a Hugging Face tokenizer (import an open model with convert.py import, or "
                "prepare the data with --tokenizer naming a tokenizer folder)"
            )
        self.tok = tokenizer.tok
        self.template = template or self.tok.chat_template
        if not self.template:
            raise UserError(
                f"{source} ({tokenizer.path}) has no chat template: pass --chat_template FILE (a Jinja "
                "template such as the model family's chat_template.jinja)"
            )
        self.special_ids = {i for i, token in self.tok.added_tokens_decoder.items() if token.special}
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        ids, learned = self.encode(probe, "the chat template's test conversation")
        self.end_of_turn = ids[max(i for i, m in enumerate(learned) if m)]  # a reply's last learned token
        # A reply ends at the end of its turn, or at the end of text should the model say that instead.
        self.stop_ids = {self.end_of_turn} | ({tokenizer.eot_token} - {None})

    def apply(self, messages: Messages, where: str, **options) -> str | dict:
        """transformers' apply_chat_template with this template; a Jinja error (bad syntax, or the
        template's raise_exception refusing the conversation) is a UserError naming the template."""
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template, **options)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(
                f"the chat template {self.origin} is not valid Jinja: {e} (line {e.lineno})"
            ) from None
        except (jinja2.TemplateError, ArithmeticError, TypeError) as e:  # {{ 1 / 0 }}, {{ 'a' + 1 }}, ...
            raise UserError(f"{where}: the chat template {self.origin} fails on it: {e}") from None

    def render(self, messages: Messages, where: str, add_generation_prompt: bool = False) -> str:
        return self.apply(messages, where, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt(self, messages: Messages, where: str = "the conversation") -> list[int]:
        """The tokens of messages plus the generation prompt: what the model continues with a reply."""
        return self.apply(messages, where, tokenize=True, return_dict=True, add_generation_prompt=True)[
            "input_ids"
        ]

    def encode(self, messages: Messages, where: str) -> tuple[list[int], list[int]]:
        """The tokens of a conversation and its loss mask (1: learned), as the module docstring says."""
        options = {"tokenizer_kwargs": {"return_offsets_mapping": True}}
        encoded = self.apply(messages, where, tokenize=True, return_dict=True, **options)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        text = self.render(messages, where)
        learned = [0] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = self.reply_span(messages, turn, text, where)
                self.mark_reply(ids, offsets, learned, start, end, where)
        return ids, learned

    def reply_span(self, messages: Messages, turn: int, text: str, where: str) -> tuple[int, int]:
        """Where the assistant's message `turn` sits in the rendered text: after the generation prompt of
        the turns before it, up to the end of its own turn."""
        before = self.render(messages[:turn], where, add_generation_prompt=True)
        through = self.render(messages[: turn + 1], where)
        if not (text.startswith(before) and text.startswith(through)):
            raise UserError(
                f"{where}: the chat template renders earlier turns differently once later ones follow "
                f"(turn {turn + 1}), so replies cannot be told apart; pass --chat_template FILE with one "
                "that does not"
            )
        return len(before), len(through)

    def mark_reply(
        self, ids: list[int], offsets: list, learned: list[int], start: int, end: int, where: str
    ) -> None:
        """Set learned to 1 for the tokens of the reply in text[start:end], through the first special
        token (the end of the turn)."""
        for i, (token_start, token_end) in enumerate(offsets):
            if token_start < start < token_end:
                raise UserError(f"{where}: a token spans the generation prompt and the reply; cannot mask it")
            if start <= token_start < end:
                learned[i] = 1
                if ids[i] in self.special_ids:
                    return
        raise UserError(
            f"{where}: the chat template ends an assistant turn with no special token, so a reply has no "
            "end the model can learn; use a template whose turns end with one (<|im_end|>, <|eot_id|>)"
        )


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of the file at path; a UserError naming it as `what` (e.g. "the chat template")."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def chat_template(entry: dict, template_file: str | None) -> str | Path | None:
    """The template to chat with: template_file (a --chat_template flag) if given, else the one the
    checkpoint's tokenizer entry carries (data/chat/prepare.py --chat_template); None: the tokenizer
    folder's own."""
    return Path(template_file) if template_file else entry.get("chat_template")


def reply_tokens(steps: Iterator, stop_ids: set[int]) -> Iterator:
    """The tokens (1, 1) of steps, a generation of one sequence, up to the first of stop_ids, which is
    not yielded; steps is closed then, so no token past the reply is computed."""
    with closing(steps):
        for token in steps:
            if int(token) in stop_ids:
                return
            yield token
