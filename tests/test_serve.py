"""The Ray Serve app on loopback (cartridges on vLLM), driven by the official openai client and raw HTTP probes."""

import asyncio
import socket
import time

import httpx
import pytest
from helpers import bundled_meta

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_cartridge(path, model, tokenizer, seed=None, text=None):
    from ray_cartridges.cartridge import create_cartridge, save_cartridge

    if text is None:
        pm = create_cartridge(model, num_tokens=32, method="random", seed=seed)
    else:
        pm = create_cartridge(model, num_tokens=32, method="text", tokenizer=tokenizer, text=text)
    save_cartridge(pm, path, bundled_meta(model, tokenizer, 32))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_cluster, model, tokenizer, memory, monkeypatch_module):
    from ray import serve

    from ray_cartridges.config.serve import ServeConfig
    from ray_cartridges.serve.app import deployment

    root = tmp_path_factory.mktemp("serve")
    a = _make_cartridge(root / "alpha", model, tokenizer, text=memory.render())
    b = _make_cartridge(root / "beta", model, tokenizer, seed=2)
    port = _free_port()
    # the key is in the driver's environment only: the replica must get it from the deployment
    monkeypatch_module.setenv("RAY_CARTRIDGES_TEST_SERVE_KEY", KEY)
    cfg = ServeConfig.model_validate(
        {
            "cartridges": {"alpha": str(a), "beta": str(b)},
            "api_key_env": "RAY_CARTRIDGES_TEST_SERVE_KEY",
            "port": port,
            "num_cpus_per_replica": 0.5,
            "block_size": 32,
            "enforce_eager": True,
            "limits": {"max_tokens": 400, "max_body_bytes": 20000, "max_messages": 8, "max_queued_requests": 3},
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(cfg), name="test_cartridges", route_prefix="/")
    yield f"http://127.0.0.1:{port}", {"alpha": a, "beta": b}
    serve.delete("test_cartridges")
    serve.shutdown()  # the controller and proxy too: the tests after these share the cluster's two CPUs


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _client(base, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


H = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
MSG = [{"role": "user", "content": "Who is the station doctor?"}]


def test_completion_equals_the_agent_and_two_cartridges_differ(server, model, tokenizer):
    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig

    base, paths = server
    c = _client(base)
    ra = c.chat.completions.create(model="alpha", messages=MSG, max_tokens=12, temperature=0)
    rb = c.chat.completions.create(model="beta", messages=MSG, max_tokens=12, temperature=0)
    ta, tb = ra.choices[0].message.content, rb.choices[0].message.content
    assert ta and tb and ta != tb
    assert ra.usage.completion_tokens <= 12 and ra.model == "alpha"
    # the endpoint answers exactly what the transformers reference answers with the same cartridge
    agent = KVMemoryAgent(
        KVMemoryAgentConfig(KVCacheMemoryConfig(KVArtifact(str(paths["alpha"]))), engine="transformers"),
        model=model,
        tokenizer=tokenizer,
    )
    assert agent.chat(MSG, max_tokens=12) == ta
    assert {m.id for m in c.models.list().data} == {"alpha", "beta"}
    # content as a list of text parts and the developer role, as the OpenAI API accepts them
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Who is the station "}, {"type": "text", "text": "doctor?"}],
        }
    ]
    same = c.chat.completions.create(model="alpha", messages=parts, max_tokens=12).choices[0].message.content
    assert same == ta
    dev = [{"role": "developer", "content": "Answer in French."}] + MSG
    assert c.chat.completions.create(model="alpha", messages=dev, max_tokens=12).choices[0].message.content != ta


def test_streaming_matches_non_streaming_and_never_shows_part_of_a_stop_string(server):
    base, _ = server
    c = _client(base)
    full = c.chat.completions.create(model="alpha", messages=MSG, max_tokens=16).choices[0].message.content

    def stream(**kw):
        parts, finish = [], None
        for ch in c.chat.completions.create(model="alpha", messages=MSG, max_tokens=16, stream=True, **kw):
            if ch.choices and ch.choices[0].delta.content:
                parts.append(ch.choices[0].delta.content)
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
        return parts, finish

    parts, finish = stream()
    assert "".join(parts) == full and len(parts) > 1 and finish in ("stop", "length")
    word = full.split()[3]
    stop = word[1:] if len(word) > 2 else word  # a stop string that starts inside a word
    parts, finish = stream(stop=[stop])
    # what came before the stop string, and not one character of the stop string itself
    assert finish == "stop" and "".join(parts) == full[: full.index(stop)]


