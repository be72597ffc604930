"""Driver side of training: resolve the dataset, start Ray, run the TorchTrainer, summarise."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..config import TrainConfig
from ..flat_topk import parquet_files, read_flat_topk
from ..fsutil import bundled_data, file_hash
from ..raycluster import check_fits

logger = logging.getLogger(__name__)


def resolve_dataset(cfg: TrainConfig) -> list[Path]:
    """Local flat top-k parquet files for the run (pulling from the hub and converting JSONL as configured)."""
    src = cfg.input_dataset
    if src.local_path:
        path = Path(src.local_path)
        if not path.exists():
            raise FileNotFoundError(f"input_dataset.local_path: {path} does not exist")
    else:
        from ..hub import pull_snapshot

        path = pull_snapshot(src.repo_id, repo_type="dataset", revision=src.revision)
    if src.is_converted:
        files = parquet_files(path / "shards" if (path / "shards").is_dir() else path)
        return [_ours(f, cfg) for f in files]
    jsonl = path if path.is_file() else next(iter(sorted(path.rglob("*.jsonl"))), None)
    if jsonl is None:
        raise FileNotFoundError(f"input_dataset: is_converted=false but no .jsonl file under {path}")
    from ..convert import convert_jsonl

    return [_convert_once(jsonl, cfg, convert_jsonl)]


def preflight(cfg: TrainConfig, tables: dict[Path, pa.Table]) -> int:
    """Every training row validated and the step plan checked, before any Ray worker starts (seconds, not the
    minute a worker group takes to fail); an error names the file, the row and the value. ``tables``: each
    file's rows (:func:`~ray_cartridges.flat_topk.read_flat_topk`). Returns the number of training rows."""
    from ..batching import split_rows
    from ..flat_topk import validate_row
    from ..models import load_tokenizer
    from .loop import plan_steps

    vocab = len(load_tokenizer(cfg.model_name))
    keys = []
    for f, table in tables.items():
        for i, row in enumerate(table.to_pylist()):
            validate_row(row, vocab_size=vocab, where=f"{f}: row {i} (row_id {row['row_id']})")
            if len(row["input_ids"]) <= cfg.training.max_seq_len:
                keys.append({"split_key": row["split_key"]})
    train, _ = split_rows(keys, cfg.input_dataset.eval_fraction, cfg.input_dataset.split_seed)
    plan_steps(cfg, len(train))  # raises when global_batch_size exceeds the training rows
    return len(train)


def _ours(parquet: Path, cfg: TrainConfig) -> Path:
    """A flat top-k file as it is; the research workflow's converted parquet converted into one (once)."""
    from ..record_formats import is_their_parquet

    if not is_their_parquet(parquet):
        return parquet
    from ..convert import convert_their_parquet

    return _convert_once(parquet, cfg, convert_their_parquet)


def _convert_once(source: Path, cfg: TrainConfig, convert) -> Path:
    """``source`` converted to flat top-k under the run's data directory, once per content and top-k."""
    from ..models import load_tokenizer

    k = cfg.training.top_k_logits
    out = Path(cfg.output.local_dir) / "data" / f"converted-{file_hash(source)}-k{k}.parquet"
    if not out.exists():  # written atomically, so an existing file is complete
        stats = convert(
            source,
            out,
            load_tokenizer(cfg.model_name),
            min_prob_mass=cfg.input_dataset.min_prob_mass,
            top_k=k,
            student_system_prompt=cfg.student_system_prompt,
        )
        logger.info("converted %s -> %s: %s", source, out, stats.summary())
    return out


def ensure_ray(address: str | None = None) -> None:
    import ray

    from ..raycluster import init_ray

    if not ray.is_initialized():
        init_ray(address=address, log_to_driver=True)


def run_hash(cfg: TrainConfig, files: list[Path] = (), no_harm_text: str | None = None) -> str:
    """What makes two runs the same run (resuming across a change of these would mix two runs): the config, the
    training files (names and sizes: regenerated teacher data at the same path is another run) and the no-harm
    text."""
    d = cfg.model_dump(
        mode="json",
        exclude={
            "output": {"hf_repo_id", "upload_to_hf", "hf_private", "export_tokasaurus"},
            "wandb": True,
            "scaling": {"max_failures", "storage_path"},
        },
    )
    for key in ("resume", "keep_best", "profile", "save_every", "log_every"):  # none changes what the run computes
        d["training"].pop(key, None)
    d["_data"] = sorted((Path(f).name, Path(f).stat().st_size) for f in files)
    d["_no_harm_text"] = no_harm_text
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def latest_checkpoint(storage: Path, name: str, want_hash: str):
    """The newest checkpoint of an earlier identical run under ``storage/name`` (or None)."""
    best = None
    for prog in Path(storage, name).glob("checkpoint_*/progress.json"):
        try:
            p = json.loads(prog.read_text())
        except ValueError:
            continue
        if p.get("run_hash") == want_hash and (best is None or p["step"] > best[0]):
            best = (p["step"], prog.parent)
    return best


