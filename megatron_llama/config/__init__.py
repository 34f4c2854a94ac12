"""Typed configs, validated once at the edge (here) and trusted everywhere else."""
from .dpo import DPOConfig
from .errors import ConfigError
from .load import config_from_dict, config_to_dict, load_config
from .model import ModelConfig
from .presets import preset, preset_names
from .run import DataConfig, ParallelConfig, RunConfig, TrainConfig

__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "TrainConfig", "DataConfig", "DPOConfig", "RunConfig",
           "load_config", "config_from_dict", "config_to_dict", "preset", "preset_names"]
