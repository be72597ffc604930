"""Does the recipe remember any memory, not one? The demo's recipe, unchanged, over the development set.

    python benchmarks/fidelity_set.py [--config configs/demo.yaml] [--memories demo,team_qa,...] [key=value ...]

For each memory of the set (examples/make_dev_memories.py: the demo, a team's Q/A agent, an assistant's
dialogue log, a tool-using agent, a document corpus) the whole job runs (teacher generation, training,
evaluation) with the same config and no per-memory setting; extra ``key=value`` overrides apply to all of
them alike. Per memory and over the set (mean, worst, spread): the share of the held-out ICL gap closed, recall
on the facts asked in held-out phrasings (the headline) and in the memory's own phrasing (seen), each against
no memory and the memory in context, and no harm on unrelated chat. Writes ``<out>/<memory>/`` (the job's
outputs, resumable) and ``benchmarks/results/fidelity_set.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import REPO, RESULTS, print_table, write_json  # noqa: E402

from ray_cartridges.fsutil import write_text_atomic  # noqa: E402

DEV = REPO / "examples" / "dev_memories"
MEMORIES = {
    "demo": REPO / "examples" / "agent_checkpoint",
    "team_qa": DEV / "team_qa",
    "assistant_log": DEV / "assistant_log",
    "tool_agent": DEV / "tool_agent",
    "documents": DEV / "documents" / "corpus.md",
}
TARGETS = {
    "gap_mean": 0.75,
    "heldout_recall_vs_icl_mean": 0.5,
    "heldout_recall_vs_icl_uncopied_mean": 0.5,  # the honest one where teacher-written questions came close
    "harm_max": 1.05,
    "seen_recall_vs_icl_of_means": 1.0,  # recall in the memory's own phrasing at least in-context memory's
}


def run_job(name: str, ckpt: Path, out: Path, config: str, overrides: list[str]) -> dict:
    """The distill job on one memory (it resumes what an earlier run finished); its eval.json."""
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "distill.py"),
        "--config",
        config,
        "--skip",
        "publish",
        f"generate.checkpoint_dir={ckpt}",
        f"generate.output_dir={out / 'data'}",
        f"train.output.local_dir={out / 'cartridge'}",
        *overrides,
    ]
    print(f"[fidelity_set] {name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads((out / "cartridge" / "eval.json").read_text())


def near_copied(ckpt: Path, dataset: Path) -> set[str]:
    """Held-out phrasings with a near copy among the training data's questions (teacher-written ones included):
    recall on those would be seen phrasing in effect, so it is also reported without them."""
    from ray_cartridges.memory import read_facts
    from ray_cartridges.scoring import near_copy

    users = {json.loads(line)["messages"][-2]["content"] for line in dataset.open() if line.strip()}
    held = [h for f in read_facts(ckpt) or [] for h in f.heldout]
    return {h for h in held if any(near_copy(u, h) for u in users)}


def uncopied_recall(ev: dict, copied: set[str]) -> dict[str, float | None]:
    """Held-out-phrasing recall of the cartridge and of ICL over the questions with no near copy in training."""
    out = {}
    for who in ("cartridge", "icl"):
        answers = ((ev.get("recall_heldout_phrasing") or {}).get(who) or {}).get("answers", [])
        kept = [a["correct"] for a in answers if a["question"] not in copied]
        out[who] = sum(kept) / len(kept) if kept else None
    return out


def rescore(ev: dict, ckpt: Path) -> dict:
    """``ev`` with its recall re-scored from the answers it holds by today's scoring and facts (a run evaluated
    before the facts had values reads as a fresh one would)."""
    from ray_cartridges.eval.evaluate import heldout_accuracy, recall_scores
    from ray_cartridges.memory import read_facts
    from ray_cartridges.scoring import score_answer

    value = {f.entry: f.value for f in read_facts(ckpt) or []}
    for part in ("recall", "recall_heldout_phrasing"):
        for rec in (ev.get(part) or {}).values():
            for a in rec["answers"]:
                a["value"] = value.get(a["entry"])
                a.update(score_answer(a["answer"], a["reference"], a["question"], value=a["value"]))
            rec.update(recall_scores(rec["answers"]))
            if "heldout_accuracy" in rec:
                rec["heldout_accuracy"] = heldout_accuracy(rec["answers"], set(ev.get("heldout_entries", ())))
    return ev


# the held-out conversations every recipe has: a gap over them compares recipes that add strategies of their own
BASE_FAMILIES = ("replay", "self_study")


def base_gap(fid: dict) -> float | None:
    """Share of the ICL gap closed over the held-out conversations of the base families only."""
    parts = [v for k, v in (fid.get("by_strategy") or {}).items() if k in BASE_FAMILIES]
    if not parts:  # one family: the whole held-out set is that family's
        return fid.get("icl_gap_closed")
    no_memory = sum(v["kl_no_memory"] * v["tokens"] for v in parts)
    return 1 - sum(v["kl_cartridge"] * v["tokens"] for v in parts) / no_memory if no_memory > 0 else None


def row(name: str, ev: dict) -> dict:
    def acc(rec, who):
        return (rec or {}).get(who, {}).get("accuracy")

    reworded, seen = ev.get("recall_heldout_phrasing"), ev.get("recall")
    return {
        "memory": name,
        "gap": ev["fidelity"].get("icl_gap_closed"),
        "gap_base": base_gap(ev["fidelity"]),
        "gap_by_strategy": {k: v["icl_gap_closed"] for k, v in (ev["fidelity"].get("by_strategy") or {}).items()},
        "heldout_recall": {w: acc(reworded, w) for w in ("no_memory", "icl", "cartridge")},
        "seen_recall": {w: acc(seen, w) for w in ("no_memory", "icl", "cartridge")} if seen else None,
        "chat_harm": (ev["no_harm"].get("chat") or {}).get("ratio"),
    }


def with_earlier_rows(rows: list[dict], earlier: list[dict]) -> list[dict]:
    """``rows`` plus the earlier run's rows of the set's memories that ``rows`` lacks, in the set's order."""
    ran = {r["memory"] for r in rows}
    merged = rows + [r for r in earlier if r["memory"] in MEMORIES and r["memory"] not in ran]
    return sorted(merged, key=lambda r: list(MEMORIES).index(r["memory"]))


