"""Does the cartridge remember? Quality against cartridge size p and against training steps, on the demo.

    python benchmarks/fidelity.py [--config configs/demo.yaml] [--sizes 32,64,128,256] [--steps N]

Uses the demo's teacher data (generated where missing or out of date) and the demo's training recipe; only p (and for
the steps sweep, the checkpoints along one run) change. For every cartridge, on held-out material:
- fidelity: per-token KL(teacher with the memory in context || student), no memory vs cartridge, and the
  share of the ICL gap closed (1 - KL_cartridge / KL_no_memory);
- recall: answer accuracy on the memory's facts (Feedback answers), against no memory and ICL
  (measured once: they do not depend on the cartridge);
- no harm: perplexity on unrelated text with the cartridge in front, relative to the base model.
Writes ``<out>/sweep.json``, ``<out>/sweep.md``, ``<out>/size_sweep.png``, ``<out>/steps_sweep.png`` and
``benchmarks/results/fidelity.json`` (the demo setting, p = 128, against the targets).
Training runs resume, so a re-run after an interruption only evaluates what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import REPO, RESULTS, write_json  # noqa: E402

TARGETS = {"icl_gap_closed": 0.9, "recall_vs_icl": 1.0, "ppl_ratio_max": 1.05}


def _summary(ev: dict) -> dict:
    fid, rec, harm = ev["fidelity"], ev["recall"], ev["no_harm"]
    return {
        "kl_cartridge": fid.get("kl_cartridge"),
        "kl_no_memory": fid.get("kl_no_memory"),
        "icl_gap_closed": fid.get("icl_gap_closed"),
        "recall": rec["cartridge"]["accuracy"],
        "recall_heldout": rec["cartridge"].get("heldout_accuracy"),
        "ppl_ratio": harm["ratio"],
        "ppl_ratio_icl": harm.get("ratio_icl"),
        "chat_ppl_ratio": (harm.get("chat") or {}).get("ratio"),
        "chat_ppl_ratio_icl": (harm.get("chat") or {}).get("ratio_icl"),
        # each paragraph of the unrelated text read alone (short answers): mean ratio
        "chat_ppl_ratio_paragraphs": ((harm.get("paragraphs") or {}).get("chat") or {}).get("ratio"),
        "chat_ppl_ratio_paragraphs_icl": ((harm.get("paragraphs") or {}).get("chat") or {}).get("ratio_icl"),
    }


def markdown(baselines: dict, sizes: list[dict], steps: list[dict], p_steps: int) -> str:
    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    head = (
        "| {} | KL to teacher | ICL gap closed | recall | recall (held-out entries) | ppl vs base (chat) | "
        "ppl vs base (raw text) | ppl vs base (chat, paragraphs alone) | train s |"
    )
    sep = "|---|---|---|---|---|---|---|---|---|"

    def pct(r):
        return None if r is None else (r - 1) * 100

    out = [
        "## Baselines",
        "",
        "| agent | KL to teacher | recall | recall (held-out entries) | ppl vs base (chat) | ppl vs base (raw text) "
        "| ppl vs base (chat, paragraphs alone) |",
        "|---|---|---|---|---|---|---|",
    ]
    out.append(
        f"| no memory | {f(baselines['kl_no_memory'])} | {f(baselines['no_memory']['accuracy'], '{:.2f}')} | "
        f"{f(baselines['no_memory'].get('heldout_accuracy'), '{:.2f}')} | +0.0% | +0.0% | +0.0% |"
    )
    out.append(
        f"| ICL (memory in context) | 0 (it is the teacher) | {f(baselines['icl']['accuracy'], '{:.2f}')} | "
        f"{f(baselines['icl'].get('heldout_accuracy'), '{:.2f}')} | "
        f"{f(pct(baselines.get('chat_ppl_ratio_icl')), '{:+.1f}%')} | "
        f"{f(pct(baselines.get('ppl_ratio_icl')), '{:+.1f}%')} | "
        f"{f(pct(baselines.get('chat_ppl_ratio_paragraphs_icl')), '{:+.1f}%')} |"
    )
    for title, key, rows in (("Cartridge size p", "p", sizes), (f"Training steps (p = {p_steps})", "steps", steps)):
        out += ["", f"## {title}", "", head.format(key), sep]
        for r in rows:
            out.append(
                f"| {r[key]} | {f(r['kl_cartridge'])} | {f(r['icl_gap_closed'], '{:.2f}')} | "
                f"{f(r['recall'], '{:.2f}')} | {f(r['recall_heldout'], '{:.2f}')} | "
                f"{f(pct(r.get('chat_ppl_ratio')), '{:+.1f}%')} | {f(pct(r['ppl_ratio']), '{:+.1f}%')} | "
                f"{f(pct(r.get('chat_ppl_ratio_paragraphs')), '{:+.1f}%')} | {f(r.get('train_s'), '{:.0f}')} |"
            )
    return "\n".join(out) + "\n"


def plot(path: Path, xs, rows: list[dict], baselines: dict, xlabel: str, logx: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, [r["icl_gap_closed"] for r in rows], "o-", label="share of ICL gap closed")
    a.axhline(TARGETS["icl_gap_closed"], color="grey", ls="--", label="target 0.9")
    a.set_ylim(0, 1.05)
    a.set_title("fidelity (held-out)")
    b.plot(xs, [r["recall"] for r in rows], "o-", label="cartridge")
    b.axhline(baselines["icl"]["accuracy"], color="tab:green", ls="--", label="ICL")
    b.axhline(baselines["no_memory"]["accuracy"], color="tab:red", ls=":", label="no memory")
    b.set_ylim(0, 1.05)
    b.set_title("recall of memory facts")
    for ax in (a, b):
        ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="end-to-end (distill) config")
    ap.add_argument("--sizes", default="32,64,128,256", help="cartridge sizes p")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    ap.add_argument("--step-points", type=int, default=4, help="checkpoints evaluated along the p=128 run")
    ap.add_argument("--steps-p", type=int, default=128, help="p of the run whose checkpoints make the steps sweep")
    ap.add_argument("--out", default=str(REPO / "outputs" / "sweeps"))
    ap.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.training.lr=1e-2")
    args = ap.parse_args()

    from ray_cartridges.cli import setup_env

    setup_env()
    import ray

    from ray_cartridges.config import DistillConfig, load_config
    from ray_cartridges.eval.evaluate import evaluate_cartridge
    from ray_cartridges.memory import read_memory
    from ray_cartridges.train import run_training

    os.chdir(REPO)  # the demo config's paths are relative to the repository
    cfg = load_config(DistillConfig, args.config, args.overrides)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)
    data_dir = Path(cfg.generate.output_dir)
    from ray_cartridges.generate.pipeline import run_generation

    # the demo's teacher data, brought up to date with the config (done shards are kept: a no-op when current)
    print(f"[fidelity] teacher data in {data_dir} (generated where missing or stale, as the demo does)", flush=True)
    run_generation(cfg.generate, progress=False)
    memory = read_memory(cfg.generate.checkpoint_dir)
    steps = args.steps or cfg.train.training.max_steps
    sizes = [int(p) for p in args.sizes.split(",")]
    every = max(1, steps // args.step_points)

    shared: dict = {}  # the teacher's logits and other cartridge-independent readings, made once for the sweep

    def evaluate(cart: Path, baselines=()) -> dict:
        return evaluate_cartridge(
            cart,
            data_dir / "dataset.jsonl",
            memory,
            eval_fraction=cfg.train.input_dataset.eval_fraction,
            split_seed=cfg.train.input_dataset.split_seed,
            max_questions=cfg.eval.max_questions,
            max_tokens=cfg.eval.max_tokens,
            baselines=baselines,
            cache=shared,
            engine=cfg.eval.engine,
        )

    size_rows, step_rows, baselines = [], [], None
    for p in sizes:
        train = cfg.train.model_copy(deep=True)
        train.kv_cache.num_tokens = p
        train.training.max_steps = steps
        train.training.save_every = every if p == args.steps_p else 0
        train.output.local_dir = str(out / f"p{p}")
        train.output.upload_to_hf = False
        print(f"[fidelity] training p={p}, {steps} steps -> {train.output.local_dir}", flush=True)
        t0 = time.perf_counter()
        summary = run_training(train)
        train_s = time.perf_counter() - t0
        ev = evaluate(Path(train.output.local_dir), () if baselines else ("no_memory", "icl"))
        if baselines is None:
            baselines = {
                "kl_no_memory": ev["fidelity"].get("kl_no_memory"),
                "no_memory": {k: v for k, v in ev["recall"]["no_memory"].items() if k != "answers"},
                "icl": {k: v for k, v in ev["recall"]["icl"].items() if k != "answers"},
                "ppl_ratio_icl": ev["no_harm"].get("ratio_icl"),
                "chat_ppl_ratio_icl": (ev["no_harm"].get("chat") or {}).get("ratio_icl"),
                "chat_ppl_ratio_paragraphs_icl": _summary(ev)["chat_ppl_ratio_paragraphs_icl"],
            }
        row = {"p": p, "steps": steps, "train_s": train_s, "train_rows": summary.get("train_rows"), **_summary(ev)}
        size_rows.append(row)
        print(f"[fidelity] p={p}: {json.dumps({k: v for k, v in row.items()})}", flush=True)
        if p == args.steps_p:
            for s in range(every, steps, every):
                ck = Path(train.output.local_dir) / "checkpoints" / f"step-{s}"
                step_rows.append({"steps": s, **_summary(evaluate(ck))})
                print(f"[fidelity] p={p} step {s}: {json.dumps(step_rows[-1])}", flush=True)
            step_rows.append({**row})

    result = {"config": vars(args), "baselines": baselines, "sizes": size_rows, "steps": step_rows}
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    md = markdown(baselines, size_rows, step_rows, args.steps_p)
    (out / "sweep.md").write_text(md)
    print("\n" + md)
    plot(out / "size_sweep.png", [r["p"] for r in size_rows], size_rows, baselines, "cartridge size p", True)
    if step_rows:
        plot(out / "steps_sweep.png", [r["steps"] for r in step_rows], step_rows, baselines, "training steps", False)

    demo = next((r for r in size_rows if r["p"] == 128), None)
    if demo:
        icl = baselines["icl"]["accuracy"]
        checks = {
            "icl_gap_closed": (
                demo["icl_gap_closed"],
                f">= {TARGETS['icl_gap_closed']}",
                (demo["icl_gap_closed"] or 0) >= TARGETS["icl_gap_closed"],
            ),
            "recall_vs_icl": (demo["recall"], f">= ICL {icl:.2f}", demo["recall"] >= icl),
            # no harm read two ways: an unrelated chat after the cartridge (how the agent reads it) and plain
            # text straight after the prefix (no chat turn between: the harsher reading); both are reported
            "chat_ppl_ratio": (
                demo["chat_ppl_ratio"],
                f"<= {TARGETS['ppl_ratio_max']}",
                demo["chat_ppl_ratio"] <= TARGETS["ppl_ratio_max"],
            ),
            "ppl_ratio": (
                demo["ppl_ratio"],
                f"<= {TARGETS['ppl_ratio_max']}",
                demo["ppl_ratio"] <= TARGETS["ppl_ratio_max"],
            ),
        }
        for k, (v, target, met) in checks.items():
            print(f"p=128 {k}: {v:.3f} (target {target}) -> {'MET' if met else 'NOT MET'}")
        write_json(
            "fidelity",
            {"config": vars(args), "p128": demo, "baselines": baselines, "checks": checks, "sweep": str(out)},
        )
    for name in ("sweep.md", "size_sweep.png", "steps_sweep.png"):  # a copy beside the other benchmark results
        if (out / name).exists():
            shutil.copyfile(out / name, RESULTS / f"fidelity_{name}")
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'size_sweep.png'}, {out / 'steps_sweep.png'}")


if __name__ == "__main__":
    main()
