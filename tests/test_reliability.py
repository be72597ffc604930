"""Nothing silently wrong: bad teacher data is refused where it enters, with the file, row, position and value;
training stops on a NaN; errors of bad paths and files name them."""

import copy
import json
import math
import time

import pyarrow.parquet as pq
import pytest
from helpers import bundled_meta, small_train_config

from ray_cartridges.convert import ConversionError, convert_jsonl, convert_record
from ray_cartridges.flat_topk import FlatTopkError, validate_row


def _record(teacher_jsonl):
    return json.loads(teacher_jsonl.read_text().splitlines()[0])


def _poison(rec, j=3, r=None, **entry):
    rec = copy.deepcopy(rec)
    e = rec["messages"][-1]["logprobs"]["content"][j]
    (e if r is None else e["top_logprobs"][r]).update(entry)
    return rec


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"logprob": math.nan}, "logprob nan is not finite"),
        ({"logprob": math.inf}, "logprob inf is not finite"),
        ({"logprob": 0.5}, "logprob 0.5 > 0"),
        ({"token_id": 10_000_000}, "token id 10000000 is outside the vocabulary"),
    ],
)
def test_convert_refuses_bad_teacher_entries_naming_line_and_position(
    teacher_jsonl, tokenizer, tmp_path, entry, message
):
    bad = _poison(_record(teacher_jsonl), j=3, r=1, **entry)
    with pytest.raises(ConversionError, match=message) as err:
        convert_record(bad, tokenizer, where="data.jsonl:7")
    assert "data.jsonl:7" in str(err.value) and "token position 3" in str(err.value)
    # a whole file: the bad line is skipped and counted (strict stops there); the good ones are kept
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(_record(teacher_jsonl)) + "\n" + json.dumps(bad) + "\n")
    stats = convert_jsonl(src, tmp_path / "out.parquet", tokenizer, progress=False)
    assert stats.rows == 1 and stats.rejected == 1 and f"{src}:2" in stats.errors[0]
    with pytest.raises(ConversionError, match=f"{src}:2"):
        convert_jsonl(src, tmp_path / "strict.parquet", tokenizer, strict=True, progress=False)
    assert not (tmp_path / "strict.parquet").exists()


def test_rounding_above_zero_is_clamped_and_the_row_validates(teacher_jsonl, tokenizer):
    row = convert_record(_poison(_record(teacher_jsonl), j=0, r=0, logprob=2e-4), tokenizer)
    assert max(row["topk_logprobs"]) <= 0
    validate_row(row, vocab_size=len(tokenizer))


def test_a_row_with_an_unsorted_or_foreign_entry_is_refused(teacher_jsonl, tokenizer):
    row = convert_record(_record(teacher_jsonl), tokenizer)
    swapped = copy.deepcopy(row)
    swapped["topk_logprobs"][0], swapped["topk_logprobs"][1] = row["topk_logprobs"][1], row["topk_logprobs"][0]
    if row["topk_pos"][0] == row["topk_pos"][1] and row["topk_logprobs"][0] > row["topk_logprobs"][1] + 1e-5:
        with pytest.raises(FlatTopkError, match="not sorted"):
            validate_row(swapped, where="f.parquet: row 0")
    foreign = copy.deepcopy(row)
    foreign["topk_ids"][2] = 10_000_000
    with pytest.raises(FlatTopkError, match=r"f.parquet: row 0: topk_ids\[2\] = 10000000 at token position"):
        validate_row(foreign, vocab_size=len(tokenizer), where="f.parquet: row 0")


def _write_rows(path, rows):
    from ray_cartridges.flat_topk import SCHEMA, rows_to_table

    pq.write_table(rows_to_table(rows).cast(SCHEMA), path)  # bypasses the writer's own validation
    return path