@dataclass(frozen=True)
class ResumePoint:
    """Where a run stands in its output directory."""

    run_hash: str
    run_name: str  # Ray Train's run name: its checkpoints live under storage/run_name
    storage: str
    checkpoint: tuple[int, Path] | None  # (step, directory) of the newest checkpoint of this very run
    finished_steps: int | None  # the run's step count, where the output holds its finished summary

    @property
    def finished(self) -> bool:
        """The output already holds this run to its last step: nothing to train."""
        return bool(self.checkpoint) and self.finished_steps is not None and self.checkpoint[0] >= self.finished_steps


def resume_point(cfg: TrainConfig, files: list[Path], no_harm_text: str | None) -> ResumePoint:
    """The run's hash and Ray run name, and what an identical earlier run left in the output (``cfg`` as
    :func:`prepare_config` returns it)."""
    out_dir = Path(cfg.output.local_dir)
    storage = cfg.scaling.storage_path or str(out_dir / "ray_results")
    rhash = run_hash(cfg, files, no_harm_text)
    # One Ray Train run name per run hash: Ray restores a run from the checkpoints under its name, so another
    # run (other config or data) at the same output must not share it; resume: false gets a name of its own.
    if not cfg.training.resume:
        return ResumePoint(rhash, f"cartridge-train-{rhash}-{time.time_ns()}", storage, None, None)
    name = f"cartridge-train-{rhash}"
    if "://" in storage:  # remote storage is not scanned here
        return ResumePoint(rhash, name, storage, None, None)
    found = latest_checkpoint(Path(storage), name, rhash)
    return ResumePoint(rhash, name, storage, found, _finished_steps(out_dir, rhash))


