"""The headline lines of an evaluation (``eval.json``), for the CLI, the job summary and the model card."""

from __future__ import annotations


def evaluation_lines(evaluation: dict | None) -> list[str]:
    """The headline figures of an evaluation, one per line (job summary and model card)."""
    if not evaluation:
        return []
    lines = []
    fid = evaluation.get("fidelity") or {}
    if fid.get("icl_gap_closed") is not None:
        lines.append(
            f"fidelity (held-out, per-token KL to the in-context teacher): no memory {fid['kl_no_memory']:.3f}, "
            f"cartridge {fid['kl_cartridge']:.3f} -> share of the ICL gap closed {fid['icl_gap_closed']:.2f}"
        )
        by = {k: v["icl_gap_closed"] for k, v in (fid.get("by_strategy") or {}).items()}
        if by:
            lines.append("  by strategy: " + ", ".join(f"{k} {v:.2f}" for k, v in by.items() if v is not None))
    reworded = evaluation.get("recall_heldout_phrasing") or {}
    if reworded:  # the headline: questions phrased unlike any training prompt
        lines.append(
            f"recall on {evaluation['heldout_phrasing_questions']} facts asked in words no training prompt used "
            "(accuracy): " + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in reworded.items())
        )
    rec = evaluation.get("recall") or {}
    if rec:
        lines.append(
            f"recall on {evaluation.get('questions', '?')} memory facts, seen phrasing (the memory's own "
            "questions, which replay trains on) (accuracy): "
            + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in rec.items())
        )
    harm = evaluation.get("no_harm")
    if harm:
        for label, h in (("unrelated chat", harm.get("chat")), ("unrelated text right after the prefix", harm)):
            if not h:
                continue
            icl = (
                f"; memory in context: {h['ppl_icl']:.2f} ({(h['ratio_icl'] - 1) * 100:+.1f}%)"
                if "ppl_icl" in h
                else ""
            )
            lines.append(
                f"no harm ({label}): perplexity {h['ppl_base']:.2f} without, {h['ppl_cartridge']:.2f} with "
                f"the cartridge ({(h['ratio'] - 1) * 100:+.1f}%){icl}"
            )
        paras = harm.get("paragraphs")
        if paras:
            lines.append(
                f"no harm (each of its {paras['count']} paragraphs read alone, mean): chat "
                + "; raw text ".join(
                    f"{(r['ratio'] - 1) * 100:+.1f}%"
                    + (f" (memory in context {(r['ratio_icl'] - 1) * 100:+.1f}%)" if "ratio_icl" in r else "")
                    for r in (paras["chat"], paras["raw"])
                )
            )
    return lines
