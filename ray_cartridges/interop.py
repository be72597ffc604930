"""The research workflow's cartridge files, both ways: the Cartridges trainer's ``.pt`` and Tokasaurus's layout.

Cartridges (``TrainableCache``): ``trainable_keys`` / ``trainable_values``, per layer a ``[1, H, n, D]`` tensor
(saved as ``nn.ParameterList``), plus the frozen first tokens as ``frozen_keys`` / ``frozen_values``
(``fixed_keys`` / ``fixed_values`` in an earlier release). Keys are post-RoPE at positions 0..p-1, as ours.
Tokasaurus (cartridge branch): ``<dir>/<id>/cartridge.pt`` in that layout and a ``config.yaml`` holding
``kv_cache_initializer.max_tokens`` and ``model.pretrained_model_name_or_path``; it pages KV in blocks of 16.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch

from .cartridge import (
    CartridgeMeta,
    CartridgeMismatchError,
    ModelShape,
    encoder,
    load_tensors_only,
    save_cartridge,
)
from .fsutil import atomic_path

logger = logging.getLogger(__name__)

FROZEN_NAMES = (("frozen_keys", "frozen_values"), ("fixed_keys", "fixed_values"))
TOKASAURUS_PAGE = 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_cartridges_pt(path: str | Path) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Per layer K and V ``[H, p, D]`` (frozen tokens first, fp32) and the number of frozen tokens.

    Loaded with ``weights_only=True``; the only classes allowed besides tensors are the containers the
    trainer saves (``nn.ParameterList``, ``OrderedDict``), so a file holding anything else is refused."""
    path = Path(path)
    state = load_tensors_only(path, "a Cartridges .pt", [torch.nn.ParameterList, OrderedDict, set])
    if not isinstance(state, dict) or "trainable_keys" not in state or "trainable_values" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected trainable_keys / trainable_values (has {keys})")
    tk, tv = list(state["trainable_keys"]), list(state["trainable_values"])
    fk = fv = None
    for k, v in FROZEN_NAMES:
        if k in state:
            fk, fv = list(state[k]), list(state[v])
            break
    if fk is None:  # no frozen part saved
        fk, fv = [None] * len(tk), [None] * len(tk)
    if not (len(tk) == len(tv) == len(fk) == len(fv)):
        raise ValueError(f"{path}: the key and value lists have different numbers of layers")

    def whole(frozen, trainable):
        parts = [x for x in (frozen, trainable) if x is not None]
        t = torch.cat([x.detach().float() for x in parts], dim=2)  # [1, H, p, D]
        if t.ndim != 4 or t.shape[0] != 1:
            raise ValueError(f"{path}: a layer tensor has shape {tuple(t.shape)}, expected [1, H, n, D]")
        return t[0]

    keys = [whole(f, t) for f, t in zip(fk, tk)]
    values = [whole(f, t) for f, t in zip(fv, tv)]
    n_frozen = 0 if fk[0] is None else int(fk[0].shape[2])
    return keys, values, n_frozen


def flat_weight(keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """PEFT's flattened layout ``[p, L * 2 * H * D]`` from per-layer K, V ``[H, p, D]`` (inverse of layer_kv)."""
    stacked = torch.stack([x for kv in zip(keys, values) for x in kv])  # [2L, H, p, D]
    return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1).contiguous()


