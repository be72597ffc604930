"""Serving cost, side by side in one run on the same prompts: cartridges inside vLLM against the alternatives.

    python benchmarks/serving.py [--memory-tokens 4000] [--p 128] [--clients 1 8 64] [--agents 16]

(a) the transformers loop (``agent/decoding.py``) as the old Serve replica ran it: static batches of up to 8,
    one at a time; (b) cartridges on vLLM (``AsyncCartridgeEngine``, continuous batching); (c) vLLM with the
    memory in context and prefix caching on (what a user would otherwise deploy); (d) vLLM without memory (the
    limit: a cartridge adds only p tokens of attention). At each number of concurrent clients: TTFT, latency
    p50/p99, aggregate tokens/s. Then many agents: 16 distinct ~4,000-token memories under one KV budget
    (``--kv-budget-gib``), cartridges against ICL with prefix caching. Then a loopback load test of the Serve
    app (HTTP, 64 clients). Every answer is exactly ``--max-tokens`` long (end-of-turn biased away), so
    tokens/s compare like with like. A text-initialised cartridge stands in for a trained one (its values do
    not change the cost). Medians over ``--repeats`` rounds.
Targets: (b) >= 5x (a) at 64 clients; (b) >= 0.8x (d); (b) >= 10x (c) with 16 memories; 0 failed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import long_memory_text, print_table, write_json  # noqa: E402

from ray_cartridges.chat import chat_template_ids  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def summarise(ttft: list[float], lat: list[float], tokens: int, wall: float) -> dict:
    return {
        "ttft_p50_s": statistics.median(ttft),
        "latency_p50_s": statistics.median(lat),
        "latency_p99_s": pct(lat, 0.99),
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "tokens": tokens,
    }


def run_transformers_loop(agent, convs: list[list[dict]], sp, batch: int = 8) -> dict:
    """The old replica: requests taken in static batches of up to ``batch``, one batch at a time."""
    t0, ttft, lat, tokens = time.perf_counter(), [], [], 0
    for s in range(0, len(convs), batch):
        start = time.perf_counter() - t0
        outs = agent.complete(convs[s : s + batch], sp)
        end = time.perf_counter() - t0
        for o in outs:
            ttft.append(start + o.ttft_s)
            lat.append(end)
            tokens += len(o.token_ids)
    return summarise(ttft, lat, tokens, time.perf_counter() - t0)


async def run_async(engine, requests: list[tuple], sp) -> dict:
    """All requests at once on the async engine: each (cartridge or None, prompt ids)."""
    t0 = time.perf_counter()

    async def one(cart, ids):
        first, n = None, 0
        async for out in engine.stream(cart, ids, sp):
            n += len(out.outputs[0].token_ids)
            if first is None and n:
                first = time.perf_counter() - t0
        return first, time.perf_counter() - t0, n

    res = await asyncio.gather(*(one(c, ids) for c, ids in requests))
    return summarise([r[0] for r in res], [r[1] for r in res], sum(r[2] for r in res), time.perf_counter() - t0)


def chat_ids(tok, system: str | None, q: str) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
    return chat_template_ids(tok, msgs)


def distinct_memories(tok, memory, n_tokens: int, count: int) -> list[str]:
    """``count`` memories of ``n_tokens``: the example's experiences in another order each, under another name."""
    out = []
    for k in range(count):
        entries = list(memory.entries)
        random.Random(k).shuffle(entries)
        text = f"Notes of assistant #{k}.\n" + "\n".join(e.render() for e in entries)
        while len(tok(text).input_ids) < n_tokens:
            text += "\n" + "\n".join(f"(again, #{k}) {e.render()}" for e in entries)
        out.append(tok.decode(tok(text).input_ids[:n_tokens]))
    return out


def make_cartridges(model, tok, texts: list[str], p: int, root: Path) -> list[Path]:
    from ray_cartridges.cartridge import CartridgeMeta, ModelShape, create_cartridge, save_cartridge
    from ray_cartridges.models import tokenizer_fingerprint

    dirs = []
    for i, text in enumerate(texts):
        pm = create_cartridge(model, num_tokens=p, method="text", tokenizer=tok, text=text)
        meta = CartridgeMeta("smollm2-135m-instruct", ModelShape.of(model), p, 1, tokenizer_fingerprint(tok))
        dirs.append(save_cartridge(pm, root / f"c{i}", meta))
    return dirs


