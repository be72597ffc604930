"""The Ray Serve app on loopback, driven by the official openai client."""

import socket

import httpx
import pytest
from conftest import bundled_meta

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_cartridge(path, model, tokenizer, seed):
    from ray_cartridges.cartridge import create_cartridge, save_cartridge

    pm = create_cartridge(model, num_tokens=16, method="random", seed=seed)
    save_cartridge(pm, path, bundled_meta(model, tokenizer, 16))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_cluster, model, tokenizer):
    from ray import serve

    from ray_cartridges.serve.app import deployment
    from ray_cartridges.serve.config import ServeConfig

    root = tmp_path_factory.mktemp("serve")
    a = _make_cartridge(root / "alpha", model, tokenizer, seed=1)
    b = _make_cartridge(root / "beta", model, tokenizer, seed=2)
    port = _free_port()
    cfg = ServeConfig.model_validate(
        {
            "cartridges": {"alpha": str(a), "beta": str(b)},
            "api_key": KEY,
            "port": port,
            "num_cpus_per_replica": 0.5,
            "limits": {"max_tokens": 64, "max_body_bytes": 20000, "max_messages": 8},
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(cfg), name="test_cartridges", route_prefix="/")
    yield f"http://127.0.0.1:{port}", {"alpha": a, "beta": b}
    serve.delete("test_cartridges")


def _client(base, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


MSG = [{"role": "user", "content": "Tell me something you remember."}]


def test_completion_and_two_cartridges_differ(server, model, tokenizer):
    from ray_cartridges.agent import KVArtifact, KVCacheMemoryConfig, KVMemoryAgent, KVMemoryAgentConfig

    base, paths = server
    c = _client(base)
    ra = c.chat.completions.create(model="alpha", messages=MSG, max_tokens=12, temperature=0)
    rb = c.chat.completions.create(model="beta", messages=MSG, max_tokens=12, temperature=0)
    ta, tb = ra.choices[0].message.content, rb.choices[0].message.content
    assert ta and tb and ta != tb
    assert ra.usage.completion_tokens <= 12 and ra.model == "alpha"
    # the endpoint answers exactly what the agent answers locally with the same cartridge
    agent = KVMemoryAgent(
        KVMemoryAgentConfig(memory_config=KVCacheMemoryConfig(artifact=KVArtifact(str(paths["alpha"])))),
        model=model,
        tokenizer=tokenizer,
    )
    assert agent.chat(MSG, max_tokens=12) == ta
    models = {m.id for m in c.models.list().data}
    assert models == {"alpha", "beta"}


def test_streaming_matches_non_streaming(server):
    base, _ = server
    c = _client(base)
    full = c.chat.completions.create(model="alpha", messages=MSG, max_tokens=12).choices[0].message.content
    parts, finish = [], None
    for ch in c.chat.completions.create(model="alpha", messages=MSG, max_tokens=12, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    assert "".join(parts) == full and len(parts) > 1 and finish in ("stop", "length")


def test_logprobs_are_returned(server):
    base, _ = server
    r = _client(base).chat.completions.create(model="beta", messages=MSG, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6  # greedy: the chosen token is the top-1


def test_errors_are_openai_json_with_the_right_status(server):
    import openai

    base, _ = server
    with pytest.raises(openai.AuthenticationError) as e:
        _client(base, key="wrong").chat.completions.create(model="alpha", messages=MSG, max_tokens=4)
    assert e.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        _client(base).chat.completions.create(model="gamma", messages=MSG, max_tokens=4)
    assert e.value.status_code == 404 and "gamma" in str(e.value)
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers=h, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "alpha", "messages": "hi"}, headers=h, timeout=30)
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "alpha", "messages": MSG, "max_tokens": 10_000},
        headers=h,
        timeout=30,
    )
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "alpha", "messages": MSG * 9}, headers=h, timeout=30)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    big = {"model": "alpha", "messages": [{"role": "user", "content": "x" * 30000}]}
    r = httpx.post(f"{base}/v1/chat/completions", json=big, headers=h, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for r in [httpx.get(f"{base}/health", timeout=30)]:
        assert r.status_code == 200 and set(r.json()["cartridges"]) == {"alpha", "beta"}
