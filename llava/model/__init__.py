"""The models; importing this package registers ``llava_llama`` with transformers' Auto classes and every model
family (:mod:`llava.model.families`)."""

from .families import families  # noqa: F401  (registers the families)
from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM  # noqa: F401
