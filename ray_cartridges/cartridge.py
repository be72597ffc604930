"""The cartridge: a trainable KV prefix stored as a PEFT CARTRIDGE adapter.

Layout (PEFT's): one flattened tensor ``[p, num_layers * 2 * kv_heads * head_dim]``; per virtual token,
layer l's key is slot ``2l`` and its value slot ``2l + 1``. Keys are post-RoPE at positions ``0..p-1``;
PEFT shifts the positions of the real tokens by ``p``. The first ``num_frozen_tokens`` are frozen.

On disk a cartridge directory holds the PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained``), ``cartridge.json`` (what
the cartridge fits: model, layers, kv heads, head_dim, vocab, tokenizer fingerprint, plus provenance)
and optionally ``cache-*.pt`` exports in the Cartridges layout.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .fsutil import atomic_path

META_FILE = "cartridge.json"
FORMAT_VERSION = 1


class CartridgeMismatchError(ValueError):
    """A cartridge was made for a different model or tokenizer."""


@dataclass
class ModelShape:
    """What a cartridge must agree on with the model that reads it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, model) -> ModelShape:
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.num_hidden_layers, kv_heads, head_dim, cfg.vocab_size)


@dataclass
class CartridgeMeta:
    model_name: str
    shape: ModelShape
    num_tokens: int
    num_frozen_tokens: int
    tokenizer_fingerprint: str | None = None
    model_revision: str | None = None
    init_method: str = "random"
    student_system_prompt: str | None = None
    extra: dict = field(default_factory=dict)  # data hash, metrics, step, ...
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> CartridgeMeta:
        try:
            d = json.loads(path.read_text())
            d["shape"] = ModelShape(**d["shape"])
            return cls(**d)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{path}: not a valid cartridge metadata file ({err})") from None


def check_compatible(meta: CartridgeMeta, model, tokenizer=None, source: str = "cartridge") -> None:
    """Raise :class:`CartridgeMismatchError` naming every field where cartridge and model disagree."""
    have = ModelShape.of(model)
    problems = [
        f"{name}: cartridge has {getattr(meta.shape, name)}, model has {getattr(have, name)}"
        for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")
        if getattr(meta.shape, name) != getattr(have, name)
    ]
    if tokenizer is not None and meta.tokenizer_fingerprint:
        from .models import tokenizer_fingerprint

        fp = tokenizer_fingerprint(tokenizer)
        if fp != meta.tokenizer_fingerprint:
            problems.append(f"tokenizer fingerprint: cartridge has {meta.tokenizer_fingerprint}, tokenizer has {fp}")
    if problems:
        raise CartridgeMismatchError(
            f"{source} was made for model {meta.model_name!r} and does not fit this model:\n  " + "\n  ".join(problems)
        )


def _peft_config(num_tokens: int, num_frozen_tokens: int, inference: bool = False):
    from peft import CartridgeConfig

    return CartridgeConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_tokens,
        num_frozen_tokens=num_frozen_tokens,
        inference_mode=inference,
    )


def encoder(peft_model):
    """The CARTRIDGE prompt encoder of the active adapter."""
    return peft_model.prompt_encoder[peft_model.active_adapter]