def run_training(cfg: TrainConfig, max_failures: int | None = None, callbacks: tuple = ()) -> dict:
    """Train a cartridge as configured; returns the run summary (also in ``train_summary.json``).
    ``callbacks``: :class:`~ray_cartridges.train.loop.TrainCallback` objects run in every worker."""
    import ray.data

    from ..models import BUNDLED_MODEL, ensure_bundled_model

    cfg, no_harm_text = prepare_config(cfg)
    out_dir = Path(cfg.output.local_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = resolve_dataset(cfg)
    tables = {f: read_flat_topk(f) for f in files}
    preflight(cfg, tables)
    if cfg.model_name == BUNDLED_MODEL:
        ensure_bundled_model(dtypes=(cfg.model_dtype,))  # once, here, not racing in every worker
    point = resume_point(cfg, files, no_harm_text)
    if point.finished:
        logger.info("%s already holds this run, finished at step %d: nothing to train", out_dir, point.checkpoint[0])
        return _summary(cfg, out_dir, files)
    if point.checkpoint:
        logger.info("resuming from %s (step %d)", point.checkpoint[1], point.checkpoint[0])
    ensure_ray()
    check_fits(*training_resources(cfg))
    ray.data.DataContext.get_current().enable_progress_bars = False  # the loop prints one line per step
    # The tables preflight read, put in the object store as they are (every worker reads all of it): no read
    # tasks, which would add their start-up and could wait forever on a machine whose CPUs the workers hold.
    ds = ray.data.from_arrow(list(tables.values()))
    from .loop import WorkerInputs

    resume_from = str(point.checkpoint[1]) if point.checkpoint else None
    inputs = WorkerInputs(cfg.model_dump(mode="json"), point.run_hash, resume_from, no_harm_text, tuple(callbacks))
    max_failures = cfg.scaling.max_failures if max_failures is None else max_failures
    _fit(_trainer(cfg, inputs, ds, point.run_name, point.storage, max_failures))
    return _summary(cfg, out_dir, files)


def _finished_steps(out_dir: Path, rhash: str) -> int | None:
    """The step count of this very run where ``out_dir`` holds its summary (written once its last step was
    saved); None otherwise. The count comes from the run, so it holds for ``epochs`` as for ``max_steps``."""
    try:
        summary = json.loads((out_dir / "train_summary.json").read_text())
    except (OSError, ValueError):
        return None
    steps = summary.get("steps") if isinstance(summary, dict) and summary.get("run_hash") == rhash else None
    return steps if isinstance(steps, int) else None


def _summary(cfg: TrainConfig, out_dir: Path, files: list[Path]) -> dict:
    """The run's summary as the worker wrote it, with where it read and wrote (and the Tokasaurus export)."""
    summary_path = out_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({"output_dir": str(out_dir), "data_files": [str(f) for f in files]})
    if cfg.output.export_tokasaurus:
        from ..interop import export_tokasaurus

        summary["tokasaurus"] = str(export_tokasaurus(out_dir, out_dir / "tokasaurus", out_dir.name))
    return summary


def prepare_config(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """The config as the workers get it (validated again: ``model_copy`` skips the validators), with what
    was left to decide decided once, here (``auto`` dtype and attention, the output as an absolute path, the init text
    read), and the no-harm text. Texts are shipped as text: workers may run on other nodes or in another cwd."""
    from ..models import resolve_attention, resolve_dtype

    cfg = TrainConfig.model_validate(cfg.model_dump(mode="json"))
    if cfg.model_dtype == "auto":  # the run hash, the workers and the artifact see the result
        cfg = cfg.model_copy(update={"model_dtype": resolve_dtype(cfg.model_dtype, gpu=cfg.scaling.use_gpu)})
        logger.info("model_dtype auto -> %s", cfg.model_dtype)
    if cfg.attn_implementation == "auto":
        attn = resolve_attention(cfg.attn_implementation, gpu=cfg.scaling.use_gpu)
        cfg = cfg.model_copy(update={"attn_implementation": attn})
    out = cfg.output.model_copy(update={"local_dir": str(Path(cfg.output.local_dir).resolve())})
    cfg = cfg.model_copy(update={"output": out})
    kv = cfg.kv_cache
    if kv.method == "text" and not kv.init_text:
        path = Path(kv.init_text_file)
        if not path.is_file():
            raise FileNotFoundError(f"kv_cache.init_text_file: {path} does not exist")
        cfg = cfg.model_copy(update={"kv_cache": kv.model_copy(update={"init_text": path.read_text(encoding="utf-8")})})
    t = cfg.training
    if not t.no_harm_weight > 0:
        return cfg, None
    path = Path(t.no_harm_text_file) if t.no_harm_text_file else bundled_data("general.txt")
    if not path.is_file():
        raise FileNotFoundError(f"training.no_harm_text_file: {path} does not exist")
    return cfg, path.read_text(encoding="utf-8")


def _scaling(cfg: TrainConfig):
    import ray.train

    sc = cfg.scaling
    return ray.train.ScalingConfig(
        num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=sc.resources_per_worker
    )


def training_resources(cfg: TrainConfig) -> tuple[dict[str, float], str]:
    """(the Ray resources the run's workers hold together, what asks for them), for ``raycluster.check_fits``."""
    return _scaling(cfg).total_resources, f"training with scaling.num_workers={cfg.scaling.num_workers}"


def _trainer(cfg: TrainConfig, inputs, ds, run_name: str, storage: str, max_failures: int):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .loop import train_loop_per_worker

    backend = cfg.distributed_backend
    if backend == "auto":
        backend = "nccl" if cfg.scaling.use_gpu else "gloo"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        torch_config=TorchConfig(backend=backend),
        scaling_config=_scaling(cfg),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def _fit(trainer) -> None:
    """``trainer.fit()``; Ctrl-C comes out as KeyboardInterrupt, as everywhere else in the job.

    Ray Train installs a SIGINT handler for the run that aborts it and then exits from inside ``fit``
    (SystemExit), and leaves that handler installed after the run; both are undone here.
    """
    on_sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt from None
    except Exception as err:  # a worker's NaN/inf stop is the user's to read, not a stack of Ray frames
        text = str(err)
        if "NonFiniteError: " in text:
            from .loop import NonFiniteError

            raise NonFiniteError(text.split("NonFiniteError: ", 1)[1].splitlines()[0]) from None
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_sigint)


def format_summary(summary: dict) -> str:
    out = Path(summary["output_dir"])
    final = summary.get("final", {})
    lines = [
        "",
        "=== cartridge training finished ===",
        f"  cartridge (PEFT adapter): {out}  ->  PeftModel.from_pretrained(base_model, '{out}')",
        f"  export:                   {out / 'cache-final.pt'}",
        f"  metrics / plot:           {out / 'metrics.jsonl'}, {out / 'loss.png'}",
        f"  steps: {summary.get('steps')}  train rows: {summary.get('train_rows')}  eval rows: {summary.get('eval_rows')}",
    ]
    if "train/loss" in final:
        lines.append(f"  final train KD loss: {final['train/loss']:.4f}")
    if "eval/loss" in final:
        lines.append(f"  final held-out KD loss: {final['eval/loss']:.4f}")
    if summary.get("tokasaurus"):
        lines.append(f"  Tokasaurus layout:        {summary['tokasaurus']}")
    if summary.get("best"):
        b = summary["best"]
        lines.append(f"  best held-out KD loss:  {b['eval/loss']:.4f} at step {b['step']}  ->  {out / 'best'}")
    if "train/tokens_per_s" in final:
        lines.append(f"  throughput (last step): {final['train/tokens_per_s']:.0f} tokens/s")
    return "\n".join(lines)
