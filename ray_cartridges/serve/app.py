"""Ray Serve app: an OpenAI-compatible chat endpoint over cartridges (FastAPI ingress).

    ray-cartridges serve --config configs/serve.yaml
    serve run ray_cartridges.serve.app:build_app config=configs/serve.yaml

Routes: POST /v1/chat/completions (JSON or SSE stream), GET /v1/models, GET /health. ``model`` names a
cartridge; one deployment serves many through ``serve.multiplexed`` (bounded LRU). Concurrent requests
are batched with ``serve.batch``. Every error is an OpenAI-style JSON error with its status code.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import threading

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..agent.decoding import SamplingParams
from .config import ServeConfig
from .engine import CartridgeEngine, RequestTooLarge, UnknownModel, torch_threads
from .protocol import ChatCompletionRequest, chunk, completion_id, completion_response, error_body, logprobs_content


def _err(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


def server_class(max_models: int = 4, max_batch: int = 8, batch_wait: float = 0.02):
    """The Serve deployment class with its FastAPI app; bounds of multiplexing and batching are fixed here."""
    app = FastAPI(title="ray_cartridges", description="OpenAI-compatible chat over trained cartridges.")

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return _err(
            422,
            f"invalid request: {loc}: {first.get('msg', 'invalid')}",
            "invalid_request_error",
            "invalid_value",
            loc or None,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        return _err(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_req, exc: Exception):  # never a stack trace on the wire
        return _err(500, f"internal error ({type(exc).__name__})", "server_error")

    @serve.deployment(name="CartridgeServer")
    @serve.ingress(app)
    class CartridgeServer:
        def __init__(self, config: dict):
            self.cfg = ServeConfig.model_validate(config)
            torch_threads(self.cfg.num_cpus_per_replica)
            self.engine = CartridgeEngine(self.cfg)
            key = self.cfg.api_key or (os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None)
            self.api_key = key or None
            self.inflight = 0

        # --- plumbing ---------------------------------------------------------------------------------------
        def _auth(self, request: Request) -> JSONResponse | None:
            if self.api_key is None:
                return None
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return _err(
                    401,
                    "invalid or missing API key (Authorization: Bearer ...)",
                    "authentication_error",
                    "invalid_api_key",
                )
            return None

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_cartridge(self, model_id: str):
            return await asyncio.to_thread(self.engine.load, model_id)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait)
        async def _batched(self, items: list[tuple]):
            # items: (agent, messages, sampling); group by cartridge, decode each group as one batch
            out = [None] * len(items)
            by_agent: dict[int, list[int]] = {}
            for i, (agent, _, _) in enumerate(items):
                by_agent.setdefault(id(agent), []).append(i)
            for idx in by_agent.values():
                agent = items[idx[0]][0]
                res = await asyncio.to_thread(
                    self.engine.complete_many, agent, [items[i][1] for i in idx], [items[i][2] for i in idx]
                )
                for i, r in zip(idx, res):
                    out[i] = r
            return out

        # --- routes -----------------------------------------------------------------------------------------
        @app.get("/health")
        async def health(self):
            return {"status": "ok", "base_model": self.engine.base, "cartridges": self.engine.models()}

        @app.get("/v1/models")
        async def models(self, request: Request):
            if (denied := self._auth(request)) is not None:
                return denied
            return {
                "object": "list",
                "data": [{"id": m, "object": "model", "owned_by": "ray_cartridges"} for m in self.engine.models()],
            }

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            if (denied := self._auth(request)) is not None:
                return denied
            lim = self.cfg.limits
            if int(request.headers.get("content-length") or 0) > lim.max_body_bytes:
                return _err(
                    413,
                    f"request body larger than {lim.max_body_bytes} bytes",
                    "invalid_request_error",
                    "request_too_large",
                )
            body = await request.body()
            if len(body) > lim.max_body_bytes:
                return _err(
                    413,
                    f"request body larger than {lim.max_body_bytes} bytes",
                    "invalid_request_error",
                    "request_too_large",
                )
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return _err(400, "request body is not valid JSON", "invalid_request_error", "invalid_json")
            try:
                req = ChatCompletionRequest.model_validate(data)
            except Exception as e:  # pydantic.ValidationError
                errs = getattr(e, "errors", lambda: [])()
                first = errs[0] if errs else {}
                loc = ".".join(str(x) for x in first.get("loc", []))
                return _err(
                    422,
                    f"invalid request: {loc}: {first.get('msg', str(e))}",
                    "invalid_request_error",
                    "invalid_value",
                    loc or None,
                )
            if req.model not in self.engine.models():
                return _err(
                    404,
                    f"model {req.model!r} not found; available: {self.engine.models()}",
                    "invalid_request_error",
                    "model_not_found",
                    "model",
                )
            if self.inflight >= lim.max_queued_requests:
                return _err(
                    429,
                    "too many requests queued on this replica; retry later",
                    "rate_limit_error",
                    "rate_limit_exceeded",
                )
            self.inflight += 1
            try:
                try:
                    agent = await self.get_cartridge(req.model)
                except Exception as e:
                    return _err(
                        503, f"cartridge {req.model!r} could not be loaded: {e}", "server_error", "model_unavailable"
                    )
                messages = [m.model_dump() for m in req.messages]
                max_tokens = req.max_completion_tokens or req.max_tokens or min(256, lim.max_tokens)
                try:
                    prompt = await asyncio.to_thread(self.engine.check_request, agent, messages, max_tokens)
                except RequestTooLarge as e:
                    return _err(400, str(e), "invalid_request_error", "context_length_exceeded")
                sp = SamplingParams(
                    temperature=req.temperature,
                    top_p=req.top_p,
                    max_tokens=max_tokens,
                    stop=req.stop_list(),
                    top_logprobs=(req.top_logprobs or 1) if req.logprobs else 0,
                    seed=req.seed,
                )
                if req.stream:
                    return StreamingResponse(
                        self._stream(agent, req, messages, sp, len(prompt)), media_type="text/event-stream"
                    )
                comp = await self._batched((agent, messages, sp))
                lp = logprobs_content(self.engine.tokenizer, comp.logprobs) if req.logprobs else None
                return completion_response(
                    req.model, comp.text, comp.finish_reason, len(prompt), len(comp.token_ids), lp
                )
            except UnknownModel:
                return _err(404, f"model {req.model!r} not found", "invalid_request_error", "model_not_found", "model")
            finally:
                self.inflight -= 1

        async def _stream(self, agent, req: ChatCompletionRequest, messages, sp: SamplingParams, prompt_tokens: int):
            cid = completion_id()
            q: queue.Queue = queue.Queue()
            tok = self.engine.tokenizer

            def run():
                try:
                    res = self.engine.complete_many(agent, [messages], [sp], on_token=lambda _row, t: q.put(("tok", t)))
                    q.put(("done", res[0]))
                except Exception as e:  # reported as an error event, never a trace
                    q.put(("error", f"{type(e).__name__}: {e}"))

            threading.Thread(target=run, daemon=True).start()
            yield f"data: {json.dumps(chunk(cid, req.model, {'role': 'assistant', 'content': ''}))}\n\n"
            ids: list[int] = []
            sent = ""
            while True:
                kind, val = await asyncio.to_thread(q.get)
                if kind == "tok":
                    ids.append(val)
                    text = tok.decode(ids, skip_special_tokens=True)
                    if any(s in text for s in sp.stop):
                        continue  # the final text (cut at the stop string) is settled below
                    if not text.endswith("\ufffd") and len(text) > len(sent):
                        yield f"data: {json.dumps(chunk(cid, req.model, {'content': text[len(sent) :]}))}\n\n"
                        sent = text
                elif kind == "done":
                    if len(val.text) > len(sent) and val.text.startswith(sent):
                        yield f"data: {json.dumps(chunk(cid, req.model, {'content': val.text[len(sent) :]}))}\n\n"
                    yield f"data: {json.dumps(chunk(cid, req.model, {}, val.finish_reason))}\n\n"
                    break
                else:
                    yield f"data: {json.dumps(error_body(val, 'server_error'))}\n\n"
                    break
            yield "data: [DONE]\n\n"

    return CartridgeServer


def deployment(cfg: ServeConfig):
    """The bound Serve application for ``cfg`` (replicas, autoscaling, resources, multiplexing, batching)."""
    opts = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
        "max_ongoing_requests": cfg.limits.max_queued_requests + cfg.batching.max_batch_size,
    }
    if cfg.autoscaling:
        opts["autoscaling_config"] = cfg.autoscaling
    else:
        opts["num_replicas"] = cfg.num_replicas
    cls = server_class(cfg.max_cartridges_per_replica, cfg.batching.max_batch_size, cfg.batching.batch_wait_timeout_s)
    dep = cls.options(**opts)
    bound = dep.bind(cfg.model_dump(mode="json"))
    return bound


def build_app(args: dict):
    """Builder for ``serve run ray_cartridges.serve.app:build_app config=configs/serve.yaml``."""
    from ..config import load_config

    cfg = load_config(ServeConfig, args["config"], [f"{k}={v}" for k, v in args.items() if k != "config"])
    return deployment(cfg)
