"""Trained tokens/s: our loop (precomputed teacher top-k) vs an online teacher (PEFT cartridge example style).

    python benchmarks/train_throughput.py [--memory-tokens 2000] [--p 128] [--batch 4] [--repeats 5]

Both sides train the same cartridge on the same conversations, same model and machine, in one run,
interleaved, median over repeats:
- ours: student (cartridge + conversation) forward/backward, KD loss against stored top-k logprobs with the
  tail class (training.tail_mass: all, the default); a second row without it (plain top-k) shows its cost;
- online: every step the teacher re-reads the memory (~memory_tokens) + conversation (no grad) to get its
  distribution, then the same student forward/backward against the full-vocabulary teacher distribution.
Tokens/s counts conversation tokens trained per second. Target: ours >= 5x online at a ~2,000-token memory.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import EXAMPLE_CHECKPOINT, long_memory_text, median, print_table, teacher_rows, timed, write_json  # noqa: E402

from ray_cartridges.chat import chat_template_ids  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--memory-tokens", type=int, default=2000)
    ap.add_argument("--p", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from ray_cartridges.batching import collate, student_logits_at
    from ray_cartridges.cartridge import create_cartridge
    from ray_cartridges.loss import kd_loss_sum
    from ray_cartridges.memory import read_memory
    from ray_cartridges.models import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model, args.dtype)
    mem = read_memory(EXAMPLE_CHECKPOINT)
    memory = long_memory_text(tok, mem, args.memory_tokens)  # the example memory is ~1,300 tokens: repeated
    mem_len = len(tok(memory).input_ids)

    records, rows = teacher_rows(
        model, tok, mem, memory, answer_tokens=args.answer_tokens, top_k=args.top_k, limit=args.batch
    )
    batch = collate(rows, tok.pad_token_id, args.top_k)
    conv_tokens = int(batch["attention_mask"].sum())
    positions = batch["pred_t"].numel()

    student = create_cartridge(model, num_tokens=args.p, method="text", tokenizer=tok, text=memory)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    # the online teacher sees system(memory) + the same conversation; its assistant positions line up
    # with the student's through the shared suffix (the conversation after the system message)
    teacher_ids = []
    for r in records:
        msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        teacher_ids.append(chat_template_ids(tok, msgs, add_generation_prompt=False))
    shift = [len(t) - len(row["input_ids"]) for t, row in zip(teacher_ids, rows)]
    T = max(map(len, teacher_ids))
    t_input = torch.full((len(rows), T), tok.pad_token_id)
    t_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, t in enumerate(teacher_ids):
        t_input[i, : len(t)] = torch.tensor(t)
        t_mask[i, : len(t)] = 1
    t_pred_t = batch["pred_t"] + torch.tensor([shift[b] for b in batch["pred_b"].tolist()])

    def step_ours(tail: bool = True):
        opt.zero_grad()
        logits = student_logits_at(student, batch)
        loss = kd_loss_sum(logits, batch["topk_ids"], batch["topk_logprobs"], tail) / positions
        loss.backward()
        opt.step()
        return float(loss.detach())

    V = model.config.vocab_size
    all_ids = torch.arange(V).expand(positions, V)

    def step_online():
        with torch.no_grad(), student.disable_adapter():
            keep = torch.unique(t_pred_t)
            out = student(input_ids=t_input, attention_mask=t_mask, logits_to_keep=keep, use_cache=False)
            col = torch.searchsorted(keep, t_pred_t)
            teacher_lp = torch.log_softmax(out.logits[batch["pred_b"], col].float(), -1)
        opt.zero_grad()
        logits = student_logits_at(student, batch)
        loss = kd_loss_sum(logits, all_ids, teacher_lp) / positions
        loss.backward()
        opt.step()
        return float(loss.detach())

    step_ours(), step_ours(False), step_online()  # warm up
    ours, plain, online = [], [], []
    for _ in range(args.repeats):
        ours.append(timed(step_ours)[0])
        plain.append(timed(lambda: step_ours(False))[0])
        online.append(timed(step_online)[0])
    t_ours, t_plain, t_online = median(ours), median(plain), median(online)
    rows_out = [
        ["ours (precomputed top-k + tail class)", f"{t_ours:.3f}", f"{conv_tokens / t_ours:.0f}", "1.00x"],
        [
            "ours, plain top-k (tail_mass: none)",
            f"{t_plain:.3f}",
            f"{conv_tokens / t_plain:.0f}",
            f"{t_ours / t_plain:.2f}x",
        ],
        [
            "online teacher (memory in context)",
            f"{t_online:.3f}",
            f"{conv_tokens / t_online:.0f}",
            f"{t_ours / t_online:.2f}x",
        ],
    ]
    print_table(
        f"train throughput: {args.model} {args.dtype}, memory {mem_len} tokens, p={args.p}, batch {args.batch}, "
        f"{conv_tokens} conversation tokens/step, median of {args.repeats}",
        ["approach", "step s", "tokens/s", "vs ours"],
        rows_out,
    )
    speedup = t_online / t_ours
    print(f"speedup ours / online: {speedup:.2f}x (target >= 5x) -> {'MET' if speedup >= 5 else 'NOT MET'}")
    write_json(
        "train_throughput",
        {
            "config": vars(args),
            "memory_tokens": mem_len,
            "conversation_tokens_per_step": conv_tokens,
            "ours": {"step_s": ours, "median_s": t_ours, "tokens_per_s": conv_tokens / t_ours, "tail_mass": "all"},
            "ours_plain_top_k": {"step_s": plain, "median_s": t_plain, "tokens_per_s": conv_tokens / t_plain},
            "online": {"step_s": online, "median_s": t_online, "tokens_per_s": conv_tokens / t_online},
            "speedup": speedup,
            "target": 5.0,
            "met": speedup >= 5,
        },
    )


if __name__ == "__main__":
    main()
