"""The development-set benchmark's aggregation: what the targets are checked on."""

import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fidelity_set as fs  # noqa: E402


def _row(memory, gap, held, seen=None, harm=0.99):
    return {
        "memory": memory,
        "gap": gap,
        "gap_base": gap + 0.05,
        "heldout_recall": {"cartridge": held[0], "icl": held[1], "no_memory": 0.0},
        "seen_recall": None if seen is None else {"cartridge": seen[0], "icl": seen[1], "no_memory": 0.0},
        "chat_harm": harm,
    }


def test_the_set_is_judged_on_means_of_its_memories_and_seen_recall_only_where_a_memory_asks_questions():
    rows = [
        _row("demo", 0.8, (0.3, 0.6), seen=(0.5, 0.7), harm=0.98),
        _row("team_qa", 0.6, (0.2, 0.2), seen=(0.7, 0.4), harm=1.02),
        _row("documents", 0.9, (0.1, 0.4)),  # a corpus asks no questions of its own
        _row("assistant_log", 0.7, (0.0, 0.0)),  # ICL recalls nothing: no ratio to take
    ]
    _, agg = fs.table(rows)
    assert agg["gap_mean"] == pytest.approx(0.75) and agg["gap_worst"] == pytest.approx(0.6)
    assert agg["heldout_recall_vs_icl_mean"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    assert agg["seen_recall_vs_icl_of_means"] == pytest.approx(0.6 / 0.55)
    assert agg["harm_max"] == pytest.approx(1.02)


def test_a_partial_rerun_takes_the_other_memories_from_the_earlier_run_in_the_sets_order():
    new = [_row("tool_agent", 0.64, (0.2, 0.23)), _row("team_qa", 0.73, (0.23, 0.27))]
    earlier = [_row(m, 0.5, (0.1, 0.2)) for m in ("documents", "team_qa", "demo", "not_in_the_set")]
    merged = fs.with_earlier_rows(new, earlier)
    assert [r["memory"] for r in merged] == ["demo", "team_qa", "tool_agent", "documents"]
    assert next(r for r in merged if r["memory"] == "team_qa")["gap"] == 0.73  # the rerun's, not the earlier one