def test_logprobs_carry_the_utf8_bytes_of_each_token(server, tokenizer):
    base, _ = server
    r = _client(base).chat.completions.create(model="beta", messages=MSG, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6  # greedy: the chosen token is the top-1
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token
        for t in e.top_logprobs:
            assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token
    from ray_cartridges.serve.protocol import token_bytes

    (tid,) = tokenizer(" station", add_special_tokens=False).input_ids
    assert bytes(token_bytes(tokenizer, tid)) == b" station"


def test_errors_are_openai_json_with_the_right_status(server):
    import openai

    base, _ = server
    with pytest.raises(openai.AuthenticationError) as e:
        _client(base, key="wrong").chat.completions.create(model="alpha", messages=MSG, max_tokens=4)
    assert e.value.status_code == 401
    assert httpx.post(f"{base}/v1/chat/completions", json={"model": "alpha", "messages": MSG}).status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        _client(base).chat.completions.create(model="gamma", messages=MSG, max_tokens=4)
    assert e.value.status_code == 404 and "gamma" in str(e.value)

    def post(body, raw=False):
        kw = {"content": body} if raw else {"json": body}
        return httpx.post(f"{base}/v1/chat/completions", headers=H, timeout=60, **kw)

    r = post(b"{not json", raw=True)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post({"model": "alpha", "messages": "hi"})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = post({"model": "alpha", "messages": MSG, "max_tokens": 10_000})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = post({"model": "alpha", "messages": MSG * 9})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = post({"model": "alpha", "messages": [{"role": "user", "content": "x" * 30000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = post(b'{"model": "alpha", "messages": [{"role": "user", "content": "\\ud800"}]}', raw=True)
    assert r.status_code == 422 and "UTF-8" in r.json()["error"]["message"]
    r = post({"model": "alpha", "messages": MSG, "seed": 2**70})
    assert r.status_code == 422 and "seed" in r.json()["error"]["message"]

    def chunks():  # a chunked upload without a length, refused once it passes the limit
        for _ in range(1000):
            yield b" " * 10_000

    r = httpx.post(f"{base}/v1/chat/completions", headers=H, content=chunks(), timeout=60)
    assert r.status_code == 413
    assert httpx.get(f"{base}/openapi.json").status_code == 404 and httpx.get(f"{base}/docs").status_code == 404
    health = httpx.get(f"{base}/health", timeout=30).json()
    assert set(health["cartridges"]) == {"alpha", "beta"}


def _health(base):
    return httpx.get(f"{base}/health", timeout=30).json()


def test_a_dropped_stream_stops_decoding_and_streams_count_against_the_queue_limit(server, tokenizer):
    base, _ = server
    # no end-of-turn token allowed: each answer runs its whole 400 tokens unless it is aborted
    eos = str(tokenizer.eos_token_id)
    body = {"model": "alpha", "messages": MSG, "max_tokens": 400, "stream": True, "logit_bias": {eos: -100}}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=H, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.time() + 10
    while time.time() < deadline and (_health(base)["running"] or _health(base)["admitted"]):
        time.sleep(0.2)
    h = _health(base)
    assert h["running"] == 0 and h["admitted"] == 0  # 400 tokens would take far longer than 10 s here

    async def many(n=6):
        codes, all_answered, probed = [], asyncio.Event(), asyncio.Event()
        async with httpx.AsyncClient(timeout=120) as client:

            async def one():  # a stream that got in stays open until every request has its answer and the probe
                async with client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=H) as r:
                    codes.append(r.status_code)
                    if len(codes) == n:
                        all_answered.set()
                    if r.status_code == 200:
                        await asyncio.wait_for(probed.wait(), 90)

            async def watch():  # what the replica has admitted while the streams are held open
                try:
                    await asyncio.wait_for(all_answered.wait(), 60)
                    return (await client.get(f"{base}/health")).json()["admitted"]
                finally:
                    probed.set()

            admitted, *_ = await asyncio.gather(watch(), *[one() for _ in range(n)])
        return admitted, codes

    admitted, codes = asyncio.run(many())
    # max_queued_requests = 3, open streams included: three held streams, three refused
    assert admitted == 3 and sorted(codes) == [200] * 3 + [429] * 3, (admitted, codes)


def test_serve_asking_for_more_replicas_than_a_local_cluster_holds_stops_with_what_is_missing(server, capsys):
    """`serve.run` waits forever for replicas that cannot be placed: on the suite's 2-CPU cluster (started by
    this process), 3 replicas of 1 CPU, or an autoscaling minimum of 5, stop before Serve starts them."""
    from ray_cartridges import cli
    from ray_cartridges.config.serve import ServeConfig
    from ray_cartridges.serve.app import replica_resources

    alpha = str(server[1]["alpha"])
    assert cli.main(["serve", "--cartridge", alpha, "num_replicas=3"]) == 2
    assert "error: serving with 3 replica(s) needs CPU 3 (the cluster has 2)" in capsys.readouterr().err
    scaled = ServeConfig(cartridges={"a": alpha}, autoscaling={"min_replicas": 5}, num_gpus_per_replica=1)
    assert replica_resources(scaled) == ({"CPU": 5.0, "GPU": 5.0}, "serving with 5 replica(s)")