def import_cartridge(pt_file: str | Path, model_name: str, out_dir: str | Path) -> Path:
    """A Cartridges ``.pt`` as one of our cartridge directories (PEFT adapter + cartridge.json) for ``model_name``."""
    from peft import get_peft_model

    from .cartridge import _peft_config
    from .models import load_model, load_tokenizer, tokenizer_fingerprint

    keys, values, n_frozen = read_cartridges_pt(pt_file)
    model, tok = load_model(model_name), load_tokenizer(model_name)
    have = ModelShape.of(model)
    got = {"num_layers": len(keys), "num_kv_heads": keys[0].shape[0], "head_dim": keys[0].shape[2]}
    problems = [f"{k}: file has {v}, model has {getattr(have, k)}" for k, v in got.items() if v != getattr(have, k)]
    if problems:
        raise CartridgeMismatchError(f"{pt_file} does not fit {model_name}:\n  " + "\n  ".join(problems))
    p = keys[0].shape[1]
    peft_model = get_peft_model(model, _peft_config(p, n_frozen))
    encoder(peft_model).load_prompt_embeddings(flat_weight(keys, values))
    meta = CartridgeMeta(
        model_name=model_name,
        shape=have,
        num_tokens=p,
        num_frozen_tokens=n_frozen,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        init_method="imported",
        extra={"imported_from": str(pt_file)},
    )
    return save_cartridge(peft_model, out_dir, meta)


def cartridges_state(keys, values, n_frozen: int, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    """The Cartridges layout of per-layer K, V ``[H, p, D]``: each entry ``[1, H, n, D]`` in ``dtype``."""

    def part(xs, a, b):
        return [x[:, a:b].unsqueeze(0).to(dtype).contiguous() for x in xs]

    p = keys[0].shape[1]
    return {
        "trainable_keys": part(keys, n_frozen, p),
        "trainable_values": part(values, n_frozen, p),
        "frozen_keys": part(keys, 0, n_frozen),
        "frozen_values": part(values, 0, n_frozen),
    }


def _cartridge_kv(cartridge_dir: Path) -> tuple[list[torch.Tensor], list[torch.Tensor], CartridgeMeta]:
    from .cartridge import read_meta
    from .vllm_cartridges.connector import adapter_file, read_cartridge_kv

    meta = read_meta(cartridge_dir)
    s = meta.shape
    kv = read_cartridge_kv(str(adapter_file(cartridge_dir)), s.num_layers, s.num_kv_heads, s.head_dim)
    # read_cartridge_kv gives [2, p, H, D] per layer; the Cartridges layout is [H, p, D]
    return [x[0].transpose(0, 1) for x in kv], [x[1].transpose(0, 1) for x in kv], meta


def _save_pt(state: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def export_cartridges_pt(cartridge_dir: str | Path, out_file: str | Path, dtype: str = "fp32") -> Path:
    """Our cartridge as the Cartridges trainer's ``.pt`` (tensors in ``dtype``; bf16 is what it saves)."""
    keys, values, meta = _cartridge_kv(Path(cartridge_dir))
    _save_pt(cartridges_state(keys, values, meta.num_frozen_tokens, DTYPES[dtype]), Path(out_file))
    return Path(out_file)


def export_tokasaurus(cartridge_dir: str | Path, out_root: str | Path, cartridge_id: str, dtype: str = "bf16") -> Path:
    """``<out_root>/<id>/cartridge.pt`` + ``config.yaml`` as Tokasaurus's cartridge branch reads them."""
    import yaml

    from .fsutil import write_text_atomic
    from .models import hub_model_id

    keys, values, meta = _cartridge_kv(Path(cartridge_dir))
    if meta.num_tokens % TOKASAURUS_PAGE:
        logger.warning(
            "cartridge has %d tokens, not a multiple of Tokasaurus's page size %d: it pads or refuses it",
            meta.num_tokens,
            TOKASAURUS_PAGE,
        )
    out = Path(out_root) / cartridge_id
    _save_pt(cartridges_state(keys, values, meta.num_frozen_tokens, DTYPES[dtype]), out / "cartridge.pt")
    cfg = {
        "kv_cache_initializer": {"max_tokens": meta.num_tokens, "num_frozen_tokens": meta.num_frozen_tokens},
        "model": {"pretrained_model_name_or_path": hub_model_id(meta.model_name)},
    }
    write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return out


__all__ = [
    "export_cartridges_pt",
    "export_tokasaurus",
    "flat_weight",
    "import_cartridge",
    "read_cartridges_pt",
]
