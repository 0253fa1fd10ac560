"""Conversation templates render upstream LLaVA's exact prompt strings."""

from __future__ import annotations

import pytest

from llava.conversation import (
    Conversation,
    SeparatorStyle,
    conv_templates,
    default_conversation,
    get_conv_template,
)

Q = "<image>\nWhat is in the image?"

# The system lines, written out here independently of the module under test.
SYS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
SYS_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
SYS_MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural "
    "language.The visual content will be provided with the following format: <Image>visual content</Image>."
)
SYS_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
V0_EXAMPLE_ANSWER_START = "Renewable energy sources are those that can be replenished naturally"
V0_EXAMPLE_ANSWER_END = "their depletion can lead to economic and social instability.\n"

ONE_TURN = {
    "vicuna_v1": f"{SYS_USER} USER: {Q} ASSISTANT:",
    "v1": f"{SYS_USER} USER: {Q} ASSISTANT:",
    "llava_v1": f"{SYS_HUMAN} USER: {Q} ASSISTANT:",
    "llava_v0": f"{SYS_HUMAN}###Human: {Q}###Assistant:",
    "plain": f"{Q}\n",
    "v0_plain": f"{Q}\n",
    "mistral_instruct": f"[INST] {Q} [/INST]",
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        f"<|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\n"
    ),
    "mistral_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        f"<|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\n"
    ),
    "llava_llama_2": f"[INST] <<SYS>>\n{SYS_LLAVA_LLAMA_2}\n<</SYS>>\n\n{Q} [/INST]",
    "mpt": (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
        f"helpful and honest answers.<|im_end|><|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\n"
    ),
    "v1_mmtag": f"{SYS_MMTAG} USER: {Q} ASSISTANT:",
    "llava_v1_mmtag": f"{SYS_MMTAG} USER: {Q} ASSISTANT:",
    "v0_mmtag": f"{SYS_MMTAG}###Human: {Q}###Assistant:",
    # LLaVA-NeXT's conv_qwen (LLaVA-OneVision): SeparatorStyle.CHATML, sep "<|im_end|>"
    "qwen_1_5": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen_2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    ),
}


def one_turn(mode: str, question: object = Q) -> str:
    conv = get_conv_template(mode)
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("mode", sorted(ONE_TURN))
def test_one_turn_prompt_is_pinned(mode: str) -> None:
    assert one_turn(mode) == ONE_TURN[mode]


def test_vicuna_v1_two_turns_with_finished_answer() -> None:
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], Q)
    conv.append_message(conv.roles[1], "A dog on a red bench.")
    conv.append_message(conv.roles[0], "What color is the bench?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        f"{SYS_USER} USER: {Q} ASSISTANT: A dog on a red bench.</s>USER: What color is the bench? ASSISTANT:"
    )


def test_llama_2_styles_two_turns() -> None:
    conv = get_conv_template("llava_llama_2")
    conv.append_message(conv.roles[0], Q)
    conv.append_message(conv.roles[1], "A dog.")
    conv.append_message(conv.roles[0], "Color?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        f"[INST] <<SYS>>\n{SYS_LLAVA_LLAMA_2}\n<</SYS>>\n\n{Q} [/INST] A dog. </s><s>[INST] Color? [/INST]"
    )
    conv = get_conv_template("mistral_instruct")
    conv.append_message(conv.roles[0], Q)
    conv.append_message(conv.roles[1], "A dog.")
    conv.append_message(conv.roles[0], "Color?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == f"[INST] {Q} [/INST] A dog. </s>[INST] Color? [/INST]"


def test_llama_2_system_prompt_and_first_turn_checks() -> None:
    prompt = one_turn("llama_2")
    assert prompt.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.")
    assert prompt.endswith("please don't share false information.\n<</SYS>>\n\n" + Q + " [/INST]")
    conv = get_conv_template("llava_llama_2")
    conv.append_message(conv.roles[1], "answer first")
    with pytest.raises(ValueError, match="must start with the user role"):
        conv.get_prompt()
    conv = get_conv_template("llava_llama_2")
    conv.append_message(conv.roles[0], None)
    with pytest.raises(ValueError, match="non-empty first message"):
        conv.get_prompt()


def test_v0_keeps_the_few_shot_example() -> None:
    prompt = one_turn("v0")
    head = f"{SYS_HUMAN}###Human: What are the key differences between renewable and non-renewable energy sources?"
    assert prompt.startswith(head + "###Assistant: " + V0_EXAMPLE_ANSWER_START)
    assert prompt.endswith(V0_EXAMPLE_ANSWER_END + f"###Human: {Q}###Assistant:")
    assert conv_templates["v0"].offset == 2
    assert conv_templates["default"] is conv_templates["v0"]


def test_stop_strings_runners_derive() -> None:
    # Runners stop on sep for every style except TWO, where the assistant turn ends with sep2.
    def stop(mode: str) -> str:
        conv = conv_templates[mode]
        return conv.sep2 if conv.sep_style == SeparatorStyle.TWO else conv.sep

    assert stop("vicuna_v1") == "</s>"
    assert stop("llava_v0") == "###"
    assert stop("chatml_direct") == "<|im_end|>"
    assert conv_templates["mistral_instruct"].sep2 == "</s>"


def test_image_tuple_message() -> None:
    image = object()  # only the text of the tuple enters the prompt
    assert (
        one_turn("vicuna_v1", ("What is in the image?\n<image>", image, "Default")) == ONE_TURN["vicuna_v1"]
    )
    assert one_turn("v1_mmtag", ("<image>\nWhat is in the image?", image, "Pad")) == (
        f"{SYS_MMTAG} USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What is in the image? ASSISTANT:"
    )


def test_copy_is_independent_of_the_registry() -> None:
    before = [list(m) for m in conv_templates["vicuna_v1"].messages]
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "hi")
    conv.messages[-1][-1] = "changed"
    assert conv_templates["vicuna_v1"].messages == before
    v0 = conv_templates["v0"].copy()
    v0.append_message("Human", "x")  # templates declared with tuples still give appendable copies
    assert len(v0.messages) == 3 and len(conv_templates["v0"].messages) == 2
    assert conv.dict()["messages"] == [["USER", "changed"]]


def test_default_conversation_and_registry() -> None:
    assert default_conversation is conv_templates["vicuna_v1"]
    for name in (
        "vicuna_v1",
        "llava_v1",
        "llava_v0",
        "v1",
        "v0",
        "plain",
        "mistral_instruct",
        "chatml_direct",
        "llava_llama_2",
        "mpt",
        "llava_v1_mmtag",
    ):
        assert isinstance(conv_templates[name], Conversation)
    vicuna = conv_templates["vicuna_v1"]
    assert (vicuna.sep_style, vicuna.sep, vicuna.sep2, vicuna.roles) == (
        SeparatorStyle.TWO,
        " ",
        "</s>",
        ("USER", "ASSISTANT"),
    )


def test_unknown_mode_error_lists_allowed_modes() -> None:
    with pytest.raises(ValueError) as info:
        get_conv_template("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in ("vicuna_v1", "llava_v1", "mistral_instruct", "chatml_direct", "plain"):
        assert name in message


def test_chatml_style_and_bad_style() -> None:
    conv = Conversation(
        system="<|im_start|>system\nBe brief.",
        roles=("<|im_start|>user", "<|im_start|>assistant"),
        sep_style=SeparatorStyle.CHATML,
        sep="<|im_end|>",
    )
    conv.append_message(conv.roles[0], "Hi")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="SeparatorStyle"):
        Conversation(system="", roles=("a", "b"), sep_style="TWO")  # type: ignore[arg-type]
