"""Ray Serve app: an OpenAI-compatible chat endpoint over cartridges, on vLLM's engine.

    ray-cartridges serve --config configs/serve.yaml
    serve run ray_cartridges.serve.app:build_app config=configs/serve.yaml

Routes: POST /v1/chat/completions (JSON or SSE stream), GET /v1/models, GET /health. ``model`` names a
cartridge; every replica holds all configured cartridges on one ``AsyncLLM`` with the cartridge KV connector,
so requests of different cartridges decode in one continuous batch. A client that goes away aborts its
request in the engine. Every error is an OpenAI-style JSON body with its status code.

Why not Ray Serve LLM (``ray.serve.llm``): its engine kwargs do carry a ``kv_transfer_config``, but it renders
chat messages into prompts inside vLLM's OpenAI layer, with no hook to put a cartridge's p placeholder ids in
front of the rendered prompt or to set the request's ``cache_salt`` and transfer params per ``model``.
"""

from __future__ import annotations

import hmac
import json
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..agent.decoding import SamplingParams
from ..config.serve import ServeConfig
from ..vllm_cartridges.engine import finish_reason, logprob_entries, strip_eos
from .engine import Prepared, RequestTooLarge, ServeEngine, UnknownCartridge
from .protocol import (
    ChatCompletionRequest,
    chunk,
    completion_id,
    completion_response,
    error_body,
    sse,
    token_logprobs,
)

# no /docs or /openapi.json: they would be the one route the API key does not cover
app = FastAPI(title="ray_cartridges", docs_url=None, redoc_url=None, openapi_url=None)


class BodyTooLarge(ValueError):
    pass


