"""One table of every benchmark's headline figures against the baseline measured in the same run.

    python benchmarks/summary.py        # reads benchmarks/results/*.json, writes results/summary.{json,md}

Each row: what was measured, our figure, the baseline's figure (same script, same machine, same run), the
ratio, the target and whether it is met. A benchmark that has not been run shows as missing.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, print_table, write_json  # noqa: E402


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def rows() -> list[list]:
    out: list[list] = []

    def row(bench, figure, ours, base, ratio, target, met):
        out.append([bench, figure, ours, base, ratio, target, "-" if met is None else "MET" if met else "NOT MET"])

    if g := _load("generation"):
        row(
            "generation",
            "teacher tok/s vs naive transformers loop",
            f"{g['ours']['tokens_per_s']:.1f}",
            f"{g['naive_transformers']['tokens_per_s']:.1f}",
            f"{g['ratio_vs_naive']:.1f}x",
            ">= 10x",
            g["ratio_vs_naive"] >= 10,
        )
        row(
            "generation",
            "teacher tok/s vs plain vllm.LLM.generate",
            f"{g['ours']['tokens_per_s']:.1f}",
            f"{g['plain_vllm']['tokens_per_s']:.1f}",
            f"{g['ratio_vs_vllm']:.2f}x",
            ">= 0.8x",
            g["ratio_vs_vllm"] >= 0.8,
        )
    if t := _load("train_throughput"):
        row(
            "training",
            "trained tok/s vs online teacher",
            f"{t['ours']['tokens_per_s']:.0f}",
            f"{t['online']['tokens_per_s']:.1f}",
            f"{t['speedup']:.1f}x",
            ">= 5x",
            t["speedup"] >= 5,
        )
    if s := _load("train_scaling"):
        r = s["results"]
        for b in sorted({v["backend"] for v in r.values()}):
            ws = sorted(v["workers"] for v in r.values() if v["backend"] == b)
            lo, hi = r[f"{b}x{ws[0]}"], r[f"{b}x{ws[-1]}"]
            row(
                "training",
                f"{b}: tok/s {ws[-1]} workers vs {ws[0]}",
                f"{hi['median']['tokens_per_s']:.0f}",
                f"{lo['median']['tokens_per_s']:.0f}",
                f"{hi['speedup_vs_fewest_workers']:.2f}x",
                "report (CPU: shared cores)",
                None,
            )
    for name in ("train_dtype", "train_dtype_gpu"):  # the GPU one: run on a GPU machine (README: how)
        if not (s := _load(name)):
            continue
        m = s["median"]
        where = s["machine"].get("cuda") or "CPU"
        row(
            "training",
            f"{where}, bf16 frozen model: tok/s vs fp32 (losses within {s['max_rel_loss_diff']:.1%})",
            f"{m['bf16']['tokens_per_s']:.0f}",
            f"{m['fp32']['tokens_per_s']:.0f}",
            f"{s['speedup']['bf16'] if 'speedup' in s else s['speedup_bf16_vs_fp32']:.2f}x",
            "report",
            None,
        )
    variants = (  # compare_variants results: (file, what the row says, the variant, its baseline)
        ("train_attention", "eager attention: tok/s vs sdpa", "eager", "sdpa"),
        ("train_shared_prefix", "shared prefix read once: tok/s vs every row whole", "true", "false"),
    )
    for name, what, ours, base in variants:
        if not (s := _load(name)):
            continue
        m = s["median"]
        row(
            "training",
            f"{s['machine'].get('cuda') or 'CPU'}, {what} (losses within {s['max_rel_loss_diff']:.1%})",
            f"{m[ours]['tokens_per_s']:.0f}",
            f"{m[base]['tokens_per_s']:.0f}",
            f"{s['speedup'][ours]:.2f}x",
            "report",
            None,
        )
    if s := _load("train_scaling_gpu"):  # run on a GPU machine (README: how it was made)
        gpu = s["machine"].get("cuda") or "GPU"
        for v in s["results"].values():
            row(
                "training",
                f"{gpu}, {s['config']['dtype']}: {v['backend']} x {v['workers']} tok/s vs ddp",
                f"{v['median']['tokens_per_s']:.0f}",
                f"{s['results']['ddpx' + str(v['workers'])]['median']['tokens_per_s']:.0f}",
                f"{v['vs_ddp_same_workers']:.2f}x",
                "report",
                None,
            )
    if v := _load("serving"):
        r, top = v["ratios"], v["by_clients"][str(max(int(c) for c in v["by_clients"]))]
        n = max(int(c) for c in v["by_clients"])
        for figure, ours, base, ratio, target in (
            (
                f"tok/s at {n} clients, cartridges on vLLM vs the transformers loop",
                "b",
                "a",
                "vllm_vs_transformers_loop",
                5,
            ),
            (f"tok/s at {n} clients, cartridges vs vLLM without memory", "b", "d", "vllm_vs_no_memory", 0.8),
        ):
            row(
                "serving",
                figure,
                f"{top[ours]['tokens_per_s']:.1f}",
                f"{top[base]['tokens_per_s']:.1f}",
                f"{r[ratio]:.2f}x",
                f">= {target:g}x",
                r[ratio] >= target,
            )
        m = v["many_agents"]
        row(
            "serving",
            f"tok/s, {v['config']['agents']} distinct memories, cartridges vs ICL with prefix caching",
            f"{m['cartridges']['tokens_per_s']:.1f}",
            f"{m['icl']['tokens_per_s']:.1f}",
            f"{r['many_agents_vs_icl']:.1f}x",
            ">= 10x",
            r["many_agents_vs_icl"] >= 10,
        )
        row("serving", "KV bytes of the memory", "", "", f"{r['memory_kv']:.0f}x smaller", "report", None)
        lt = v["load_test"]
        row(
            "serving",
            f"load test ({v['config']['load_clients']} clients)",
            f"{lt['ok']} ok",
            f"{lt['failed']} failed",
            f"p99 {lt['p99_s']:.1f}s",
            "0 failed",
            lt["failed"] == 0,
        )
    if f := _load("fidelity"):
        c = f["checks"]
        gap = c["icl_gap_closed"]
        row("fidelity", "share of the ICL gap closed (p=128)", f"{gap[0]:.2f}", "0 (no memory)", "", gap[1], gap[2])
        rec = c["recall_vs_icl"]
        row(
            "fidelity",
            "recall of memory facts (p=128)",
            f"{rec[0]:.2f}",
            f"ICL {f['baselines']['icl']['accuracy']:.2f}",
            "",
            rec[1],
            rec[2],
        )
        for key, label, icl_key in (
            ("chat_ppl_ratio", "perplexity of an unrelated chat vs base", "chat_ppl_ratio_icl"),
            ("ppl_ratio", "perplexity of unrelated raw text right after the prefix vs base", "ppl_ratio_icl"),
        ):
            if key not in c:  # results written before this reading existed
                continue
            ppl = c[key]
            icl = f["baselines"].get(icl_key)
            row(
                "fidelity",
                label,
                f"{ppl[0]:.3f}",
                f"1.000 (ICL {icl if icl is not None else float('nan'):.3f})",
                f"{(ppl[0] - 1) * 100:+.1f}%",
                ppl[1],
                ppl[2],
            )
    if fs := _load("fidelity_set"):
        _fidelity_set_rows(fs, row)
    return out


def _fidelity_set_rows(fs: dict, row) -> None:
    """The development set's mean figures (benchmarks/fidelity_set.py), with how many memories they cover."""
    c, n = fs["checks"], len(fs["rows"])
    names = ", ".join(r["memory"] for r in fs["rows"])
    for key, label in (
        ("gap_mean", "share of the ICL gap closed, mean"),
        ("heldout_recall_vs_icl_mean", "held-out-phrasing recall / ICL's, mean"),
        ("heldout_recall_vs_icl_uncopied_mean", "the same, phrasings with a near copy in training left out"),
        ("harm_max", "perplexity of an unrelated chat vs base, worst"),
        ("seen_recall_vs_icl_of_means", "seen-phrasing recall / ICL's, of the means"),
    ):
        if key not in c:  # results written before this check existed
            continue
        v = c[key]["value"]
        shown = "-" if v is None else f"{v:.3f}"
        op = "<=" if key == "harm_max" else ">="
        row(f"fidelity set ({n}: {names})", label, shown, "", "", f"{op} {c[key]['target']}", c[key]["met"])
    if (base := fs["aggregate"].get("gap_base_mean")) is not None:  # comparable across recipes that add strategies
        row(
            f"fidelity set ({n})",
            "gap closed on replay + self-study conversations, mean",
            f"{base:.3f}",
            "",
            "",
            "report",
            None,
        )


def main() -> None:
    names = ["generation", "train_throughput", "train_scaling", "serving", "fidelity"]
    missing = [n for n in names if not (RESULTS / f"{n}.json").exists()]
    table = print_table(
        "benchmark summary (each figure against its baseline from the same run)",
        ["benchmark", "figure", "ours", "baseline", "ratio", "target", "status"],
        rows(),
    )
    if missing:
        print(f"missing (not run yet): {', '.join(missing)}")
    md = ["| benchmark | figure | ours | baseline | ratio | target | status |", "|---|---|---|---|---|---|---|"]
    md += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows()]
    (RESULTS / "summary.md").write_text("\n".join(md) + "\n")
    write_json("summary", {"table": table, "missing": missing})


if __name__ == "__main__":
    main()
