"""Record formats of instruction data: prompt/completion, chat ``messages``, alpaca.

A record is one row of a JSONL file or a Hugging Face dataset, as a dict. Each format
maps it to one :class:`Example`: ``prompt`` is what generation starts from, ``target``
the reference answer, and for chat data ``segments`` are the rendered conversation with
the assistant turns marked trainable, so the loss falls on every assistant turn and on
nothing the user or the template wrote.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from hsplitlora.data.example import DataError, Example

__all__ = [
    "ALPACA_PROMPT",
    "COLUMN_ROLES",
    "FORMATS",
    "ChatTemplate",
    "Format",
    "detect_format",
    "rename_columns",
    "sample_prompt",
    "to_example",
]

Format = Literal["prompt_completion", "messages", "alpaca"]
FORMATS: tuple[Format, ...] = ("prompt_completion", "messages", "alpaca")

# The keys each format reads; ``columns`` in the config maps a dataset's own names to these.
_KEYS: dict[Format, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "alpaca": ("instruction", "input", "output"),
}
COLUMN_ROLES = tuple(k for keys in _KEYS.values() for k in keys)

# The Stanford Alpaca prompt, verbatim, so adapters trained here read alpaca data the way
# models trained on it expect.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n{input}"
    "### Response:\n"
)
_ALPACA_CONTEXT = ", paired with an input that provides further context"

_FIX = ("records must be prompt/completion ({\"prompt\": ..., \"completion\": ...}), chat "
        "({\"messages\": [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", "
        "...}]}) or alpaca ({\"instruction\": ..., \"input\": ..., \"output\": ...}); name "
        "yours with data.format, and map other column names with data.columns "
        "(e.g. {prompt: question, completion: answer})")


def rename_columns(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """The record with ``columns`` (format key -> the dataset's column) renamed to the
    format's own keys; other keys stay as they are."""
    out = dict(record)
    for key, column in columns.items():
        if column in out and column != key:
            out[key] = out.pop(column)
    return out


def detect_format(record: Mapping[str, Any], where: str) -> Format:
    """Which format a record is in, from its keys (the first record decides for a file)."""
    keys = set(record)
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if keys & {"prompt", "completion"}:
        return "prompt_completion"
    if keys & {"instruction", "output"}:
        return "alpaca"
    raise DataError(f"{where}: cannot tell the format from the keys {sorted(keys)}; {_FIX}.")


class ChatTemplate:
    """A tokenizer's chat template (or one given in the config), rendering conversations.

    Rendering is incremental: the text up to each assistant turn (with the generation
    prompt) must be a prefix of the whole conversation's text, which holds for the
    templates of the common chat models; what lies between is that turn, trained on.
    """

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "chat data (data.format 'messages') needs a chat template, and this model's "
                "tokenizer has none: use an instruct model (e.g. smollm2-135m) or set "
                "data.chat_template to a Jinja template")

    def render(self, messages: Sequence[Mapping[str, str]], *, generation: bool = False) -> str:
        try:
            return str(self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False,
                add_generation_prompt=generation))
        except Exception as err:  # jinja raises TemplateError and friends for bad input
            raise DataError(f"the chat template could not render {list(messages)!r:.120}: "
                            f"{err}") from err


def sample_prompt(text: str, fmt: Format, chat: ChatTemplate | None) -> str:
    """A user's sample request written the way the dataset's prompts are."""
    if fmt == "messages" and chat is not None:
        return chat.render([{"role": "user", "content": text}], generation=True)
    if fmt == "alpaca":
        return _alpaca_prompt(text, "")
    return text


def to_example(record: Mapping[str, Any], fmt: Format, where: str,
               chat: ChatTemplate | None = None) -> Example:
    """One record as an Example; keys the format does not read become string metadata.

    Chat records need ``chat`` to be rendered for training; without it (checking a file
    before the model loads) the example holds the raw texts only.
    """
    record = dict(record)
    if fmt == "messages" and "messages" not in record and "conversations" in record:
        record["messages"] = _sharegpt(record.pop("conversations"), where)
    used = _KEYS[fmt]
    meta = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            for k, v in record.items() if k not in used}
    if fmt == "prompt_completion":
        prompt, completion = (_text(record, k, where) for k in ("prompt", "completion"))
        return Example(prompt, completion, meta)
    if fmt == "alpaca":
        instruction, output = _text(record, "instruction", where), _text(record, "output", where)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: 'input' is not a string; {_FIX}.")
        return Example(_alpaca_prompt(instruction, extra), output, meta)
    return _chat_example(_messages(record, where), meta, where, chat)


def _alpaca_prompt(instruction: str, extra: str) -> str:
    if extra.strip():
        return ALPACA_PROMPT.format(context=_ALPACA_CONTEXT, instruction=instruction,
                                    input=f"### Input:\n{extra}\n\n")
    return ALPACA_PROMPT.format(context="", instruction=instruction, input="")


def _text(record: Mapping[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing key {key!r}; {_FIX}.")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} is a JSON {_json_type(value)}, not a string; {_FIX}.")
    return value


def _sharegpt(turns: Any, where: str) -> list[dict[str, str]]:
    """ShareGPT's ``conversations`` (``from``/``value``, human/gpt) as chat messages."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "system": "system"}
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: 'conversations' must be a list of objects; {_FIX}.")
    return [{"role": roles.get(str(t.get("from")), str(t.get("from"))),
             "content": t.get("value")} for t in turns]


def _messages(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {i} is {m!r:.80}; each message must be "
                            "{\"role\": \"user\" | \"assistant\" | \"system\", \"content\": "
                            "\"text\"}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is "
                        "nothing to learn; every record needs at least one")
    return out


def _chat_example(messages: list[dict[str, str]], meta: dict[str, str], where: str,
                  chat: ChatTemplate | None) -> Example:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    answer = messages[last]["content"]
    if chat is None:
        return Example(json.dumps(messages[:last], ensure_ascii=False), answer, meta)
    full = chat.render(messages[:last + 1])
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages[:last + 1]):
        if m["role"] != "assistant":
            continue
        before = chat.render(messages[:i], generation=True)
        through = chat.render(messages[:i + 1])
        if not (through.startswith(before) and full.startswith(through)
                and len(before) >= pos):
            raise DataError(
                f"{where}: the chat template does not render this conversation turn by turn "
                "(the text before an assistant turn is not a prefix of the whole), so the "
                "assistant turns cannot be told apart; set data.chat_template to a "
                "template that does")
        segments += [(full[pos:len(before)], False), (full[len(before):len(through)], True)]
        pos = len(through)
    prompt = chat.render(messages[:last], generation=True)
    return Example(prompt, answer, meta, segments=tuple(s for s in segments if s[0]))


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, the vocabulary of the person fixing the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"
