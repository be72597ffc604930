"""The distill job's closing summary says what was written, and offers a chat only where a cartridge exists."""

import importlib.util

from helpers import REPO


def _distill():
    spec = importlib.util.spec_from_file_location("distill_job", REPO / "jobs" / "distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_offers_chat_only_with_a_cartridge(tmp_path):
    distill = _distill()
    gen = {"parquet_shards": str(tmp_path / "data" / "shards"), "rows": 204}
    report = {"seconds": 354.0, "stages": {"generate": gen}}
    out = tmp_path / "cartridge"
    text = distill.final_summary(out, None, report)  # training skipped: nothing to chat with
    assert "no cartridge yet" in text and "Chat with it" not in text and str(out) not in text
    assert f"{gen['parquet_shards']} (204 conversations)" in text and "5.9 min (generate)" in text

    out.mkdir()
    (out / "cartridge.json").write_text("{}")
    text = distill.final_summary(out, None, {"seconds": 60.0, "stages": {"train": {}}})
    assert f"Cartridge: {out}" in text and f"ray-cartridges chat --cartridge {out}" in text
