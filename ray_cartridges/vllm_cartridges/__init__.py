"""Cartridges served inside vLLM through its v1 KV connector API (see connector.py and engine.py)."""

from .engine import CartridgeLLM, CartridgeSet, EngineStats, LoadedCartridge, UnknownCartridge

__all__ = ["CartridgeLLM", "CartridgeSet", "EngineStats", "LoadedCartridge", "UnknownCartridge"]
