"""Conversation templates that turn a chat history into the prompt string a LLaVA checkpoint was trained on.

The public names (``Conversation``, ``SeparatorStyle``, ``conv_templates``, ``default_conversation``) and the
exact strings each template renders follow upstream LLaVA, so ``--conv-mode vicuna_v1`` and friends produce
byte-identical prompts. Typical use in a runner::

    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], "<image>\\nWhat is shown?")
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()   # "... USER: <image>\\nWhat is shown? ASSISTANT:"

A message is a string, ``None`` (an open turn the model is asked to complete) or, for the first user turn,
a ``(text, image, image_process_mode)`` tuple as the upstream demo builds it; only the text of such a tuple
enters the prompt.
"""

from __future__ import annotations

import dataclasses
from enum import Enum, auto
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN

__all__ = [
    "SeparatorStyle",
    "Conversation",
    "conv_templates",
    "default_conversation",
    "get_conv_template",
]


class SeparatorStyle(Enum):
    """How turns are joined into one prompt string.

    - ``SINGLE``: ``{system}{sep}{role}: {msg}{sep}...{role}:``
    - ``TWO``: like ``SINGLE`` but user turns end with ``sep`` and assistant turns with ``sep2``.
    - ``MPT``: ``{system}{sep}{role}{msg}{sep}...{role}`` (roles carry their own markup).
    - ``PLAIN``: messages only, each followed by ``sep`` / ``sep2``; no system line, no roles.
    - ``LLAMA_2``: ``[INST] <<SYS>>...<</SYS>>\\n\\n{msg} [/INST] {answer} {sep2}`` (Llama-2 / Mistral).
    - ``CHATML``: ``{system}{sep}\\n{role}\\n{msg}{sep}\\n...{role}\\n`` (LLaVA-NeXT style ChatML).
    """

    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()
    CHATML = auto()


def _message_text(message: Any) -> str:
    """The text part of a message: the string itself, or the first element of an image tuple."""
    if isinstance(message, tuple):
        return message[0]
    return message


@dataclasses.dataclass
class Conversation:
    """A chat history plus the formatting rules of one prompt template.

    Attributes:
        system: system line placed before the first turn.
        roles: (user role, assistant role) names as they appear in the prompt.
        messages: list of ``[role, message]`` pairs; ``message`` is a string, ``None`` or an image tuple.
        offset: number of leading few-shot messages that are part of the template, not of the chat.
        sep_style: the :class:`SeparatorStyle` used by :meth:`get_prompt`.
        sep: main separator; sep2: second separator (end of assistant turns for ``TWO``/``LLAMA_2``).
        version: template family tag ("v1", "llama_v2", "mpt", "v1_mmtag", ...); "mmtag" changes image tuples.
    """

    system: str
    roles: tuple[str, str]
    messages: list[list[Any]] = dataclasses.field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.sep_style, SeparatorStyle):
            allowed = ", ".join(s.name for s in SeparatorStyle)
            raise ValueError(f"sep_style must be a SeparatorStyle ({allowed}), got {self.sep_style!r}")
        # Templates may be declared with tuples; keep an owned, mutable list of [role, message] pairs.
        self.messages = [[role, message] for role, message in self.messages]

    # ------------------------------------------------------------------ building the history
    def append_message(self, role: str, message: Any) -> None:
        """Append one turn; ``message=None`` leaves the turn open for the model to complete."""
        self.messages.append([role, message])

    def copy(self) -> Conversation:
        """An independent copy (the message list is new; message objects are shared)."""
        return Conversation(
            system=self.system,
            roles=self.roles,
            messages=[[role, message] for role, message in self.messages],
            offset=self.offset,
            sep_style=self.sep_style,
            sep=self.sep,
            sep2=self.sep2,
            version=self.version,
            skip_next=self.skip_next,
        )

    def dict(self) -> dict[str, Any]:
        """A JSON-friendly summary; image tuples are reduced to their text."""
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, _message_text(message)] for role, message in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }

    # ------------------------------------------------------------------ rendering
    def _messages_for_prompt(self) -> list[tuple[str, Any]]:
        """Messages with the first image tuple rewritten the way upstream renders it."""
        messages = [(role, message) for role, message in self.messages]
        if not messages or not isinstance(messages[0][1], tuple):
            return messages
        first_role, first_message = messages[0]
        text = first_message[0].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if "mmtag" in self.version:
            # mmtag models see the image in its own exchange before the question.
            return [
                (self.roles[0], "<Image><image></Image>"),
                (self.roles[1], "Received."),
                (first_role, text),
                *messages[1:],
            ]
        return [(first_role, f"{DEFAULT_IMAGE_TOKEN}\n{text}"), *messages[1:]]

    def get_prompt(self) -> str:
        """Render the history into the prompt string of this template."""
        messages = self._messages_for_prompt()
        render = {
            SeparatorStyle.SINGLE: self._render_single,
            SeparatorStyle.TWO: self._render_two,
            SeparatorStyle.MPT: self._render_mpt,
            SeparatorStyle.PLAIN: self._render_plain,
            SeparatorStyle.LLAMA_2: self._render_llama_2,
            SeparatorStyle.CHATML: self._render_chatml,
        }[self.sep_style]
        return render(messages)

    def _alternating_seps(self) -> tuple[str, str]:
        return self.sep, self.sep if self.sep2 is None else self.sep2

    def _render_single(self, messages: list[tuple[str, Any]]) -> str:
        parts = [self.system, self.sep]
        for role, message in messages:
            parts.append(f"{role}: {_message_text(message)}{self.sep}" if message else f"{role}:")
        return "".join(parts)

    def _render_two(self, messages: list[tuple[str, Any]]) -> str:
        seps = self._alternating_seps()
        parts = [self.system, seps[0]]
        for i, (role, message) in enumerate(messages):
            parts.append(f"{role}: {_message_text(message)}{seps[i % 2]}" if message else f"{role}:")
        return "".join(parts)

    def _render_mpt(self, messages: list[tuple[str, Any]]) -> str:
        parts = [self.system, self.sep]
        for role, message in messages:
            parts.append(f"{role}{_message_text(message)}{self.sep}" if message else role)
        return "".join(parts)

    def _render_plain(self, messages: list[tuple[str, Any]]) -> str:
        seps = self._alternating_seps()
        parts = [self.system]
        for i, (_, message) in enumerate(messages):
            if message:
                parts.append(f"{_message_text(message)}{seps[i % 2]}")
        return "".join(parts)

    def _render_llama_2(self, messages: list[tuple[str, Any]]) -> str:
        if not messages:
            return ""
        first_role, first_message = messages[0]
        if not first_message:
            raise ValueError("LLAMA_2 prompts need a non-empty first message")
        if first_role != self.roles[0]:
            raise ValueError(
                f"LLAMA_2 prompts must start with the user role {self.roles[0]!r}, got {first_role!r}"
            )
        system = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" if self.system else ""
        parts: list[str] = []
        for i, (_, message) in enumerate(messages):
            if not message:
                continue
            text = _message_text(message)
            if i == 0:
                text = system + text
            if i % 2 == 0:
                parts.append(f"{self.sep}[INST] {text} [/INST]")
            else:
                parts.append(f" {text} {self.sep2}")
        prompt = "".join(parts)
        # The rendered string starts with sep + "[INST]"; the leading sep is not part of the prompt.
        return prompt[len(self.sep) :] if self.sep and prompt.startswith(self.sep) else prompt

    def _render_chatml(self, messages: list[tuple[str, Any]]) -> str:
        parts = [f"{self.system}{self.sep}\n" if self.system else ""]
        for role, message in messages:
            parts.append(f"{role}\n{_message_text(message)}{self.sep}\n" if message else f"{role}\n")
        return "".join(parts)


