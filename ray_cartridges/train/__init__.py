from .driver import run_training

__all__ = ["run_training"]
