"""What a record is, checked record by record: instruction (alpaca), prompt-completion, messages
(TRL's conversational format), ShareGPT conversations, and plain text.

`detect` names the format from a record's columns when data.format is not set; `normalize` checks
one record and turns it into a Sample (a prompt/response pair, a conversation, or a text), or
raises Invalid naming the field and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from trainer.config import DataConfig
from trainer.errors import UserError

FORMATS = ("instruction", "prompt-completion", "messages", "sharegpt", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class Invalid(Exception):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"field {field_name!r}: {message}")
        self.field, self.message = field_name, message


@dataclass
class Pair:
    """A prompt and the response to train on. raw: byte-exact text, no template (prompt-completion)."""

    prompt: str
    response: str
    raw: bool = False


@dataclass
class Turn:
    role: str
    content: str
    train: bool = True


@dataclass
class Chat:
    turns: list[Turn] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": t.role, "content": t.content} for t in self.turns]


@dataclass
class Text:
    text: str


Sample = Union[Pair, Chat, Text]


def detect(record: dict[str, Any], cfg: DataConfig) -> str:
    """The format of the data from a record's columns (or data.format when set)."""
    if cfg.format:
        return cfg.format
    keys = set(record)
    if cfg.template == "text":
        return "text"
    if cfg.messages_column in keys and isinstance(record[cfg.messages_column], list):
        return "messages"
    if cfg.conversations_column in keys and isinstance(record[cfg.conversations_column], list):
        return "sharegpt"
    if {cfg.prompt_column, cfg.completion_column} <= keys:
        return "prompt-completion"
    if {cfg.instruction_column, cfg.output_column} <= keys:
        return "instruction"
    if keys == {cfg.text_column} or (
        cfg.text_column in keys
        and isinstance(record[cfg.text_column], str)
        and not {cfg.instruction_column, cfg.output_column} & keys
    ):
        return "text"
    raise UserError(
        f"data: cannot tell the format of records with columns {', '.join(sorted(keys)) or '(none)'}. Expected one of: "
        f"{cfg.messages_column} (a list of {{role, content}}: messages), {cfg.conversations_column} (a list of "
        f"{{from, value}}: sharegpt), {cfg.prompt_column}+{cfg.completion_column} (prompt-completion), "
        f"{cfg.instruction_column}+{cfg.output_column} (instruction), {cfg.text_column} (text). Fix: rename the "
        "columns with data.<kind>_column (e.g. data.output_column: answer), or set data.format"
    )


def _text(record: dict, key: str, required: bool = True, allow_empty: bool = False, coerce: bool = False) -> str:
    if key not in record:
        if required:
            raise Invalid(key, "is missing")
        return ""
    value = record[key]
    if value is None:
        if required:
            raise Invalid(key, "is null")
        return ""
    if coerce and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a CSV cell that pyarrow read as a number
    if not isinstance(value, str):
        raise Invalid(key, f"must be text, got {type(value).__name__} {_short(value)}")
    if required and not allow_empty and not value.strip():
        raise Invalid(key, "is empty")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _turn_flag(turn: dict, where: str) -> bool:
    if "train" in turn:
        if not isinstance(turn["train"], bool):
            raise Invalid(f"{where}.train", f"must be true or false, got {_short(turn['train'])}")
        return turn["train"]
    if "weight" in turn:  # axolotl's name for the same flag
        if turn["weight"] not in (0, 1):
            raise Invalid(f"{where}.weight", f"must be 0 or 1, got {_short(turn['weight'])}")
        return bool(turn["weight"])
    return True


def _chat(turns: list[Turn], key: str, cfg: DataConfig) -> Chat:
    if not turns:
        raise Invalid(key, "is an empty conversation")
    if not any(t.role == "assistant" and t.train for t in turns):
        raise Invalid(key, "has no assistant turn to train on")
    if cfg.system_prompt and turns[0].role != "system":
        turns = [Turn("system", cfg.system_prompt, False)] + turns
    return Chat(turns)


def renders_as_chat(fmt: str, cfg: DataConfig) -> bool:
    """Whether `normalize` makes Chats of this format's records (which the chat template renders)."""
    return fmt in ("messages", "sharegpt") or (fmt == "instruction" and cfg.template == "chat")


def normalize(record: dict[str, Any], fmt: str, cfg: DataConfig, coerce: bool = False) -> Sample:
    """One record as a Sample, or Invalid naming the field."""
    if fmt == "text":
        return Text(_text(record, cfg.text_column, coerce=coerce))
    if fmt == "prompt-completion":
        return Pair(
            _text(record, cfg.prompt_column, allow_empty=True, coerce=coerce),
            _text(record, cfg.completion_column, coerce=coerce),
            raw=True,
        )
    if fmt == "instruction":
        instruction = _text(record, cfg.instruction_column, coerce=coerce).strip()
        context = _text(record, cfg.input_column, required=False, coerce=coerce).strip()
        output = _text(record, cfg.output_column, coerce=coerce).strip()
        if cfg.template == "chat":
            user = f"{instruction}\n\n{context}" if context else instruction
            return _chat([Turn("user", user, False), Turn("assistant", output)], cfg.output_column, cfg)
        return Pair(alpaca_prompt(instruction, context, cfg), output)
    key = cfg.messages_column if fmt == "messages" else cfg.conversations_column
    value = record.get(key)
    if value is None:
        raise Invalid(key, "is missing" if key not in record else "is null")
    if not isinstance(value, list):
        raise Invalid(key, f"must be a list of turns, got {type(value).__name__} {_short(value)}")
    turns = []
    for i, turn in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise Invalid(where, f"must be an object, got {type(turn).__name__} {_short(turn)}")
        if fmt == "messages":
            role = turn.get("role")
            if role not in ROLES:
                raise Invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {_short(role)}")
            content = _text(turn, "content", allow_empty=role != "assistant")
        else:
            speaker = turn.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise Invalid(f"{where}.from", f"must be one of {', '.join(SHAREGPT_ROLES)}, got {_short(speaker)}")
            role = SHAREGPT_ROLES[speaker]
            content = _text(turn, "value", allow_empty=role != "assistant")
        turns.append(Turn(role, content, role == "assistant" and _turn_flag(turn, where)))
    return _chat(turns, key, cfg)


ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_WITH_INPUT = "{preamble}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = "{preamble}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def alpaca_prompt(instruction: str, context: str, cfg: DataConfig) -> str:
    if context:
        tpl = cfg.prompt_with_input or ALPACA_WITH_INPUT.replace("{preamble}", cfg.system_prompt or ALPACA_PREAMBLE_INPUT)
        return tpl.format(instruction=instruction, input=context)
    tpl = cfg.prompt_no_input or ALPACA_NO_INPUT.replace("{preamble}", cfg.system_prompt or ALPACA_PREAMBLE)
    return tpl.format(instruction=instruction)


def export_record(sample: Sample, fmt: str, cfg: DataConfig, record: dict) -> dict:
    """A cleaned record for `prepare --export`: the fields the format uses, as the source had them."""
    if fmt == "instruction":
        keys = [cfg.instruction_column, cfg.input_column, cfg.output_column]
        return {k: ("" if record.get(k) is None else record[k]) for k in keys}
    if fmt == "prompt-completion":
        return {cfg.prompt_column: record[cfg.prompt_column], cfg.completion_column: record[cfg.completion_column]}
    if fmt == "text":
        return {cfg.text_column: record[cfg.text_column]}
    key = cfg.messages_column if fmt == "messages" else cfg.conversations_column
    return {key: record[key]}