def test_training_refuses_bad_data_and_too_large_batches_before_ray_starts(
    tmp_path, teacher_jsonl, tokenizer, memory, tiny_model_dir
):
    import ray

    from ray_cartridges.train import run_training

    rows = [convert_record(json.loads(x), tokenizer) for x in teacher_jsonl.read_text().splitlines()]
    bad = copy.deepcopy(rows)
    bad[5]["topk_logprobs"][4] = math.nan
    data = _write_rows(tmp_path / "bad.parquet", bad)
    cfg = small_train_config(tmp_path, data, memory, 1, "bad", model_name=tiny_model_dir)
    cfg.input_dataset.is_converted = True
    was_running = ray.is_initialized()
    t0 = time.perf_counter()
    with pytest.raises(FlatTopkError, match=rf"{data}: row 5 \(row_id .*\): topk_logprobs\[4\] = nan"):
        run_training(cfg)
    good = _write_rows(tmp_path / "good.parquet", rows)
    cfg = small_train_config(tmp_path, good, memory, 1, "big", model_name=tiny_model_dir, global_batch_size=4096)
    cfg.input_dataset.is_converted = True
    with pytest.raises(ValueError, match="global_batch_size=4096 exceeds the"):
        run_training(cfg)
    assert time.perf_counter() - t0 < 30 and ray.is_initialized() == was_running
    assert not (tmp_path / "big" / "ray_results").exists() and not (tmp_path / "bad" / "cartridge.json").exists()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_nan_loss_stops_training_with_no_artifact(tmp_path, ray_cluster, teacher_jsonl, memory, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_cartridges.train import run_training
    from ray_cartridges.train.loop import NonFiniteError

    broken = tmp_path / "broken-student"  # a student checkpoint with a NaN weight: its loss is NaN from step 1
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        m.model.norm.weight[0] = float("nan")
    m.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken)
    cfg = small_train_config(tmp_path, teacher_jsonl, memory, 1, "nan", model_name=broken)
    with pytest.raises(NonFiniteError, match=r"at step \d+; the rows of this batch: "):
        run_training(cfg, max_failures=0)
    out = tmp_path / "nan"
    assert not (out / "cartridge.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_a_memory_file_that_is_not_utf8_is_named(tmp_path):
    import shutil

    from helpers import EXAMPLE_CHECKPOINT

    from ray_cartridges.memory import CheckpointError, read_memory

    ck = tmp_path / "ck"
    shutil.copytree(EXAMPLE_CHECKPOINT, ck, symlinks=True)
    mem = next((ck / "checkpoints" / "ep_000030").glob("memory_*.jsonl"))
    mem.write_bytes(mem.read_bytes()[:100] + b"\xff\xfe" + mem.read_bytes()[100:])
    with pytest.raises(CheckpointError, match=rf"{mem}: not UTF-8 text \(byte 0xff at offset 100"):
        read_memory(ck)


def test_a_path_is_never_taken_for_a_hub_id_and_a_broken_cartridge_names_its_file(tmp_path, model, tokenizer):
    from ray_cartridges.agent import KVArtifact
    from ray_cartridges.cartridge import create_cartridge, load_cartridge, save_cartridge
    from ray_cartridges.hub import cartridge_source

    assert cartridge_source("outputs/demo/cartridge") == "local"
    assert cartridge_source("./cart") == "local" and cartridge_source("/tmp/x") == "local"
    assert cartridge_source("acme/station-cartridge") == "huggingface"
    with pytest.raises(FileNotFoundError, match="cartridge directory not found: outputs/none/cartridge"):
        KVArtifact("outputs/none/cartridge", source=cartridge_source("outputs/none/cartridge")).local_dir()

    pm = create_cartridge(model, num_tokens=8, method="random")
    save_cartridge(pm, tmp_path / "c", bundled_meta(model, tokenizer, 8))
    weights = tmp_path / "c" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    from ray_cartridges.models import load_model

    with pytest.raises(ValueError, match=rf"{weights}: cannot load the cartridge"):
        load_cartridge(load_model("smollm2-135m-instruct"), tmp_path / "c", tokenizer)


def test_ctrl_c_during_fit_is_a_keyboard_interrupt_and_the_sigint_handler_is_restored():
    """Ray Train's SIGINT handler aborts the run by exiting from inside ``fit`` and stays installed after it:
    the job must see KeyboardInterrupt (its "interrupted, re-run resumes" exit) and get its own handler back."""
    import os
    import signal
    import sys

    from ray_cartridges.train.driver import _fit

    class RayLikeTrainer:
        def fit(self):
            signal.signal(signal.SIGINT, lambda *_: sys.exit(0))  # what Ray Train installs for the run
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _fit(RayLikeTrainer())
    assert signal.getsignal(signal.SIGINT) is before
