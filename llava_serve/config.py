"""Declarative, validated configuration: one shape for `serve_config.yaml` args and Python.

`AppConfig` is what `deployments.app.build_app` takes. `serve run deployments.app:build_app
model=DIR` passes plain strings, so `model` also accepts a bare name or path.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

MiB = 1024 * 1024


class _Strict(BaseModel):
    # A misspelt knob in YAML must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Which checkpoint to serve and how to place it."""

    name: str = Field(
        "tiny",
        description="'tiny', 'tiny-next' or 'tiny-onevision' (the embedded random-weight LLaVA-1.5, "
        "LLaVA-NeXT and LLaVA-OneVision checkpoints, built on first use), "
        "a local directory, or a hub id such as llava-hf/llava-1.5-7b-hf.",
    )
    served_name: str | None = Field(None, description="Name reported by /v1/models; defaults to `name`.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="'auto' means float16 on CUDA and float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tiny_preset: Literal["tiny", "small", "small-336"] = Field(
        "tiny",
        description="Which embedded checkpoint 'tiny' builds (small, and small-336 with LLaVA-1.5's "
        "576-token images, are for benchmarks).",
    )
    cache_dir: str | None = Field(
        None, description="Where embedded checkpoints are built; default ~/.cache/llava-serve."
    )

    @property
    def public_name(self) -> str:
        return self.served_name or self.name


class ImageConfig(_Strict):
    """Limits on caller-supplied images; each one stops a specific abuse."""

    max_bytes: int = Field(20 * MiB, gt=0, description="Encoded bytes per image, enforced while streaming.")
    max_pixels: int = Field(
        50_000_000,
        gt=0,
        # Pillow's own bomb guard (PIL.Image.MAX_IMAGE_PIXELS) is left as it is, process-wide;
        # a limit above it could never be reached.
        le=89_478_485,
        description="Decoded width*height per image; stops decompression bombs.",
    )
    max_aspect_ratio: float = Field(
        20.0,
        ge=1,
        description="Longest over shortest edge. Processors scale the shortest edge up to the tower's "
        "side, so a thin image grows by this factor (the size after resizing is also held to max_pixels).",
    )
    max_images_per_request: int = Field(
        4, ge=0, description="Images and videos across all messages of one request."
    )
    max_video_bytes: int = Field(
        50 * MiB, gt=0, description="Encoded bytes per video (video_url parts; OneVision checkpoints)."
    )
    max_video_seconds: float = Field(120.0, gt=0, description="Longest video accepted, by its container.")
    max_video_frames: int = Field(
        8, gt=0, description="Frames sampled uniformly from a video; each costs ~tokens of a quarter tile."
    )
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0, description="Longest silence between two reads.")
    total_timeout_s: float = Field(20.0, gt=0, description="Whole fetch, so a slow drip cannot hold a slot.")
    max_redirects: int = Field(3, ge=0)
    allowed_formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP"],
        description="Pillow format names accepted after decoding the header.",
    )
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs exempt from the private-address (SSRF) guard, e.g. an internal CDN.",
    )
    allowed_ports: list[int] = Field(
        default_factory=lambda: [80, 443],
        description="Ports an image URL may name on a public host (hosts in allow_hosts may use any).",
    )
    fetch_cache_bytes: int = Field(
        64 * MiB, ge=0, description="Cache of fetched bodies the origin marked cacheable, by URL; 0 disables."
    )
    fetch_cache_max_ttl_s: float = Field(300.0, ge=0, description="Longest a fetched body is reused.")
    pixel_hold_s: float = Field(
        30.0,
        gt=0,
        description="How long a preprocessor keeps the tiles it put in the object store, so the model "
        "replica can fetch them (it does when the request reaches it); a request later than that "
        "is retried from the start.",
    )
    decode_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Wall-clock limit on decoding and preprocessing one image, in a worker process "
        "that is killed at the limit (a progressive JPEG of thousands of scans, a huge canvas).",
    )
    video_decode_timeout_s: float = Field(
        30.0, gt=0, description="The same limit for one video or animation, all its sampled frames."
    )
    decode_workers: int | None = Field(
        None,
        gt=0,
        description="Worker processes per image-preprocessor replica; default: its num_cpus, rounded up.",
    )
    allowed_local_root: str | None = Field(
        None, description="If set, file paths under this directory are accepted as image sources."
    )
    tls_ca_bundle: str | None = Field(
        None,
        description="PEM file of the CAs trusted for https image fetches, e.g. an internal CDN's "
        "private CA; default: the certifi bundle.",
    )

    def for_video(self) -> ImageConfig:
        """The same limits with the byte ceiling of a video."""
        return self.model_copy(update={"max_bytes": self.max_video_bytes})

    @field_validator("allowed_formats")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [f.upper() for f in v]


