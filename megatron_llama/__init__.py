"""megatron-llama: 3D-parallel LLaMA pretraining (megatron-core TP x DeepSpeed PP/ZeRO)."""
__version__ = "0.1.0"
