"""What one request did, measured where the caller sees it, for metrics and a log line.

Kept free of Ray: `ChatService` fills a `RequestRecord`, and whoever owns the transport
decides where it goes (Prometheus through `ray.serve.metrics`, a JSON log line).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from llava_serve.errors import LlavaServeError


def source_kind(url: str) -> str:
    if url.startswith("data:"):
        return "data"
    if url.startswith(("http://", "https://")):
        return "http"
    return "other"


@dataclass
class RequestRecord:
    request_id: str | None
    stream: bool | None  # None: refused before the body was read
    started: float = field(default_factory=time.monotonic)
    image_sources: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    finished_at: float | None = None
    # Seconds per stage before the first token, as the model replica measured them.
    stages: dict[str, float] = field(default_factory=dict)
    outcome: str = "ok"  # ok | cancelled | the OpenAI error type
    status: int = 200
    finish_reason: str | None = None

    def token(self, completion_tokens: int, prompt_tokens: int) -> None:
        """Note an output step; only steps that add tokens count toward the latencies."""
        now = time.monotonic()
        if completion_tokens <= self.completion_tokens:
            return
        if self.first_token_at is None:
            self.first_token_at = now
        elif self.last_token_at is not None:
            added = completion_tokens - self.completion_tokens
            self.inter_token_s.append((now - self.last_token_at) / added)
        self.last_token_at = now
        self.completion_tokens, self.prompt_tokens = completion_tokens, prompt_tokens

    def fail(self, error: LlavaServeError) -> None:
        self.outcome, self.status = error.error_type, error.status_code

    def cancel(self) -> None:
        self.outcome, self.status = "cancelled", 499

    def finish(self) -> None:
        if self.finished_at is None:
            self.finished_at = time.monotonic()

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def total_s(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started

    @property
    def time_per_output_token_s(self) -> float | None:
        if self.first_token_at is None or self.completion_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.completion_tokens - 1)

    def stage_seconds(self) -> dict[str, float]:
        """Every stage this request went through: fetch, preprocess, tokenize, queue, vision
        encode, prefill (from the model replica), time per output token and end to end."""
        tpot = self.time_per_output_token_s
        return {
            **self.stages,
            **({} if tpot is None else {"time_per_output_token": tpot}),
            "end_to_end": self.total_s,
        }

    def log_line(self) -> str:
        """One JSON object per request, for log pipelines."""
        ttft = self.ttft_s
        return json.dumps(
            {
                "event": "chat_completion",
                "request_id": self.request_id,
                "stream": self.stream,
                "image_sources": self.image_sources,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
                "total_ms": round(self.total_s * 1000, 1),
                "stages_ms": {k: round(v * 1000, 2) for k, v in self.stage_seconds().items()},
                "finish_reason": self.finish_reason,
                "outcome": self.outcome,
                "status": self.status,
            }
        )
