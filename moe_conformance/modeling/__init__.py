"""The native candidate: a compact MoE transformer built from shared blocks."""

from .config import MoEConfig, YarnParams, from_hf
from .moe_transformer import CausalLMOutput, MoETransformer

__all__ = ["CausalLMOutput", "MoEConfig", "MoETransformer", "YarnParams", "from_hf"]