def _err(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


def _invalid(errors: list) -> JSONResponse:
    first = errors[0] if errors else {}
    loc = ".".join(str(x) for x in first.get("loc", []) if x != "body")
    msg = first.get("msg", "invalid")
    return _err(422, f"invalid request: {loc}: {msg}", "invalid_request_error", "invalid_value", loc or None)


@app.exception_handler(RequestValidationError)
async def _validation(_req, exc: RequestValidationError):
    return _invalid(exc.errors())


@app.exception_handler(StarletteHTTPException)
async def _http(_req, exc: StarletteHTTPException):
    return _err(exc.status_code, str(exc.detail), "invalid_request_error")


@app.exception_handler(Exception)
async def _internal(_req, exc: Exception):  # never a stack trace on the wire
    return _err(500, f"internal error ({type(exc).__name__})", "server_error")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` bytes (a chunked upload is not read whole first)."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def sampling_of(req: ChatCompletionRequest, default_max_tokens: int) -> SamplingParams:
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
        stop=req.stop_list(),
        top_logprobs=(req.top_logprobs or 1) if req.logprobs else 0,
        seed=req.seed,
        logit_bias=req.logit_bias,
    )


@serve.deployment(name="CartridgeServer")
@serve.ingress(app)
class CartridgeServer:
    def __init__(self, config: dict, api_key: str | None = None):
        self.cfg = ServeConfig.model_validate(config)
        self.engine = ServeEngine(self.cfg)  # fails the deployment, naming the cartridge, when one cannot load
        self.api_key = api_key or None
        self.inflight = 0  # requests admitted and not finished, streams included

    # --- plumbing -------------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            msg = "invalid or missing API key (Authorization: Bearer ...)"
            return _err(401, msg, "authentication_error", "invalid_api_key")
        return None

    async def _parse(self, request: Request) -> ChatCompletionRequest | JSONResponse:
        lim = self.cfg.limits
        try:
            body = await read_body(request, lim.max_body_bytes)
        except BodyTooLarge:
            msg = f"request body larger than {lim.max_body_bytes} bytes"
            return _err(413, msg, "invalid_request_error", "request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _err(400, "request body is not valid JSON", "invalid_request_error", "invalid_json")
        try:
            return ChatCompletionRequest.model_validate(data)
        except Exception as e:  # pydantic.ValidationError
            return _invalid(getattr(e, "errors", lambda: [])())

    def _prepare(self, req: ChatCompletionRequest) -> Prepared | JSONResponse:
        sp = sampling_of(req, min(256, self.cfg.limits.max_tokens))
        try:
            return self.engine.prepare(req.model, [m.as_dict() for m in req.messages], sp)
        except UnknownCartridge:
            msg = f"model {req.model!r} not found; available: {self.engine.models()}"
            return _err(404, msg, "invalid_request_error", "model_not_found", "model")
        except RequestTooLarge as e:
            return _err(400, str(e), "invalid_request_error", "context_length_exceeded")

    # --- routes ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        return {
            "status": "ok",
            "base_model": self.engine.base,
            "cartridges": self.engine.models(),
            "admitted": self.inflight,
            "running": self.engine.running(),
        }

    @app.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._auth(request)) is not None:
            return denied
        data = [{"id": m, "object": "model", "owned_by": "ray_cartridges"} for m in self.engine.models()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        if (denied := self._auth(request)) is not None:
            return denied
        req = await self._parse(request)
        if isinstance(req, JSONResponse):
            return req
        prep = self._prepare(req)
        if isinstance(prep, JSONResponse):
            return prep
        if self.inflight >= self.cfg.limits.max_queued_requests:
            msg = "too many requests queued on this replica; retry later"
            return _err(429, msg, "rate_limit_error", "rate_limit_exceeded")
        self.inflight += 1
        if req.stream:  # the stream gives its slot back when it ends, however it ends
            return StreamingResponse(self._stream(req, prep), media_type="text/event-stream")
        try:
            comp = await self.engine.engine.complete(prep.cartridge, prep.ids, prep.sampling)
        finally:
            self.inflight -= 1
        lp = token_logprobs(self.engine.tokenizer, comp.logprobs) if req.logprobs else None
        resp = completion_response(
            completion_id(), req.model, comp.text, comp.finish_reason, len(prep.ids), len(comp.token_ids), lp
        )
        return JSONResponse(resp.model_dump(mode="json", exclude_none=True))

    async def _stream(self, req: ChatCompletionRequest, prep: Prepared):
        cid, tok = completion_id(), self.engine.tokenizer
        eos, k = tok.eos_token_id, prep.sampling.top_logprobs
        try:
            yield sse(chunk(cid, req.model, content="", role=True))
            async for out in self.engine.engine.stream(prep.cartridge, prep.ids, prep.sampling):
                c = out.outputs[0]
                ids, entries = list(c.token_ids), logprob_entries(c.token_ids, c.logprobs, k)
                if out.finished:
                    ids, entries = strip_eos(ids, entries, eos)
                lp = token_logprobs(tok, entries) if req.logprobs and entries else None
                if c.text or lp:
                    yield sse(chunk(cid, req.model, content=c.text, logprobs=lp))
                if out.finished:
                    yield sse(chunk(cid, req.model, finish=finish_reason(c)))
            yield "data: [DONE]\n\n"
        except Exception as e:  # reported as an error event, never a trace
            yield sse(error_body(f"{type(e).__name__}: {e}", "server_error"))
        finally:
            self.inflight -= 1


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """The key, read where `serve` runs (the replicas' own environment may not have it)."""
    return cfg.api_key or (os.environ.get(cfg.api_key_env) if cfg.api_key_env else None) or None


def replica_resources(cfg: ServeConfig) -> tuple[dict[str, float], str]:
    """(Ray resources of the replicas Serve starts first, what asks for them): ``num_replicas``, or the
    autoscaling config's ``min_replicas``."""
    n = int(cfg.autoscaling.get("min_replicas", 1)) if cfg.autoscaling else cfg.num_replicas
    need = {"CPU": n * cfg.num_cpus_per_replica, "GPU": n * cfg.num_gpus_per_replica}
    return {k: v for k, v in need.items() if v > 0}, f"serving with {n} replica(s)"


def deployment(cfg: ServeConfig):
    """The bound Serve application for ``cfg`` (replicas, autoscaling, resources)."""
    from ..engine_env import engine_actor_env

    actor = {
        "num_cpus": cfg.num_cpus_per_replica,
        "num_gpus": cfg.num_gpus_per_replica,
        "runtime_env": {"env_vars": engine_actor_env(use_gpu=cfg.num_gpus_per_replica > 0)},
    }
    # Serve hands the replica a few more than it admits, so that it can refuse them with a 429 itself
    opts = {"ray_actor_options": actor, "max_ongoing_requests": cfg.limits.max_queued_requests + 8}
    if cfg.autoscaling:
        opts["autoscaling_config"] = cfg.autoscaling
    else:
        opts["num_replicas"] = cfg.num_replicas
    return CartridgeServer.options(**opts).bind(cfg.model_dump(mode="json", exclude={"api_key"}), resolve_api_key(cfg))


def build_app(args: dict):
    """Builder for ``serve run ray_cartridges.serve.app:build_app config=configs/serve.yaml``."""
    from ..config import load_config

    cfg = load_config(ServeConfig, args["config"], [f"{k}={v}" for k, v in args.items() if k != "config"])
    return deployment(cfg)