# ---------------------------------------------------------------------------------------------- templates
_SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_SYSTEM_MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_SYSTEM_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_SYSTEM_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
# The one-shot example that ships with the Vicuna v0 template (offset=2 hides it from the chat history).
_VICUNA_V0_EXAMPLE = (
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    (
        "Assistant",
        "Renewable energy sources are those that can be replenished naturally in a relatively "
        "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
        "Non-renewable energy sources, on the other hand, are finite and will eventually be "
        "depleted, such as coal, oil, and natural gas. Here are some key differences between "
        "renewable and non-renewable energy sources:\n"
        "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
        "energy sources are finite and will eventually run out.\n"
        "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
        "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
        "and other negative effects.\n"
        "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
        "have lower operational costs than non-renewable sources.\n"
        "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
        "locations than non-renewable sources.\n"
        "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
        "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
        "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
        "non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
    ),
)

conv_vicuna_v0 = Conversation(
    system=_SYSTEM_HUMAN,
    roles=("Human", "Assistant"),
    messages=[list(m) for m in _VICUNA_V0_EXAMPLE],
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_vicuna_v1 = Conversation(
    system=_SYSTEM_USER,
    roles=("USER", "ASSISTANT"),
    version="v1",
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)
conv_llama_2 = Conversation(
    system=_SYSTEM_LLAMA_2,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)
conv_llava_llama_2 = Conversation(
    system=_SYSTEM_LLAVA_LLAMA_2,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)
conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)
conv_mpt = Conversation(
    system="<|im_start|>system\n"
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)
conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)
conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)
conv_llava_v0 = Conversation(
    system=_SYSTEM_HUMAN,
    roles=("Human", "Assistant"),
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_llava_v0_mmtag = Conversation(
    system=_SYSTEM_MMTAG,
    roles=("Human", "Assistant"),
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0_mmtag",
)
conv_llava_v1 = Conversation(
    system=_SYSTEM_HUMAN,
    roles=("USER", "ASSISTANT"),
    version="v1",
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)
conv_llava_v1_mmtag = Conversation(
    system=_SYSTEM_MMTAG,
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1_mmtag",
)
conv_qwen2_5_vl = Conversation(
    system="<|im_start|>system\nYou are a helpful assistant.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="qwen",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>\n",
)
"""Qwen2.5-VL-Instruct's chat format (its chat template with the default system turn); ``<image>`` becomes
``<|vision_start|><|image_pad|><|vision_end|>`` when the prompt is encoded (:func:`llava.eval.runner.encode`)."""

conv_qwen = Conversation(
    system="<|im_start|>system\nYou are a helpful assistant.",
    roles=("<|im_start|>user", "<|im_start|>assistant"),
    version="qwen",
    sep_style=SeparatorStyle.CHATML,
    sep="<|im_end|>",
)
"""LLaVA-NeXT's ``qwen_1_5`` / ``qwen_2`` template (``conv_qwen``), LLaVA-OneVision's chat format:
``<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nQ<|im_end|>\n
<|im_start|>assistant\n``."""

default_conversation = conv_vicuna_v1
"""The template used when no mode is given (upstream's current default)."""

conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
    "qwen2_5_vl": conv_qwen2_5_vl,
    "qwen_1_5": conv_qwen,
    "qwen_2": conv_qwen,
}
"""Registry of templates by ``--conv-mode`` name. Call ``.copy()`` before appending messages."""


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the template registered as ``name``.

    Raises:
        ValueError: if ``name`` is not a registered conversation mode; the message lists the allowed ones.
    """
    template = conv_templates.get(name)
    if template is None:
        allowed = ", ".join(sorted(conv_templates))
        raise ValueError(f"unknown conversation mode {name!r}; allowed modes: {allowed}")
    return template.copy()