class GenerationConfig(_Strict):
    """Defaults for sampling parameters a request leaves out, and the hard ceiling on output."""

    max_tokens: int = Field(256, gt=0, description="Default when a request sets none.")
    max_tokens_limit: int = Field(4096, gt=0, description="Largest max_tokens a request may ask for.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    max_n: int = Field(8, gt=0, description="Most choices (`n`) one request may ask for.")


class GrammarLimits(_Strict):
    """llguidance's parser and lexer limits for every output grammar, set here rather than left to
    the library's defaults, which allow a single grammar about 500 MB of lexer states."""

    max_items_in_row: int = Field(2000, gt=0, description="Branches of one grammar rule (an anyOf, an enum).")
    initial_lexer_fuel: int = Field(
        1_000_000, gt=0, description="Work building a grammar's regular expressions (about 50 000 a ms)."
    )
    step_lexer_fuel: int = Field(
        200_000, gt=0, description="Lexer work for one token mask (about 14 000 a ms): bounds a step's wait."
    )
    step_max_items: int = Field(
        50_000, gt=0, description="Parser items for one token mask (about 20 000 a ms)."
    )
    max_lexer_states: int = Field(
        50_000, gt=0, description="Lexer states one grammar may build, 1-2 kB each: bounds its memory."
    )
    max_grammar_size: int = Field(200_000, gt=0, description="Symbols in a grammar's rules.")


class EngineConfig(_Strict):
    """The model replica's continuous-batching engine."""

    max_batch_size: int = Field(16, gt=0, description="Requests decoded together in one step.")
    max_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="Optional cap on prompt + max_tokens summed over running requests: a newcomer that "
        "would pass it waits. Unset: admission is by free KV slots alone (each slot holds its request "
        "to prompt + max_tokens, checked when it is submitted, so a running request always has room "
        "to grow).",
    )
    max_queue: int = Field(256, ge=0, description="Admitted-but-waiting requests; beyond it, 503.")
    image_cache_bytes: int = Field(256 * MiB, ge=0, description="LRU of vision-tower outputs; 0 disables.")
    kv_cache_bytes: int | None = Field(
        None,
        gt=0,
        description="KV cache, allocated once: max_batch_size slots of this many bytes together. "
        "Unset: on a GPU, what gpu_memory_utilization leaves once the weights are loaded; on CPU, "
        "every slot holds the model's whole context.",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="With kv_cache_bytes unset on a GPU: the share of the device's memory the replica "
        "may fill (weights, KV slots and anything else already there); the rest is headroom for "
        "activations.",
    )
    max_step_tokens: int = Field(
        512,
        ge=32,
        description="Tokens one step computes: a token per decoding row, the rest prompt chunks of "
        "joining requests (oldest first). Smaller keeps running streams' cadence while long prompts "
        "join; larger prefills faster.",
    )
    max_step_vision_tiles: int = Field(
        32,
        gt=0,
        description="Image tiles (and video frames) one step sends through the vision tower: requests "
        "whose images would pass it start at a later step (at least one request starts every step).",
    )
    prefix_cache_bytes: int = Field(
        256 * MiB,
        ge=0,
        description="KV of finished requests kept (LRU) so a prompt that starts the same (a follow-up "
        "turn, a shared system prompt) computes only the rest. 0 disables.",
    )

    @model_validator(mode="after")
    def _room_for_prompts(self) -> EngineConfig:
        if self.max_step_tokens <= self.max_batch_size:
            raise ValueError(
                "engine.max_step_tokens must exceed engine.max_batch_size: a full batch's decode takes "
                "that many, and joining prompts need the rest"
            )
        return self

    grammar_cache_bytes: int = Field(
        128 * 2**20,
        gt=0,
        description="Compiled output grammars (response_format schemas, tool calls) kept, LRU, weighed "
        "by their estimated memory (a matcher holds about 64 bytes per character of its grammar).",
    )
    grammar_timeout_s: float = Field(
        5.0,
        gt=0,
        description="A grammar not compiled (with its first token mask) within this long is refused "
        "with a 400; the same format is then refused at once while it stays in the cache.",
    )
    grammar_limits: GrammarLimits = Field(default_factory=lambda: GrammarLimits())
    stall_timeout_s: float = Field(
        60.0, gt=0, description="Health check fails if work is pending and no step finished for this long."
    )
    stream_interval_s: float = Field(
        0.05,
        ge=0,
        description="After a stream's first token, its tokens go out at most this often, several per "
        "message when steps are faster: each message costs every hop through Serve the same, so "
        "one per token would spend the CPU that overload refusals need. 0: one message per step. "
        "(Ray Serve LLM batches its streams the same way, every 50 ms by default.)",
    )
    max_stream_messages_per_s: float = Field(
        180.0,
        ge=0,
        description="Messages per second the replica's streams share after their first tokens: with n "
        "requests running, each stream sends at most every max(stream_interval_s, n / this). A message "
        "costs every hop through Serve the same CPU whatever it carries, and on a CPU-bound replica that "
        "CPU comes out of the forward passes. 0: no shared budget.",
    )