def engine_figures(args, model, tok, mem_text, qs, cart_dir, many_texts, many_dirs) -> tuple[dict, dict]:
    """(per-client-count figures of a-d, the many-agents figures), all on one async engine where vLLM."""
    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig
    from ray_cartridges.agent.decoding import SamplingParams
    from ray_cartridges.vllm_cartridges.engine import AsyncCartridgeEngine

    sp = SamplingParams(max_tokens=args.max_tokens, logit_bias={tok.eos_token_id: -100.0})
    agent = KVMemoryAgent(
        KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact(str(cart_dir))), engine="transformers"),
        model=model,
        tokenizer=tok,
    )
    engine = AsyncCartridgeEngine(args.model, dtype=args.dtype, max_model_len=8192, block_size=args.block_size)
    cart = engine.add_cartridge("bench", cart_dir)
    many = [engine.add_cartridge(f"m{i}", d) for i, d in enumerate(many_dirs)]
    loop = asyncio.new_event_loop()
    kinds = {
        "b": lambda q: (cart, chat_ids(tok, None, q)),
        "c": lambda q: (None, chat_ids(tok, mem_text, q)),
        "d": lambda q: (None, chat_ids(tok, None, q)),
    }
    warm = SamplingParams(max_tokens=1)
    for make in kinds.values():  # the memory in the prefix cache, the cartridge loaded: a warm server
        loop.run_until_complete(run_async(engine, [make("Hello")], warm))
    rows: dict = {}
    partial = {"config": vars(args), "partial": True}
    for c in args.clients:
        qc = [qs[i % len(qs)] for i in range(c)]
        rounds = {"a": [], "b": [], "c": [], "d": []}
        for r in range(args.repeats):
            print(f"[bench] {c} clients, round {r + 1}/{args.repeats}", flush=True)
            rounds["a"].append(run_transformers_loop(agent, [[{"role": "user", "content": q}] for q in qc], sp))
            for k, make in kinds.items():
                rounds[k].append(loop.run_until_complete(run_async(engine, [make(q) for q in qc], sp)))
        rows[c] = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rounds.items()}
        write_json("serving_partial", {**partial, "by_clients": rows})  # kept if a later phase fails
    # many agents: every memory asked args.per_agent questions, all at once
    reqs_c, reqs_i = [], []
    for j in range(args.per_agent):
        for i, (cart_i, text) in enumerate(zip(many, many_texts)):
            q = qs[(i + j) % len(qs)]
            reqs_c.append((cart_i, chat_ids(tok, None, q)))
            reqs_i.append((None, chat_ids(tok, text, q)))
    many_rounds = {"cartridges": [], "icl": []}
    for reqs in (reqs_c[: len(many)], reqs_i[: len(many)]):  # each memory read once before: what fits stays cached
        loop.run_until_complete(run_async(engine, reqs, warm))
    for r in range(args.many_repeats):
        print(f"[bench] {len(many)} agents, round {r + 1}/{args.many_repeats}", flush=True)
        many_rounds["cartridges"].append(loop.run_until_complete(run_async(engine, reqs_c, sp)))
        many_rounds["icl"].append(loop.run_until_complete(run_async(engine, reqs_i, sp)))
    many_fig = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in many_rounds.items()}
    many_fig["cartridge_requests_loading"] = engine.stats.cartridge_requests - engine.stats.requests_fully_cached
    many_fig["requests"] = len(reqs_c)
    engine.shutdown()
    del engine
    pending = asyncio.all_tasks(loop)  # the engine's output handler, cancelled by shutdown: let it finish
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    return rows, many_fig


async def load_test(url: str, model: str, clients: int, seconds: float, max_tokens: int, questions: list[str]):
    import httpx

    lat, fails, errors = [], 0, []
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=300) as client:

        async def worker(i: int):
            nonlocal fails
            k = 0
            while time.perf_counter() < deadline:
                q = questions[(i + k) % len(questions)]
                body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": q}]}
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


