"""Agents that read a memory: KVMemoryAgent (a cartridge) and HistoryAgent (the memory in the prompt)."""

from .history import HistoryAgent, HistoryAgentConfig
from .kv_memory import KVArtifact, KVCacheMemory, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig

__all__ = [
    "HistoryAgent",
    "HistoryAgentConfig",
    "KVArtifact",
    "KVCacheMemory",
    "KVCacheMemoryConfig",
    "KVMemoryAgent",
    "KVMemoryAgentConfig",
]
