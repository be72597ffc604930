from pathlib import Path

import pytest

from ray_cartridges.config import ConfigError, DistillConfig, GenerateConfig, TrainConfig, load_config
from ray_cartridges.config.reference import config_reference

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def config_class(path: Path):
    import yaml

    data = yaml.safe_load(path.read_text())
    if "cartridges" in data:
        from ray_cartridges.config.serve import ServeConfig

        return ServeConfig
    if "generate" in data:
        return DistillConfig
    if "checkpoint_dir" in data:
        return GenerateConfig
    if "input_dataset" in data:
        return TrainConfig
    return None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_validates(path):
    cls = config_class(path)
    assert cls is not None, f"{path}: no config class recognises this file"
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)


def test_seed_key_names_stay_valid():
    cfg = load_config(TrainConfig, REPO / "configs/distillation/cartridge_train_example.yaml")
    assert cfg.input_dataset.repo_id and cfg.input_dataset.is_converted is False
    assert cfg.kv_cache.method == "random" and cfg.kv_cache.num_tokens == 128 and cfg.kv_cache.num_frozen_tokens == 1
    assert cfg.training.lr == pytest.approx(1e-4)  # YAML reads `1e-4` as a string; it must still parse
    assert cfg.training.top_k_logits == 20 and cfg.training.global_batch_size == 8
    gen = load_config(GenerateConfig, REPO / "configs/distillation/example_gen.yaml")
    assert gen.top_logprobs == 20 and gen.num_threads >= 1


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "input_dataset: {local_path: x.parquet}\noutput: {local_dir: out}\n"


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, BASE + "training: {epohcs: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    assert "training.epohcs" in str(e.value) and str(p) in str(e.value) and "unknown key" in str(e.value)


def test_missing_key_names_key_and_type(tmp_path):
    p = _write(tmp_path, "input_dataset: {local_path: x.parquet}\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    assert "output" in str(e.value) and "missing" in str(e.value) and str(p) in str(e.value)


def test_mistyped_value_names_value_and_expected_type(tmp_path):
    p = _write(tmp_path, BASE + "kv_cache: {num_tokens: lots}\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    msg = str(e.value)
    assert "kv_cache.num_tokens" in msg and "'lots'" in msg and "int" in msg


def test_cross_field_rule(tmp_path):
    p = _write(tmp_path, BASE + "kv_cache: {num_tokens: 4, num_frozen_tokens: 9}\n")
    with pytest.raises(ConfigError, match="num_frozen_tokens"):
        load_config(TrainConfig, p)


def test_score_engine_vllm_needs_the_vllm_engine(tmp_path):
    p = _write(tmp_path, "checkpoint_dir: ck\nengine: transformers\nscore_engine: vllm\n")
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, p)
    assert "score_engine" in str(e.value) and "'transformers'" in str(e.value) and str(p) in str(e.value)
    assert load_config(GenerateConfig, p, ["engine=vllm"]).score_engine == "vllm"


def test_block_size_resolves_per_device_and_a_cpu_misfit_names_field_and_file(tmp_path):
    """auto: vLLM's smallest CPU block (finer prefix reuse) on CPU, vLLM's own choice on GPUs and never for the
    transformers engine; a CPU block that vLLM's CPU attention cannot take is refused before any engine starts."""
    from ray_cartridges.generate.teacher import resolved_config

    p = _write(tmp_path, "checkpoint_dir: ck\n")
    assert resolved_config(load_config(GenerateConfig, p)).block_size == 32
    assert resolved_config(load_config(GenerateConfig, p, ["use_gpu=true"])).block_size is None
    assert resolved_config(load_config(GenerateConfig, p, ["engine=transformers"])).block_size is None
    assert resolved_config(load_config(GenerateConfig, p, ["block_size=64"])).block_size == 64
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, p, ["block_size=48"])
    assert "block_size" in str(e.value) and "48" in str(e.value) and str(p) in str(e.value)
    assert load_config(GenerateConfig, p, ["block_size=48", "use_gpu=true"]).block_size == 48


def test_a_serve_block_size_cpu_attention_cannot_take_is_refused(tmp_path):
    """Replicas without a GPU run vLLM's CPU attention: a block that is not a multiple of 32 fails there, so the
    config refuses it up front, naming field, value and file; GPU replicas take any block size."""
    from ray_cartridges.config.serve import ServeConfig

    p = _write(tmp_path, "cartridges: {demo: outputs/demo/cartridge}\n")
    assert load_config(ServeConfig, p, ["block_size=64"]).block_size == 64
    with pytest.raises(ConfigError) as e:
        load_config(ServeConfig, p, ["block_size=48"])
    assert "block_size" in str(e.value) and "48" in str(e.value) and str(p) in str(e.value)
    assert load_config(ServeConfig, p, ["block_size=48", "num_gpus_per_replica=1"]).block_size == 48


def test_overrides_apply_and_validate(tmp_path):
    p = _write(tmp_path, BASE)
    cfg = load_config(TrainConfig, p, ["training.lr=3e-3", "kv_cache.num_tokens=64", "scaling.num_workers=2"])
    assert cfg.training.lr == pytest.approx(3e-3) and cfg.kv_cache.num_tokens == 64 and cfg.scaling.num_workers == 2
    with pytest.raises(ConfigError, match="training.nope"):
        load_config(TrainConfig, p, ["training.nope=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(TrainConfig, p, ["training.lr"])


def test_every_field_has_help():
    for stage in ("train", "generate", "distill", "serve"):
        ref = config_reference(stage)
        rows = [line for line in ref.splitlines() if line.startswith("| `")]
        assert rows
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split(" | ")]
            assert cells[1] == "section" or cells[-1], f"no description for {cells[0]}"
            assert "Annotated" not in cells[1] and "Literal" not in cells[1], f"{cells[0]}: type {cells[1]}"


def test_config_reference_document_is_up_to_date():
    """docs/CONFIG.md is generated from the models: a field added or changed without `make docs` fails here."""
    from pathlib import Path

    from ray_cartridges.config.reference import full_reference

    doc = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
    assert doc.read_text() == full_reference(), "docs/CONFIG.md is stale: run `make docs`"
    assert "`training.keep_best`" in doc.read_text() and "`stages.generate`" in doc.read_text()


def test_auto_dtype_is_bf16_only_where_bf16_is_fast(monkeypatch):
    from ray_cartridges import models

    assert models.resolve_dtype("bfloat16") == "bf16" and models.resolve_dtype("fp32", gpu=True) == "fp32"
    assert models.resolve_dtype("auto", gpu=True) == "bf16"
    for flags, want in (
        ("fpu avx2 avx512f", "fp32"),
        ("fpu avx512f avx512_bf16", "bf16"),
        ("amx_bf16 amx_tile", "bf16"),
    ):
        monkeypatch.setattr(models.Path, "read_text", lambda self, flags=flags: f"flags\t\t: {flags}\n")
        assert models.resolve_dtype("auto") == want, flags
    # "avx512_bf16" must be a whole flag, not a substring of another
    monkeypatch.setattr(models.Path, "read_text", lambda self: "flags\t\t: avx512_bf16x\n")
    assert models.resolve_dtype("auto") == "fp32"
