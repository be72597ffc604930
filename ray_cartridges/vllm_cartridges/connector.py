"""A vLLM v1 KV connector that supplies a cartridge as the KV of a request's first p prompt tokens.

A cartridge request's prompt is p placeholder ids followed by the conversation, so the conversation sits at
positions p.. exactly as in training. Its ``kv_transfer_params`` (``CartridgeParams.to_dict``) name the
cartridge. The scheduler side reports the placeholder tokens the local prefix cache does not already hold
as a synchronous external hit; the worker side writes those positions' K/V into the request's paged blocks
through each attention layer's own ``impl.do_kv_cache_update``, so the cache layout stays vLLM's business.
With prefix caching on, later requests of the same cartridge (same ``cache_salt``) find its blocks cached
and load nothing. The API is experimental in vLLM: the version is pinned and ``tests/test_vllm_cartridges.py``
is the gate for upgrades.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

CONNECTOR_NAME = "CartridgeConnector"
PARAMS_KEY = "cartridge"  # the key of kv_transfer_params that marks a cartridge request


@dataclass(frozen=True)
class CartridgeParams:
    """What a request tells the connector: which cartridge file, its content hash and its length p."""

    path: str  # adapter_model.safetensors of the cartridge directory
    sha256: str
    num_tokens: int

    def to_dict(self) -> dict:
        return {PARAMS_KEY: asdict(self)}

    @classmethod
    def of(cls, request: Request) -> CartridgeParams | None:
        params = request.kv_transfer_params or {}
        d = params.get(PARAMS_KEY)
        return cls(**d) if d else None


@dataclass
class _Load:
    req_id: str
    params: CartridgeParams
    start: int  # first position to write (earlier ones were in the local prefix cache)
    block_ids: list[int]


@dataclass
class CartridgeConnectorMetadata(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)


def read_cartridge_kv(path: str, num_layers: int, num_kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    """Per layer a [2, p, H, D] tensor (keys, values) from a cartridge's PEFT ``prompt_embeddings``
    ([p, L * 2 * H * D]; per token, layer l's key is slot 2l and its value slot 2l + 1)."""
    from safetensors.torch import load_file

    try:
        w = load_file(path)["prompt_embeddings"]
    except Exception as err:  # a truncated or foreign file: name it
        raise ValueError(f"{path}: cannot read the cartridge weights ({type(err).__name__}: {err})") from None
    want = num_layers * 2 * num_kv_heads * head_dim
    if w.ndim != 2 or w.shape[1] != want:
        raise ValueError(
            f"{path}: prompt_embeddings has shape {tuple(w.shape)}, this model needs [p, {want}] "
            f"({num_layers} layers x 2 x {num_kv_heads} kv heads x {head_dim})"
        )
    w = w.view(w.shape[0], num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 0, 3, 4)  # [L, 2, p, H, D]
    return list(w.unbind(0))


class CartridgeConnector(KVConnectorBase_V1):
    """Scheduler side: which placeholder positions to load. Worker side: write them from the cartridge file."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) > 1:
            raise ValueError(
                f"cartridges need a model with one kind of attention (one KV-cache group); "
                f"{vllm_config.model_config.model} has {len(groups)} (sliding-window or hybrid layers)"
            )
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.block_size = vllm_config.cache_config.block_size
        self.max_resident = int(extra.get("max_resident_cartridges", 8))
        # scheduler side
        self._pending: dict[str, _Load] = {}
        self._loaded: dict[str, int] = {}  # request id -> placeholder tokens it loaded (0: all were cached)
        # worker side: cartridges on the device, least recently used first
        self._resident: OrderedDict[tuple[str, str], list[torch.Tensor]] = OrderedDict()
        self.file_reads = 0

    # ---- scheduler side ---------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        params = CartridgeParams.of(request)
        if params is None or num_computed_tokens >= params.num_tokens:
            return 0, False
        if request.skip_reading_prefix_cache:
            log.error(
                "request %s reads no external KV (prompt logprobs?): its cartridge is ignored", request.request_id
            )
        return params.num_tokens - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        params = CartridgeParams.of(request)
        if params is None:
            return
        self._loaded.setdefault(request.request_id, 0)
        if num_external_tokens > 0:
            start = params.num_tokens - num_external_tokens
            self._pending[request.request_id] = _Load(request.request_id, params, start, [])
            self._loaded[request.request_id] += num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = CartridgeConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            load = self._pending.pop(new.req_id, None)
            if load is not None:
                load.block_ids = list(new.block_ids[0])
                meta.loads.append(load)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):  # preempted requests that resume get all their blocks anew
            if req_id in self._pending and req_id in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                load = self._pending.pop(req_id)
                load.block_ids = list(cached.new_block_ids[i][0])
                meta.loads.append(load)
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._pending.pop(request.request_id, None)
        loaded = self._loaded.pop(request.request_id, None)
        if loaded is None:
            return False, None
        # returned in RequestOutput.kv_transfer_params: how many placeholder tokens came from the file
        return False, {"cartridge_tokens_loaded": loaded}

    # ---- worker side ------------------------------------------------------------------------------------
    def _kv(self, params: CartridgeParams, like: torch.Tensor) -> list[torch.Tensor]:
        key = (params.path, params.sha256)
        if key in self._resident:
            self._resident.move_to_end(key)
            return self._resident[key]
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        cfg = self._vllm_config.model_config
        total_heads = cfg.get_total_num_kv_heads()
        layers = read_cartridge_kv(
            params.path, cfg.get_num_layers(self._vllm_config.parallel_config), total_heads, cfg.get_head_size()
        )
        if layers[0].shape[1] != params.num_tokens:
            raise ValueError(f"{params.path}: {layers[0].shape[1]} tokens, the request expects {params.num_tokens}")
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        if total_heads >= tp:  # kv heads are split over tensor-parallel ranks
            per_rank, first = total_heads // tp, rank * (total_heads // tp)
        else:  # fewer heads than ranks: each head is replicated on tp / heads ranks
            per_rank, first = 1, rank * total_heads // tp
        kv = [x[:, :, first : first + per_rank].to(like.device, like.dtype).contiguous() for x in layers]
        self.file_reads += 1
        self._resident[key] = kv
        while len(self._resident) > self.max_resident:
            self._resident.popitem(last=False)
        return kv

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, CartridgeConnectorMetadata) or not meta.loads:
            return
        from vllm.model_executor.models.utils import extract_layer_index

        layers = {
            name: layer
            for name, layer in forward_context.no_compile_layers.items()
            if getattr(layer, "kv_cache", None) is not None and hasattr(layer, "impl")
        }
        for load in meta.loads:
            p, bs = load.params.num_tokens, self.block_size
            pos = torch.arange(load.start, p)
            blocks = torch.tensor(load.block_ids, dtype=torch.long)[pos // bs]
            slots = blocks * bs + pos % bs
            for name, layer in layers.items():
                cache = layer.kv_cache
                kv = self._kv(load.params, cache)[extract_layer_index(name)]
                layer.impl.do_kv_cache_update(
                    layer, kv[0, load.start :], kv[1, load.start :], cache, slots.to(cache.device)
                )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # a consumer: nothing is saved

    def wait_for_save(self):
        return


def connector_config(max_resident_cartridges: int = 8):
    """The ``kv_transfer_config`` that makes a vLLM engine read cartridges."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector=CONNECTOR_NAME,
        kv_connector_module_path=__name__,
        kv_role="kv_consumer",
        kv_connector_extra_config={"max_resident_cartridges": max_resident_cartridges},
    )


def adapter_file(cartridge_dir: str | Path) -> Path:
    return Path(cartridge_dir) / "adapter_model.safetensors"
