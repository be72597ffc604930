from .base import ConfigError, StrictModel, apply_overrides, dump_config, load_config, validate_config
from .generate import GenerateConfig
from .train import TrainConfig

__all__ = [
    "ConfigError",
    "GenerateConfig",
    "StrictModel",
    "TrainConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "validate_config",
]