class AdmissionConfig(_Strict):
    """Refusing excess work at the door, before any image is fetched or prompt tokenized."""

    max_inflight_requests: int = Field(
        128,
        ge=0,
        description="Requests one ingress replica works on at once; beyond it, an immediate 503. "
        "0 disables. Keep it under ingress.max_ongoing_requests, or Serve queues first.",
    )
    retry_after_s: int = Field(1, ge=0, description="The Retry-After header on those 503s.")
    max_receiving: int = Field(
        256,
        ge=0,
        description="Bodies one ingress replica receives at once that did not arrive in one piece; "
        "beyond it an immediate 503. A request takes an in-flight slot only once its body is in, "
        "so slow uploads never keep others out. 0 disables.",
    )


class LimitsConfig(_Strict):
    """Limits on what one HTTP request may carry, checked before its body is parsed."""

    max_request_bytes: int = Field(
        32 * MiB,
        gt=0,
        description="Largest request body; a larger one is a 413 before it is read. Inline images "
        "count toward it (base64 makes them 4/3 their size).",
    )
    max_json_values: int = Field(
        100_000,
        gt=0,
        description="JSON values in a body (counted from its commas and brackets before it is parsed): "
        "a 32 MiB body of tiny values would hold the parser for seconds.",
    )
    min_body_bytes_per_s: int = Field(
        16 * 1024,
        ge=0,
        description="After body_grace_s, a body must keep arriving at this average rate or the request "
        "is a 408 (a client trickling bytes holds a connection, never a slot). 0 disables.",
    )
    body_grace_s: float = Field(10.0, gt=0, description="Seconds a body may take before its rate counts.")
    max_messages: int = Field(512, gt=0, description="Messages in one request.")
    max_content_parts: int = Field(1024, gt=0, description="Content parts across all messages.")
    max_text_chars: int = Field(
        1_000_000,
        gt=0,
        description="Characters of text across all messages (the context length bounds tokens).",
    )
    max_tools: int = Field(128, gt=0, description="Tools offered in one request.")
    max_schema_bytes: int = Field(
        64 * 1024, gt=0, description="Each response_format or tool-parameter schema, as compact JSON."
    )
    max_schema_nodes: int = Field(
        4096, gt=0, description="JSON values in each schema: bounds its checking and grammar compilation."
    )