def _f(x, spec="{:.2f}"):
    return "-" if x is None else spec.format(x)


def _mean_ratio(rows: list[dict], field: str) -> float | None:
    """Mean over the memories of the cartridge's held-out-phrasing recall over ICL's (``field``: which recall)."""
    recalls = [r.get(field) or {} for r in rows]
    ratios = [h["cartridge"] / h["icl"] for h in recalls if h.get("icl") and h.get("cartridge") is not None]
    return statistics.mean(ratios) if ratios else None


def _ratio_of_means(rows: list[dict], field: str = "heldout_recall") -> float | None:
    """Mean recall (``field``) of the cartridge over that of ICL, over the memories that have both."""
    pairs = [((r[field] or {}).get("cartridge"), (r[field] or {}).get("icl")) for r in rows]
    pairs = [(c, i) for c, i in pairs if c is not None and i is not None]
    icl = statistics.mean(i for _, i in pairs) if pairs else 0
    return statistics.mean(c for c, _ in pairs) / icl if icl else None


def table(rows: list[dict]) -> tuple[str, dict]:
    lines, agg = [], {}
    for r in rows:
        h, s, u = r["heldout_recall"], r["seen_recall"] or {}, r.get("heldout_recall_uncopied") or {}
        lines.append(
            [
                r["memory"],
                _f(r["gap"]),
                _f(r.get("gap_base")),
                f"{_f(h['cartridge'])} / {_f(h['icl'])} / {_f(h['no_memory'])}",
                f"{_f(s.get('cartridge'))} / {_f(s.get('icl'))} / {_f(s.get('no_memory'))}",
                _f(None if r["chat_harm"] is None else (r["chat_harm"] - 1) * 100, "{:+.1f}%"),
                f"{_f(r.get('heldout_near_copies'), '{}')} ({_f(u.get('cartridge'))} / {_f(u.get('icl'))})",
            ]
        )
    gaps = [r["gap"] for r in rows if r["gap"] is not None]
    base = [r["gap_base"] for r in rows if r.get("gap_base") is not None]
    ratios = _mean_ratio(rows, "heldout_recall")
    if gaps:
        agg = {
            "gap_mean": statistics.mean(gaps),
            "gap_worst": min(gaps),
            "gap_base_mean": statistics.mean(base) if base else None,
            "gap_spread": max(gaps) - min(gaps),
            "heldout_recall_vs_icl_mean": ratios,
            # beside the mean of ratios: a memory whose ICL recall is small weighs less here
            "heldout_recall_vs_icl_of_means": _ratio_of_means(rows),
            "heldout_recall_vs_icl_uncopied_mean": _mean_ratio(rows, "heldout_recall_uncopied"),
            "seen_recall_vs_icl_of_means": _ratio_of_means(rows, "seen_recall"),
            "harm_max": max(r["chat_harm"] for r in rows if r["chat_harm"] is not None),
        }
        lines.append(["mean", _f(agg["gap_mean"]), _f(agg["gap_base_mean"]), "", "", "", ""])
        lines.append(
            [
                "worst",
                _f(agg["gap_worst"]),
                _f(min(base, default=None)),
                "",
                "",
                _f((agg["harm_max"] - 1) * 100, "{:+.1f}%"),
                "",
            ]
        )
    header = [
        "memory",
        "gap share",
        "gap share, replay + self-study",
        "held-out phrasing: cart / ICL / none",
        "seen: cart / ICL / none",
        "chat harm",
        "held-out near copies in training (cart / ICL without them)",
    ]
    return print_table("fidelity over the development set", header, lines), agg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="the job config used for all")
    ap.add_argument("--memories", default=",".join(MEMORIES), help="comma-separated names of the set to run")
    ap.add_argument("--out", default=str(REPO / "outputs" / "fidelity_set"), help="where each memory's run goes")
    ap.add_argument(
        "--reuse", action="store_true", help="take a memory's eval.json from an earlier run under --out, if it has one"
    )
    ap.add_argument(
        "--rows-from",
        help="an earlier fidelity_set.json: the set's memories not in --memories take their rows from it (a partial "
        "rerun of a change that leaves those memories' data and runs as they were)",
    )
    ap.add_argument("--name", default="fidelity_set", help="results files: benchmarks/results/<name>.{json,md}")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the job config, the same for every memory")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for name in args.memories.split(","):
        if name not in MEMORIES:
            sys.exit(f"unknown memory {name!r}; the set: {', '.join(MEMORIES)}")
        done = out / name / "cartridge" / "eval.json"
        if args.reuse and done.is_file():
            print(f"[fidelity_set] {name}: reusing {done}", flush=True)
            ev = rescore(json.loads(done.read_text()), MEMORIES[name])
        else:
            ev = run_job(name, MEMORIES[name], out / name, args.config, args.overrides)
        rows.append(row(name, ev))
        copied = near_copied(MEMORIES[name], out / name / "data" / "dataset.jsonl")
        rows[-1]["heldout_near_copies"] = len(copied)
        rows[-1]["heldout_recall_uncopied"] = uncopied_recall(ev, copied)
    if args.rows_from:
        rows = with_earlier_rows(rows, json.loads(Path(args.rows_from).read_text())["rows"])
    text, agg = table(rows)
    checks = {
        k: {
            "value": agg.get(k),
            "target": t,
            "met": agg.get(k) is not None and (agg[k] <= t if k == "harm_max" else agg[k] >= t),
        }
        for k, t in TARGETS.items()
    }
    for k, c in checks.items():
        print(f"{k}: {_f(c['value'], '{:.3f}')} (target {c['target']}) -> {'MET' if c['met'] else 'NOT MET'}")
    write_text_atomic(RESULTS / f"{args.name}.md", text + "\n")
    write_json(args.name, {"config": vars(args), "rows": rows, "aggregate": agg, "checks": checks})


if __name__ == "__main__":
    main()
