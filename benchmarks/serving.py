"""Serving cost: cartridge agent vs HistoryAgent (memory in context), plus a bounded load test of the endpoint.

    python benchmarks/serving.py [--memory-tokens 4000] [--p 128] [--load-clients 64] [--load-seconds 60]

One run, same model and questions: a ~4,000-token memory vs a p = 128 cartridge (its values do not change
the cost, so a text-initialised cartridge of that memory stands in for a trained one). Measured, batch 1,
median over questions: time to first token (ICL prefills memory + question; the cartridge is a cached
prefix, only the question is prefilled), decode tokens/s, KV bytes per conversation and how many
conversations fit a fixed KV budget. Then a load test on loopback against the Ray Serve app: N concurrent
clients for S seconds, 0 failed requests expected, p50/p99 latency and throughput reported.
Targets: TTFT >= 20x lower; KV bytes lower by ~memory_tokens / p; decode tokens/s at least ICL's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import long_memory_text, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def measure(agent, prompts, max_tokens: int):
    """(TTFT s, decode tokens/s) per prompt at batch 1."""
    import torch

    from ray_cartridges.agent.decoding import build_cache

    model = agent.model
    kv = agent.prefix_kv()
    p = 0 if kv is None else kv[0][0].shape[1]
    ttft, rates = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            pos = torch.arange(p, p + len(ids))[None]
            mask = torch.ones((1, p + len(ids)), dtype=torch.long)
            t0 = time.perf_counter()
            out = model(
                input_ids=x,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=build_cache(model, kv, 1),
                use_cache=True,
            )
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            cache, n = out.past_key_values, 0
            for i in range(max_tokens):
                mask = torch.cat([mask, torch.ones((1, 1), dtype=torch.long)], 1)
                out = model(
                    input_ids=nxt,
                    attention_mask=mask,
                    position_ids=torch.tensor([[p + len(ids) + i]]),
                    past_key_values=cache,
                    use_cache=True,
                )
                cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                n += 1
            t2 = time.perf_counter()
            ttft.append(t1 - t0)
            rates.append(n / (t2 - t1))
    return ttft, rates


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load_test(url: str, model: str, clients: int, seconds: float, max_tokens: int, questions: list[str]):
    import httpx

    lat, fails, errors = [], 0, []
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=300) as client:

        async def worker(i: int):
            nonlocal fails
            k = 0
            while time.perf_counter() < deadline:
                body = {
                    "model": model,
                    "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": questions[(i + k) % len(questions)]}],
                }
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                    ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    ok, r = False, e
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    fails += 1
                    errors.append(str(getattr(r, "status_code", r))[:200])
                k += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return lat, fails, errors[:5], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--memory-tokens", type=int, default=4000)
    ap.add_argument("--p", type=int, default=128)
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-budget-gib", type=float, default=1.0)
    ap.add_argument("--load-clients", type=int, default=64)
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--load-max-tokens", type=int, default=16)
    args = ap.parse_args()

    from ray_cartridges.cli import setup_env

    setup_env()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from ray_cartridges.agent.base import ChatModel
    from ray_cartridges.cartridge import CartridgeMeta, ModelShape, create_cartridge, layer_kv, save_cartridge
    from ray_cartridges.memory import read_memory
    from ray_cartridges.models import load_model, load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(args.model)
    model = load_model(args.model, args.dtype)
    memory = read_memory(REPO / "examples" / "agent_checkpoint")
    mem_text = long_memory_text(tok, memory, args.memory_tokens)
    qs = [g[0].content for g in memory.triples()][: args.questions]

    pm = create_cartridge(model, num_tokens=args.p, method="text", tokenizer=tok, text=mem_text)
    kv = [(k.detach().clone(), v.detach().clone()) for k, v in layer_kv(pm)]

    class Cartridge(ChatModel):
        def prefix_kv(self):
            return kv

    cart = Cartridge(model, tok)
    icl = ChatModel(model, tok, system_prompt=mem_text)
    cart_prompts = [cart.prompt_ids([{"role": "user", "content": q}]) for q in qs]
    icl_prompts = [icl.prompt_ids([{"role": "user", "content": q}]) for q in qs]
    measure(cart, cart_prompts[:1], 4), measure(icl, icl_prompts[:1], 4)  # warm up
    c_ttft, c_rate = measure(cart, cart_prompts, args.max_tokens)
    i_ttft, i_rate = measure(icl, icl_prompts, args.max_tokens)
    med = statistics.median
    per_tok = cart.kv_bytes(1, 0)
    c_conv = [per_tok * (args.p + len(p) + args.max_tokens) for p in cart_prompts]
    i_conv = [per_tok * (len(p) + args.max_tokens) for p in icl_prompts]
    budget = args.kv_budget_gib * 2**30
    c_fit = int(budget // med(c_conv))
    c_fit_shared = int((budget - per_tok * args.p) // (med(c_conv) - per_tok * args.p))
    i_fit = int(budget // med(i_conv))
    mem_tokens = len(icl_prompts[0]) - len(cart_prompts[0])
    rows = [
        [
            "TTFT (s, median)",
            f"{med(i_ttft):.3f}",
            f"{med(c_ttft):.4f}",
            f"{med(i_ttft) / med(c_ttft):.1f}x lower",
            ">= 20x",
        ],
        [
            "decode tokens/s (batch 1)",
            f"{med(i_rate):.1f}",
            f"{med(c_rate):.1f}",
            f"{med(c_rate) / med(i_rate):.2f}x",
            ">= 1x",
        ],
        [
            "KV bytes / conversation",
            f"{med(i_conv) / 2**20:.1f} MiB",
            f"{med(c_conv) / 2**20:.2f} MiB",
            f"{med(i_conv) / med(c_conv):.1f}x lower",
            f"~{mem_tokens / args.p:.0f}x (memory part)",
        ],
        [
            "KV bytes of the memory itself",
            f"{per_tok * mem_tokens / 2**20:.1f} MiB",
            f"{per_tok * args.p / 2**20:.2f} MiB",
            f"{mem_tokens / args.p:.1f}x lower",
            f"~{mem_tokens / args.p:.0f}x",
        ],
        [
            f"conversations in {args.kv_budget_gib:g} GiB KV",
            f"{i_fit}",
            f"{c_fit} ({c_fit_shared} sharing one cartridge)",
            f"{c_fit / max(i_fit, 1):.1f}x more",
            "",
        ],
    ]
    print_table(
        f"serving cost: {args.model} {args.dtype}, memory {mem_tokens} tokens vs cartridge p={args.p}, {len(qs)} questions, {args.max_tokens} decode tokens",
        ["figure", "ICL (HistoryAgent)", "cartridge", "ratio", "target"],
        rows,
    )

    # --- bounded load test on loopback -------------------------------------------------------------
    import ray
    from ray import serve

    from ray_cartridges.serve.app import deployment
    from ray_cartridges.serve.config import ServeConfig

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    meta = CartridgeMeta(args.model, ModelShape.of(model), args.p, 1, tokenizer_fingerprint(tok))
    save_cartridge(pm, work / "bench", meta)
    port = _free_port()
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    cfg = ServeConfig.model_validate(
        {
            "cartridges": {"bench": str(work / "bench")},
            "port": port,
            "dtype": args.dtype,
            "num_cpus_per_replica": max(1, (os.cpu_count() or 2) - 1),
            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(cfg), name="bench", route_prefix="/")
    lat, fails, errs, wall = asyncio.run(
        load_test(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            "bench",
            args.load_clients,
            args.load_seconds,
            args.load_max_tokens,
            qs,
        )
    )
    serve.shutdown()
    ray.shutdown()
    lat.sort()
    p50 = lat[len(lat) // 2] if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    print_table(
        f"load test: {args.load_clients} concurrent clients for {args.load_seconds:g} s on loopback, max_tokens {args.load_max_tokens}",
        ["requests ok", "failed", "p50 latency s", "p99 latency s", "requests/s"],
        [[len(lat), fails, f"{p50:.2f}", f"{p99:.2f}", f"{len(lat) / wall:.2f}"]],
    )
    if errs:
        print("first errors:", errs)
    write_json(
        "serving",
        {
            "config": vars(args),
            "memory_tokens": mem_tokens,
            "icl": {"ttft_s": i_ttft, "decode_tok_s": i_rate, "kv_bytes": i_conv, "fit": i_fit},
            "cartridge": {
                "ttft_s": c_ttft,
                "decode_tok_s": c_rate,
                "kv_bytes": c_conv,
                "fit": c_fit,
                "fit_shared": c_fit_shared,
            },
            "ratios": {
                "ttft": med(i_ttft) / med(c_ttft),
                "decode": med(c_rate) / med(i_rate),
                "kv": med(i_conv) / med(c_conv),
                "memory_kv": mem_tokens / args.p,
            },
            "load_test": {
                "ok": len(lat),
                "failed": fails,
                "p50_s": p50,
                "p99_s": p99,
                "rps": len(lat) / wall,
                "errors": errs,
            },
        },
    )


if __name__ == "__main__":
    main()