def serve_load_test(args, cart_dir: Path, qs: list[str]) -> dict:
    import ray
    from ray import serve

    from ray_cartridges.config.serve import ServeConfig
    from ray_cartridges.serve.app import deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    cfg = ServeConfig.model_validate(
        {
            "cartridges": {"bench": str(cart_dir)},
            "port": port,
            "dtype": args.dtype,
            "block_size": args.block_size,
            "num_cpus_per_replica": 1,
            "limits": {"max_queued_requests": max(256, 2 * args.load_clients)},
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(cfg), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    lat, fails, errs, wall = asyncio.run(
        load_test(url, "bench", args.load_clients, args.load_seconds, args.load_max_tokens, qs)
    )
    serve.shutdown()
    ray.shutdown()
    return {
        "ok": len(lat),
        "failed": fails,
        "p50_s": pct(lat, 0.5),
        "p99_s": pct(lat, 0.99),
        "rps": len(lat) / wall,
        "errors": errs,
    }


def print_tables(args, rows: dict, many: dict, load: dict, mem_tokens: int) -> None:
    names = {
        "a": "(a) transformers loop",
        "b": "(b) cartridge, vLLM",
        "c": "(c) ICL, vLLM + prefix cache",
        "d": "(d) no memory, vLLM",
    }
    table = []
    for c, r in rows.items():
        for k in "abcd":
            f = r[k]
            table.append(
                [
                    c,
                    names[k],
                    f"{f['ttft_p50_s']:.3f}",
                    f"{f['latency_p50_s']:.2f}",
                    f"{f['latency_p99_s']:.2f}",
                    f"{f['tokens_per_s']:.1f}",
                ]
            )
    print_table(
        f"serving, {args.model} {args.dtype}, memory {mem_tokens} tokens, cartridge p={args.p}, {args.max_tokens} tokens per answer",
        ["clients", "engine", "TTFT p50 s", "latency p50 s", "p99 s", "tokens/s"],
        table,
    )
    top = rows[max(rows)]
    print_table(
        "targets",
        ["figure", "ours", "baseline", "ratio", "target"],
        [
            [
                f"tokens/s at {max(rows)} clients vs (a)",
                f"{top['b']['tokens_per_s']:.1f}",
                f"{top['a']['tokens_per_s']:.1f}",
                f"{top['b']['tokens_per_s'] / top['a']['tokens_per_s']:.1f}x",
                ">= 5x",
            ],
            [
                f"tokens/s at {max(rows)} clients vs (d)",
                f"{top['b']['tokens_per_s']:.1f}",
                f"{top['d']['tokens_per_s']:.1f}",
                f"{top['b']['tokens_per_s'] / top['d']['tokens_per_s']:.2f}x",
                ">= 0.8x",
            ],
            [
                f"tokens/s, {args.agents} memories vs ICL",
                f"{many['cartridges']['tokens_per_s']:.1f}",
                f"{many['icl']['tokens_per_s']:.1f}",
                f"{many['cartridges']['tokens_per_s'] / many['icl']['tokens_per_s']:.1f}x",
                ">= 10x",
            ],
            [
                f"load test {args.load_clients} clients: failed",
                load["failed"],
                "",
                f"p50 {load['p50_s']:.2f} s, p99 {load['p99_s']:.2f} s",
                "0",
            ],
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the frozen model")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model dtype")
    ap.add_argument("--memory-tokens", type=int, default=4000, help="tokens of each memory")
    ap.add_argument("--p", type=int, default=128, help="cartridge length")
    ap.add_argument("--block-size", type=int, default=128, help="vLLM KV block size (p should be a multiple)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="concurrent clients")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens of every answer")
    ap.add_argument("--agents", type=int, default=16, help="distinct memories in the many-agents case")
    ap.add_argument("--per-agent", type=int, default=4, help="questions per agent in the many-agents case")
    ap.add_argument("--kv-budget-gib", type=float, default=1.0, help="vLLM KV-cache space (GiB)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds at each client count; figures are medians")
    ap.add_argument("--many-repeats", type=int, default=1, help="rounds of the many-agents case (slow for ICL)")
    ap.add_argument("--load-clients", type=int, default=64, help="HTTP load test clients")
    ap.add_argument("--load-seconds", type=float, default=60, help="HTTP load test length")
    ap.add_argument("--load-max-tokens", type=int, default=16, help="HTTP load test answer tokens")
    args = ap.parse_args()

    from ray_cartridges.cli import setup_env

    setup_env()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_budget_gib:g}"
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from ray_cartridges.memory import read_memory
    from ray_cartridges.models import load_model, load_tokenizer

    tok, model = load_tokenizer(args.model), load_model(args.model, args.dtype)
    memory = read_memory(REPO / "examples" / "agent_checkpoint")
    mem_text = long_memory_text(tok, memory, args.memory_tokens)
    qs = [g[0].content for g in memory.triples()]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    (cart_dir,) = make_cartridges(model, tok, [mem_text], args.p, work / "one")
    many_texts = distinct_memories(tok, memory, args.memory_tokens, args.agents)
    many_dirs = make_cartridges(model, tok, many_texts, args.p, work / "many")
    rows, many = engine_figures(args, model, tok, mem_text, qs, cart_dir, many_texts, many_dirs)
    load = serve_load_test(args, cart_dir, qs)
    mem_tokens = len(chat_ids(tok, mem_text, qs[0])) - len(chat_ids(tok, None, qs[0]))
    print_tables(args, rows, many, load, mem_tokens)
    from ray_cartridges.agent.base import ChatModel

    per_token = ChatModel(model, tok).kv_bytes(1, 0)
    top = rows[max(rows)]
    write_json(
        "serving",
        {
            "config": vars(args),
            "memory_tokens": mem_tokens,
            "by_clients": rows,
            "many_agents": many,
            "load_test": load,
            "kv_bytes": {"memory_in_context": per_token * mem_tokens, "cartridge": per_token * args.p},
            "ratios": {
                "vllm_vs_transformers_loop": top["b"]["tokens_per_s"] / top["a"]["tokens_per_s"],
                "vllm_vs_no_memory": top["b"]["tokens_per_s"] / top["d"]["tokens_per_s"],
                "vllm_vs_icl": top["b"]["tokens_per_s"] / top["c"]["tokens_per_s"],
                "many_agents_vs_icl": many["cartridges"]["tokens_per_s"] / many["icl"]["tokens_per_s"],
                "memory_kv": mem_tokens / args.p,
            },
        },
    )
    (REPO / "benchmarks" / "results" / "serving_partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
