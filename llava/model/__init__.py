"""LLaVA models; importing this package registers ``llava_llama`` with transformers' Auto classes."""

from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM  # noqa: F401
