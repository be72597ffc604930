from .base import ConfigError, StrictModel, apply_overrides, dump_config, load_config, load_yaml, validate_config
from .distill import DistillConfig
from .generate import GenerateConfig
from .train import TrainConfig

__all__ = [
    "ConfigError",
    "DistillConfig",
    "GenerateConfig",
    "StrictModel",
    "TrainConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "load_yaml",
    "validate_config",
]