@torch.no_grad()
def _prefill_kv(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Prefill ``input_ids`` [1, p] on the base model, return PEFT's flattened layout [p, L*2*H*D] (fp32)."""
    from peft.tuners.cartridge.utils import prompt_embeddings_from_past_key_values

    out = model(input_ids=input_ids.to(model.device), use_cache=True)
    return prompt_embeddings_from_past_key_values(out.past_key_values, num_virtual_tokens=input_ids.shape[1]).float()


def init_token_ids(tokenizer, text: str, num_tokens: int) -> torch.Tensor:
    """First ``num_tokens`` tokens of ``text`` (plain tokenization, no chat template) as [1, p]."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < num_tokens:
        raise ValueError(
            f"kv_cache.method=text: the init text has {ids.shape[1]} tokens, fewer than kv_cache.num_tokens="
            f"{num_tokens}; use a longer text, fewer tokens, or method=random"
        )
    return ids[:, :num_tokens]


def create_cartridge(
    model,
    *,
    num_tokens: int,
    num_frozen_tokens: int = 1,
    method: str = "random",
    tokenizer=None,
    text: str | None = None,
    seed: int = 0,
):
    """Wrap a frozen model with a new cartridge.

    ``text``: the KV of the first p tokens of ``text`` (so the cartridge reproduces the model reading ``text``).
    ``random``: the KV of p tokens drawn uniformly from the vocabulary with ``seed``; this keeps keys and
    values on the scale the model expects, which N(0, 1) vectors do not.
    """
    from peft import get_peft_model

    if method == "text":
        if tokenizer is None or text is None:
            raise ValueError("method=text needs a tokenizer and a text")
        ids = init_token_ids(tokenizer, text, num_tokens)
    elif method == "random":
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, ModelShape.of(model).vocab_size, (1, num_tokens), generator=gen)
    else:
        raise ValueError(f"kv_cache.method must be 'random' or 'text', got {method!r}")
    flat = _prefill_kv(model, ids)
    peft_model = get_peft_model(model, _peft_config(num_tokens, num_frozen_tokens))
    encoder(peft_model).load_prompt_embeddings(flat)
    return peft_model


def layer_kv(peft_model, weight: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V), each [num_kv_heads, p, head_dim] (views of the adapter weights, or of ``weight``)."""
    cfg = peft_model.peft_config[peft_model.active_adapter]
    w = encoder(peft_model).weight if weight is None else weight  # [p, L*2*H*D]
    p = w.shape[0]
    heads = cfg.num_attention_heads
    w = w.view(p, cfg.num_layers * 2, heads, cfg.token_dim // heads).permute(1, 2, 0, 3)  # [2L, H, p, D]
    return [(w[2 * i], w[2 * i + 1]) for i in range(cfg.num_layers)]


def save_cartridge(
    peft_model,
    out_dir: str | Path,
    meta: CartridgeMeta,
    export_pt: str | None = None,
    weight: torch.Tensor | None = None,
) -> Path:
    """Write the adapter, ``cartridge.json`` and optionally a ``.pt`` export into ``out_dir``.

    Files are written into a temporary directory first and each is renamed into place, so a reader never
    sees a half-written file; other files already in ``out_dir`` (metrics, plots) are left alone.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cartridge.tmp-", dir=out_dir))
    try:
        if weight is None:
            peft_model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            _write_adapter(peft_model, tmp, weight)
        _record_hub_base(tmp / "adapter_config.json", meta.model_name)
        (tmp / META_FILE).write_text(meta.to_json())
        if export_pt:
            export_cache_pt(peft_model, tmp / export_pt, weight)
        # metadata last: a directory with cartridge.json has complete weights
        names = sorted((f.name for f in tmp.iterdir()), key=lambda n: n == META_FILE)
        for name in names:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _record_hub_base(adapter_config: Path, model_name: str) -> None:
    """``base_model_name_or_path`` as a hub id where one is known (PEFT writes the local path it loaded)."""
    from .models import hub_model_id

    d = json.loads(adapter_config.read_text())
    d["base_model_name_or_path"] = hub_model_id(model_name)
    adapter_config.write_text(json.dumps(d, indent=2, sort_keys=True))


def _write_adapter(peft_model, out: Path, weight: torch.Tensor) -> None:
    """The PEFT adapter files (config + ``prompt_embeddings``) from a given full cartridge weight.

    What ``save_pretrained`` writes for a prompt-learning adapter, without touching the module: under
    ZeRO-3 PEFT's own save gathers the partitioned parameter, a collective that only the writing rank would
    enter (the other ranks then hang in their next forward).
    """
    import copy

    from safetensors.torch import save_file

    cfg = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    if cfg.base_model_name_or_path is None:
        cfg.base_model_name_or_path = getattr(peft_model.base_model, "name_or_path", None)
    cfg.inference_mode = True
    cfg.save_pretrained(str(out))
    save_file(
        {"prompt_embeddings": weight.detach().cpu().contiguous()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


def export_cache_pt(peft_model, path: str | Path, weight: torch.Tensor | None = None) -> None:
    """Cartridges-layout export: per layer trainable/frozen keys and values, each [1, H, n, D], on the CPU
    (a file written by a GPU worker loads on a machine without one).

    ``weight``: the full flattened cartridge, where the module's own parameters are partitioned (ZeRO-3)."""
    n_frozen = encoder(peft_model).num_frozen_tokens
    kv = layer_kv(peft_model, weight)
    state = {
        "trainable_keys": [k[:, n_frozen:].unsqueeze(0).detach().cpu().clone().contiguous() for k, _ in kv],
        "trainable_values": [v[:, n_frozen:].unsqueeze(0).detach().cpu().clone().contiguous() for _, v in kv],
        "frozen_keys": [k[:, :n_frozen].unsqueeze(0).detach().cpu().clone().contiguous() for k, _ in kv],
        "frozen_values": [v[:, :n_frozen].unsqueeze(0).detach().cpu().clone().contiguous() for _, v in kv],
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_tensors_only(path: str | Path, what: str, allowed: Sequence[type] = (), map_location="cpu"):
    """``torch.load(weights_only=True)``, with ``allowed`` classes permitted besides tensors and containers.

    A file holding any other object is refused, never unpickled; that, or a file ``torch.save`` did not write, is
    a ValueError naming the file, ``what`` it was read as, and the reason (the class refused, or the format error).
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: refused to load {what}: {_refusal(err)}") from None


def _refusal(err: Exception) -> str:
    """The line of torch's load error that says why (its advice to load with ``weights_only=False`` is dropped)."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds {found.group(1)} (not a tensor); only tensors are loaded"
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    detail = next((x for x in lines if "Unsupported" in x), lines[-1] if lines else "the file ended early")
    return f"not a file of tensors written by torch.save ({detail})"


def load_cache_pt(path: str | Path) -> dict[str, list[torch.Tensor]]:
    """Load a ``cache-*.pt`` export safely (tensors only)."""
    return load_tensors_only(path, "a cartridge export")


def read_meta(cartridge_dir: str | Path) -> CartridgeMeta:
    path = Path(cartridge_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{cartridge_dir}: no {META_FILE}; is this a ray_cartridges cartridge directory?")
    return CartridgeMeta.from_file(path)


def load_cartridge(model, cartridge_dir: str | Path, tokenizer=None, trainable: bool = False):
    """Attach a saved cartridge to ``model`` after checking that it fits (returns a PeftModel)."""
    from peft import PeftModel

    cartridge_dir = Path(cartridge_dir)
    meta = read_meta(cartridge_dir)
    check_compatible(meta, model, tokenizer, source=str(cartridge_dir))
    weights = cartridge_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (a cartridge directory holds the PEFT adapter weights)")
    try:
        return PeftModel.from_pretrained(model, str(cartridge_dir), is_trainable=trainable)
    except Exception as err:  # truncated file, wrong shapes: name the file, not PEFT's frames
        raise ValueError(f"{weights}: cannot load the cartridge ({type(err).__name__}: {err})") from None
