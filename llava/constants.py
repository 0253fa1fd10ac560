"""Special token ids and strings shared by the LLaVA-compatible stack.

The values are the ones the official LLaVA checkpoints and question files expect.
"""

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss."""

IMAGE_TOKEN_INDEX = -200
"""Placeholder id that marks where the visual span is spliced into ``input_ids``."""

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"
DEFAULT_VIDEO_TOKEN = "<video>"
"""Where a video question's prompt holds its video, before the model family expands it."""

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "DEFAULT_IMAGE_TOKEN",
    "DEFAULT_IMAGE_PATCH_TOKEN",
    "DEFAULT_IM_START_TOKEN",
    "DEFAULT_IM_END_TOKEN",
    "IMAGE_PLACEHOLDER",
    "DEFAULT_VIDEO_TOKEN",
]
