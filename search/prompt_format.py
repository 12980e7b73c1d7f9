"""How a problem's prompt becomes the text a policy reads: `raw` (the prompt as it is) or `chat` (the tokenizer's chat
template around it, with an optional system prompt), as instruct models expect.

A policy version carries its format (`prompt_format.json` in its folder, written when the version is saved), so that
search, training and evaluation wrap a prompt the same way; a job may name another for its own search.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

STYLES = ("raw", "chat")
FILE = "prompt_format.json"
MAX_SYSTEM_CHARS = 4000


@dataclass(frozen=True)
class PromptFormat:
    style: str = "raw"
    system: str | None = None  # chat only: the system message put before the prompt

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"prompt_format must be one of {', '.join(STYLES)} (got {self.style!r})")
        if self.system is not None:
            if not isinstance(self.system, str) or len(self.system) > MAX_SYSTEM_CHARS:
                raise ValueError(f"system_prompt must be text of at most {MAX_SYSTEM_CHARS} characters")
            if self.style == "raw":
                raise ValueError("system_prompt needs prompt_format chat: a raw prompt has no place for it")

    @property
    def raw(self) -> bool:
        return self.style == "raw"

    def check(self, tokenizer) -> None:
        """ValueError (one line) when this format cannot be applied with `tokenizer`."""
        if not self.raw and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format chat needs a tokenizer with a chat template, and this model's has none: "
                             "use prompt_format raw, or add a chat_template to its tokenizer_config.json")

    def apply(self, tokenizer, prompt: str) -> str:
        """The text the policy reads for `prompt`; the completion follows it directly."""
        if self.raw:
            return prompt
        self.check(tokenizer)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def save(self, folder: str | Path) -> None:
        Path(folder, FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path | None) -> "PromptFormat":
        """The format saved in a version's folder; raw for a folder without one (every version before formats)."""
        path = Path(folder, FILE) if folder is not None else None
        if path is None or not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))


RAW = PromptFormat()


def chosen(style: str | None, system: str | None, default: PromptFormat) -> PromptFormat:
    """A run's or a job's choice (None: `default`, the version's own)."""
    return default if style is None and system is None else PromptFormat(style or "chat", system)


def formatted_problems(problems: list, fmt: PromptFormat, tokenizer) -> list:
    """The problems with their prompts as the policy reads them (ids and everything else kept)."""
    return problems if fmt.raw else [replace(p, prompt=fmt.apply(tokenizer, p.prompt)) for p in problems]


def formatted_examples(examples: list[dict], fmt: PromptFormat, tokenizer) -> list[dict]:
    """Training rows ({"prompt", ...}) with their prompts as the policy reads them."""
    return examples if fmt.raw else [{**e, "prompt": fmt.apply(tokenizer, e["prompt"])} for e in examples]