class AuthConfig(_Strict):
    """Who may call the HTTP API. With no key from any source, the API is open (a warning is logged)."""

    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted bearer keys. Prefer api_keys_env or api_keys_file: YAML is often shared.",
    )
    api_keys_env: str | None = Field(
        "LLAVA_SERVE_API_KEYS",
        description="Environment variable (of the ingress replicas) holding comma-separated keys.",
    )
    api_keys_file: str | None = Field(None, description="File of keys, one per line; keep it mode 0600.")
    public_models: bool = Field(False, description="Let /v1/models (and /openapi.json) answer without a key.")
    require_ray_token: bool = Field(
        True,
        description="Refuse to start on a Ray cluster without token authentication (RAY_AUTH_MODE=token): "
        "Ray's ports run code for anyone who reaches them.",
    )


class HttpConfig(_Strict):
    """How the ingress talks HTTP beyond the OpenAI routes themselves."""

    sse_keepalive_s: float = Field(
        15.0,
        gt=0,
        description="A stream sends an SSE comment this often, so proxies and clients do not time out "
        "a request that waits in the queue or in prefill.",
    )
    health_cache_s: float = Field(
        1.0, ge=0, description="/health reuses the model replica's last answer for this long."
    )
    health_timeout_s: float = Field(
        2.0, gt=0, description="/health reports the model as not answering after this long."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header names the server answers to (e.g. [localhost, 127.0.0.1, "
        "api.example.com]); anything else is a 400. Empty: any. Stops DNS rebinding against a "
        "server on a developer's machine.",
    )


class RoutingConfig(_Strict):
    """How the ingress picks a model replica for each request (`deployments.routing`)."""

    policy: Literal["prefix_affinity", "default"] = Field(
        "prefix_affinity",
        description="prefix_affinity: the replica holding the longest cached prefix of the prompt "
        "(token ids and image content hashes), unless the match is short or that replica is "
        "overloaded; default: Serve's power of two choices.",
    )
    block_tokens: int = Field(16, gt=0, description="Prompt positions per digest of the routing key.")
    min_match_share: float = Field(
        0.5, ge=0, le=1, description="Share of a prompt's blocks a replica must hold to win by affinity."
    )
    max_imbalance: int = Field(
        8,
        ge=0,
        description="Requests in flight by which the best-matching replica may exceed the least "
        "loaded one; past it the least loaded wins.",
    )
    stats_period_s: float = Field(
        2.0, gt=0, description="How often each model replica reports the prefixes it holds."
    )
    max_sent_blocks: int = Field(
        65536, gt=0, description="Per replica, digests of requests sent to it kept until its next report."
    )


class EngineAutoscaling(_Strict):
    """Model replicas from the engines' own load: each replica reports the larger of its rows in
    use (running + waiting over `engine.max_batch_size`) and its KV share in use, and Serve aims at
    `target_load` per replica. A replica removed drains: it takes no new requests and its streams
    finish (up to `graceful_shutdown_timeout_s`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, gt=0)
    initial_replicas: int | None = Field(None, ge=0)
    target_load: float = Field(0.75, gt=0, le=1, description="Load per replica the policy aims at.")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="Window the load is averaged over.")
    metrics_interval_s: float = Field(5.0, gt=0, description="How often each replica reports its load.")

    @model_validator(mode="after")
    def _bounds(self) -> EngineAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    def to_serve(self) -> dict[str, Any]:
        """Serve's `autoscaling_config`, with the engine-load policy."""
        fields = self.model_dump(exclude={"target_load", "initial_replicas"})
        if self.initial_replicas is not None:
            fields["initial_replicas"] = self.initial_replicas
        policy = {
            "policy_function": "deployments.autoscaling:EngineLoadPolicy",
            "policy_kwargs": {"target_load": self.target_load},
        }
        return {**fields, "policy": policy}


class DeploymentOptions(_Strict):
    """Ray Serve knobs for one deployment."""

    num_replicas: int | Literal["auto"] = 1
    num_cpus: float = Field(0.25, ge=0, description="Logical CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, gt=0)
    max_queued_requests: int = Field(-1, description="-1: unbounded; otherwise excess gets 503.")
    autoscaling_config: dict[str, Any] | None = None
    resources: dict[str, float] | None = Field(None, description="Custom Ray resources, e.g. a node label.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the replicas.")
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="On redeploy or scale-down, how long in-flight requests may finish."
    )

    def to_serve_options(self) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            actor["resources"] = self.resources
        if self.env_vars:
            actor["runtime_env"] = {"env_vars": self.env_vars}
        opts: dict[str, Any] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class IngressOptions(DeploymentOptions):
    """The ingress's Serve knobs, and what it serves besides the API."""

    playground: bool = Field(
        True,
        description="Serve the browser playground at `/`; production configs turn it off (then 404).",
    )

    def to_serve_options(self) -> dict[str, Any]:
        return DeploymentOptions.model_validate(self.model_dump(exclude={"playground"})).to_serve_options()


class ModelOptions(DeploymentOptions):
    """The model deployment's Serve knobs: `autoscaling` scales it on the engines' own load."""

    autoscaling: EngineAutoscaling | None = Field(
        None, description="Scale model replicas on engine load (takes the place of num_replicas)."
    )

    @model_validator(mode="after")
    def _one_scaling(self) -> ModelOptions:
        if self.autoscaling is not None and self.autoscaling_config is not None:
            raise ValueError("give llava_model either autoscaling or autoscaling_config, not both")
        return self

    def to_serve_options(self) -> dict[str, Any]:
        opts = DeploymentOptions.model_validate(self.model_dump(exclude={"autoscaling"})).to_serve_options()
        if self.autoscaling is not None:
            opts.pop("num_replicas", None)
            opts["autoscaling_config"] = self.autoscaling.to_serve()
        return opts


# Where a deployment's defaults differ from `DeploymentOptions`' own. A deployment section in
# YAML is laid over these, so `llava_model: {num_gpus: 1}` keeps the rest.
DEPLOYMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    # Room for a burst's refusals beside the admitted requests: past this, Serve holds connections
    # in the proxy's scheduler instead of our door check answering them at once.
    "ingress": {"max_ongoing_requests": 1024},
    # glibc gives each thread its own malloc arena and, after large frees, raises its mmap
    # threshold so later image-sized buffers land on a heap it rarely gives back. Two arenas and
    # a fixed threshold keep RSS flat under a stream of large or hostile images.
    # Bounded queues in front of the CPU deployments: a burst of images waits for a preprocessor
    # up to this, then is a 503, rather than piling up in every ingress's router.
    "image_preprocessor": {
        "env_vars": {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"},
        "max_queued_requests": 256,
    },
    "prompt_tokenizer": {"max_queued_requests": 256},
    # The engine batches internally, so the replica must accept many concurrent streams.
    "llava_model": {"num_cpus": 1.0, "max_ongoing_requests": 256},
}


def _deployment_default(name: str, kind: type[DeploymentOptions] = DeploymentOptions):
    return lambda: kind(**DEPLOYMENT_DEFAULTS[name])


class AppConfig(_Strict):
    """Everything `build_app` needs; every field is reachable from `serve_config.yaml`."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    images: ImageConfig = Field(default_factory=ImageConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    ingress: IngressOptions = Field(default_factory=_deployment_default("ingress", IngressOptions))
    image_preprocessor: DeploymentOptions = Field(default_factory=_deployment_default("image_preprocessor"))
    prompt_tokenizer: DeploymentOptions = Field(default_factory=_deployment_default("prompt_tokenizer"))
    llava_model: ModelOptions = Field(default_factory=_deployment_default("llava_model", ModelOptions))
    routing: RoutingConfig = Field(default_factory=RoutingConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator(*DEPLOYMENT_DEFAULTS, mode="before")
    @classmethod
    def _over_defaults(cls, v: Any, info: ValidationInfo) -> Any:
        return {**DEPLOYMENT_DEFAULTS[info.field_name], **v} if isinstance(v, dict) else v

    def edge_max_inflight(self) -> int:
        """What a Serve proxy in front of every ingress replica lets through at most
        (`deployments.proxy`, LLAVA_SERVE_EDGE_MAX_INFLIGHT): all their admission slots, at the
        most replicas the ingress may have; 0 (no limit at the proxy) with admission off or a
        replica count only Serve knows."""
        replicas = self.ingress.num_replicas
        if self.ingress.autoscaling_config is not None:
            replicas = self.ingress.autoscaling_config.get("max_replicas")
        if not isinstance(replicas, int):
            return 0
        return self.admission.max_inflight_requests * replicas

    @model_validator(mode="after")
    def _check_limits(self) -> AppConfig:
        if self.generation.max_tokens > self.generation.max_tokens_limit:
            raise ValueError("generation.max_tokens must not exceed generation.max_tokens_limit")
        limit = self.admission.max_inflight_requests
        if limit and limit >= self.ingress.max_ongoing_requests:
            raise ValueError(
                "admission.max_inflight_requests must be below ingress.max_ongoing_requests, "
                "or it can never refuse anything (Serve would queue the excess first)"
            )
        ingresses, models = self.ingress.num_replicas, self.llava_model.num_replicas
        if self.llava_model.autoscaling is not None:
            models = self.llava_model.autoscaling.min_replicas or 1
        if limit and isinstance(ingresses, int) and isinstance(models, int):
            admitted, taken = limit * ingresses, self.llava_model.max_ongoing_requests * models
            if admitted > taken:
                raise ValueError(
                    f"ingresses admit {admitted} requests ({ingresses} x admission.max_inflight_requests) "
                    f"but the model replicas take {taken} ({models} x llava_model.max_ongoing_requests): "
                    "the rest would queue inside Serve, where overload cannot get a fast 503"
                )
        return self


# What a running app may change without restarting a replica, by deployment: whole sections
# (None) or some of a section's fields. Serve carries each share as that deployment's
# `user_config` and hands it to the replica's `reconfigure`; in a Serve config file it sits in
# the app's `deployments:` list rather than in `args`, whose every change gives all deployments a
# new code version, so every replica restarts and the model reloads its weights.
RUNTIME_KNOBS: dict[str, dict[str, frozenset[str] | None]] = {
    "Ingress": {"http": None, "limits": None, "admission": None, "generation": None},
    "LlavaModel": {
        "engine": frozenset(
            {"stream_interval_s", "max_stream_messages_per_s", "stall_timeout_s", "grammar_timeout_s"}
        )
    },
}


def runtime_share(config: AppConfig, deployment: str) -> dict[str, Any]:
    """`deployment`'s runtime knobs in `config`, as its `user_config` (plain JSON)."""
    dumped = config.model_dump(mode="json")
    return {
        section: dumped[section] if fields is None else {k: dumped[section][k] for k in sorted(fields)}
        for section, fields in RUNTIME_KNOBS[deployment].items()
    }


def with_runtime(config: AppConfig, deployment: str, user_config: dict[str, Any]) -> AppConfig:
    """`config` with `deployment`'s runtime knobs taken from `user_config`, validated as a whole;
    a knob that is not runtime (or not `deployment`'s) is refused by name."""
    knobs = RUNTIME_KNOBS[deployment]
    tree = config.model_dump()
    for section, values in (user_config or {}).items():
        if section not in knobs or not isinstance(values, dict):
            raise ValueError(f"{deployment}'s user_config takes {sorted(knobs)}, not {section!r}")
        fields = knobs[section]
        for name, value in values.items():
            if fields is not None and name not in fields:
                raise ValueError(
                    f"{section}.{name} is not a runtime knob of {deployment} (runtime: {sorted(fields)})"
                )
            tree[section][name] = value
    return AppConfig.model_validate(tree)


def from_serve_app(app: dict[str, Any]) -> dict[str, Any]:
    """An app entry of a Serve config file as `AppConfig`'s shape: its `args`, with the runtime
    knobs of its `deployments:` entries laid over them."""
    tree = dict(app.get("args") or {})
    for deployment in app.get("deployments") or []:
        for section, values in (deployment.get("user_config") or {}).items():
            tree[section] = {**(tree.get(section) or {}), **values}
    return tree
