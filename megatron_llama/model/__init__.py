"""The LLaMA model on megatron-core tensor-parallel layers."""
from .block import TransformerBlock
from .embedding import Embedding
from .head import FinalNorm, LMHead, lm_loss, sequence_logps
from .llama import LlamaModel, layer_names

__all__ = ["LlamaModel", "Embedding", "TransformerBlock", "FinalNorm", "LMHead", "lm_loss", "sequence_logps", "layer_names"]
