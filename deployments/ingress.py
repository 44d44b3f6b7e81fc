"""The ingress: OpenAI-compatible HTTP routes and the same surface as Python handle methods."""

from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from llava_serve import http
from llava_serve.chat import ChatService, _prepend
from llava_serve.config import AppConfig
from llava_serve.protocol import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList, now

app = FastAPI(title="llava-serve", description="OpenAI-compatible chat completions for LLaVA models.")
http.install(app)


class HandleBackend:
    """`ChatService`'s backend over DeploymentHandles; responses are passed on unawaited."""

    def __init__(self, preprocessor: DeploymentHandle, tokenizer: DeploymentHandle, model: DeploymentHandle):
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        self.model = model.options(stream=True, method_name="generate")

    def prepare_image(self, source, param):
        return self.preprocessor.remote(source, param)

    def tokenize(self, messages, max_tokens):
        return self.tokenizer.remote(messages, max_tokens)

    def generate(self, prompt, params, images):
        return self.model.remote(prompt, params, *images)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, config: AppConfig, preprocessor, tokenizer, model):
        self.config = config
        self.service = ChatService(config, HandleBackend(preprocessor, tokenizer, model))

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        if not body.stream:
            return await self.service.complete(body)
        chunks = self.service.stream(body)
        first = await anext(chunks)  # errors before the first token still get a status code
        rid = request.state.request_id
        return StreamingResponse(http.sse(_prepend(first, chunks), rid), media_type="text/event-stream")

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.config.model.public_name, created=now())])

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    # -- the same surface for other Ray Serve apps (serve.get_app_handle(...)) ---------------

    async def chat(self, request: dict) -> dict:
        """A non-streamed chat completion as a dict; raises the same typed errors as HTTP maps."""
        return (await self.service.complete(request)).model_dump()

    async def chat_stream(self, request: dict) -> AsyncIterator[dict]:
        """OpenAI chunks as dicts; call with `handle.options(stream=True)`."""
        async for chunk in self.service.stream(request):
            yield chunk.model_dump()
