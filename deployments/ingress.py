"""The ingress: OpenAI-compatible HTTP routes and the same surface as Python handle methods."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.heap import freeze_startup_heap
from deployments.metrics import IngressMetrics, process_stats
from llava_serve.api import http, playground
from llava_serve.api.admission import Admission
from llava_serve.api.auth import ApiKeys, HostCheck, load_keys
from llava_serve.api.chat import ChatService
from llava_serve.api.health import HealthProbe
from llava_serve.api.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    now,
)
from llava_serve.api.responses import (
    ResponsesRequest,
    parse_responses_request,
    response_events,
    response_from_completion,
)
from llava_serve.api.telemetry import RequestRecord
from llava_serve.config import AppConfig, with_runtime
from llava_serve.errors import LlavaServeError, NotFound, unwrap
from llava_serve.models.checkpoint import takes_video

# Serve's own logger: lines written through it carry the replica and request id.
logger = logging.getLogger("ray.serve")

# No /docs or /redoc: FastAPI's pages load their scripts from a CDN, which an offline or
# firewalled server cannot reach and a strict page policy would not run. /openapi.json stays.
app = FastAPI(
    title="llava-serve",
    description="OpenAI-compatible chat completions for LLaVA models.",
    docs_url=None,
    redoc_url=None,
)
http.install(app, body_models=(ChatCompletionRequest, ResponsesRequest, TokenizeRequest, DetokenizeRequest))


class HandleBackend:
    """`ChatService`'s backend over DeploymentHandles; responses are passed on unawaited, but
    for the prompt, which the model's router needs to see."""

    def __init__(self, preprocessor: DeploymentHandle, tokenizer: DeploymentHandle, model: DeploymentHandle):
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        self.model = model.options(stream=True, method_name="generate")

    def prepare_image(self, source, num_images):
        return self.preprocessor.remote(source.url, source.param, source.detail, num_images, source.kind)

    def tokenize(self, messages, max_tokens, media_tokens, add_generation_prompt=True, media_hashes=None):
        return self.tokenizer.remote(messages, max_tokens, media_tokens, add_generation_prompt, media_hashes)

    def encode(self, text, add_special_tokens):
        return self.tokenizer.encode.remote(text, add_special_tokens)

    def decode(self, ids):
        return self.tokenizer.decode.remote(ids)

    def pieces(self, ids):
        return self.tokenizer.pieces.remote(ids)

    def context_length(self):
        return self.tokenizer.context_length.remote()

    async def generate(self, prompt, params, images):
        # The prompt is awaited here, not passed on as a response: the model's request router reads
        # its routing key (Serve would wait for it before routing anyway, and it is small).
        outputs = self.model.remote(await prompt, params, *images)
        ended = False
        try:
            async for out in outputs:
                yield out
            ended = True
        finally:
            if not ended:  # the caller left mid-stream (or it failed): stop the request
                outputs.cancel()


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, config: AppConfig, preprocessor, tokenizer, model):
        self.config = self.base_config = config  # the app's args; user_config is laid over these
        self.service = ChatService(
            config, HandleBackend(preprocessor, tokenizer, model), takes_video(config.model)
        )
        self.admission = Admission(config.admission)
        self.keys = ApiKeys(load_keys(config.auth))
        if not self.keys.enabled:
            logger.warning("no API keys configured (auth.*): the HTTP API answers anyone who can reach it")
        self.health_probe = HealthProbe(
            model.options(method_name="ping").remote, config.http.health_cache_s, config.http.health_timeout_s
        )
        self.metrics = IngressMetrics()
        self.guard: http.RequestGuard | None = None

    def reconfigure(self, user_config: dict) -> None:
        """Runtime knobs (http, limits, admission, generation) from Serve's user_config, applied
        to the next request; requests already running keep what they started with."""
        config = with_runtime(self.base_config, "Ingress", user_config)
        self.config = self.service.config = config
        self.admission.configure(config.admission)
        self.health_probe.cache_s = config.http.health_cache_s
        self.health_probe.timeout_s = config.http.health_timeout_s
        if self.guard is not None:
            self.guard.configure(config.limits, HostCheck(config.http.allowed_hosts))

    def __serve_build_asgi_app__(self):
        """Serve asks for the app once the replica is built: the routes behind the door check."""
        self.app.state.on_rejected = self._rejected  # bodies FastAPI refuses are counted too
        self.guard = http.RequestGuard(
            self.app,
            self.config.limits,
            self.admission,
            self._rejected,
            keys=self.keys,
            hosts=HostCheck(self.config.http.allowed_hosts),
            public_models=self.config.auth.public_models,
        )
        freeze_startup_heap()  # the last of the replica's startup: its app is built
        return self.guard

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        # The body is read raw and checked, parsed and validated off the loop (ChatService.parse);
        # the schema still says what it must be.
        openapi_extra={"requestBody": http.json_body(ChatCompletionRequest)},
    )
    async def chat_completions(self, request: Request):
        record = RequestRecord(http.request_id(request), None)
        with self._tracked(record, emit_on_success=False):  # the record goes on past the parse
            parsed = await self.service.parse(await request.body())
        record.stream = parsed.request.stream
        if not parsed.request.stream:
            with self._tracked(record):
                return await self.service.complete(parsed, record)
        chunks = self._tracked_stream(self.service.stream(parsed, record), record)
        return await http.event_stream(chunks, record.request_id, self.config.http.sse_keepalive_s)

    @app.post("/v1/responses", openapi_extra={"requestBody": http.json_body(ResponsesRequest)})
    async def responses(self, request: Request):
        """The Responses API: the same generation as chat completions, in its shapes."""
        record = RequestRecord(http.request_id(request), None)
        with self._tracked(record, emit_on_success=False):
            body = await request.body()
            wanted, parsed = await asyncio.to_thread(parse_responses_request, body, self.service)
        record.stream = wanted.stream
        if not wanted.stream:
            with self._tracked(record):
                return response_from_completion(wanted, await self.service.complete(parsed, record))
        chunks = self._tracked_stream(self.service.stream(parsed, record), record)
        events = response_events(wanted, chunks)
        return await http.named_event_stream(events, record.request_id, self.config.http.sse_keepalive_s)

    @app.post(
        "/tokenize",
        response_model=TokenizeResponse,
        openapi_extra={"requestBody": http.json_body(TokenizeRequest)},
    )
    async def tokenize(self, request: Request):
        """vLLM's /tokenize: a prompt, or chat messages with their images counted as the model does."""
        return await self.service.tokenize(await request.body())

    @app.post(
        "/detokenize",
        response_model=DetokenizeResponse,
        openapi_extra={"requestBody": http.json_body(DetokenizeRequest)},
    )
    async def detokenize(self, request: Request):
        """vLLM's /detokenize."""
        return await self.service.detokenize(await request.body())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """The browser playground: one page, everything it needs inline, the same /v1 API."""
        if not self.config.ingress.playground:
            raise NotFound("the playground is off on this server (ingress.playground: false)")
        return HTMLResponse(playground.PAGE, headers=playground.HEADERS)

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.config.model.public_name, created=now())])

    @app.get("/health")
    async def health(self) -> dict:
        """200 while the model deployment answers (its engine loop alive, not wedged), else 503."""
        return {"status": "ok", "model": await self.health_probe.check()}

    # -- the same surface for other Ray Serve apps (serve.get_app_handle(...)) ---------------

    async def chat(self, request: dict) -> dict:
        """A non-streamed chat completion as a dict; raises the same typed errors as HTTP maps."""
        record = RequestRecord(self._serve_request_id(), stream=False)
        with self.admission.slot(), self._tracked(record):
            return (await self.service.complete(request, record)).model_dump()

    async def chat_stream(self, request: dict) -> AsyncIterator[dict]:
        """OpenAI chunks as dicts; call with `handle.options(stream=True)`."""
        record = RequestRecord(self._serve_request_id(), stream=True)
        with self.admission.slot():
            async for chunk in self._tracked_stream(self.service.stream(request, record), record):
                yield chunk.model_dump()

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (503) and wait up to `timeout_s` for the running ones to finish;
        returns how many are still running then."""
        self.admission.drain()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.admission.inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self.admission.inflight

    async def stats(self) -> dict:
        return {**process_stats(), "inflight": self.admission.inflight}

    # -- telemetry ---------------------------------------------------------------------------

    @staticmethod
    def _serve_request_id() -> str | None:
        """The id Serve gave this handle call (HTTP requests get theirs from the header)."""
        try:
            return serve.context._get_serve_request_context().request_id or None
        except Exception:  # outside a request
            return None

    def _rejected(self, error: LlavaServeError, request_id: str | None) -> None:
        """A request answered before it reached the chat service (the door check's 503 or 413, a
        body FastAPI could not validate) is counted and logged like any other."""
        record = RequestRecord(request_id, stream=None)
        record.fail(error)
        self._emit(record)

    @contextlib.contextmanager
    def _tracked(self, record: RequestRecord, emit_on_success: bool = True):
        """Close `record` however the request ends, then emit its metrics and log line (with
        `emit_on_success` false, only if it ends here: a stage that hands over to another record)."""
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            record.cancel()
            self._emit(record)
            raise
        except Exception as e:
            record.fail(unwrap(e))
            self._emit(record)
            raise
        if emit_on_success:
            self._emit(record)

    def _emit(self, record: RequestRecord) -> None:
        record.finish()
        try:
            self.metrics.record(record)
            logger.info(record.log_line())
        except Exception:  # telemetry must never turn an answer into an error
            logger.exception("could not record request %s", record.request_id)

    async def _tracked_stream(self, chunks: AsyncIterator, record: RequestRecord) -> AsyncIterator:
        with self._tracked(record):
            async for chunk in chunks:
                yield chunk
