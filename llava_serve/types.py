"""The values that cross the package lines: what the inputs hand the engine (`PreparedImage`,
`PromptInputs`, `TemplateMessage`) and what the engine streams back to the API (`StepOutput`).

Plain dataclasses with no behaviour beyond their own fields, so that every package can import
them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A temperature below this is greedy, as 0 is: the API documents it and the sampler applies it.
GREEDY_BELOW = 1e-5

# A template message: {"role": ..., "content": [{"type": "text", "text": ...} | {"type": "image"}]}.
# The shape chat templates expect, and all the tokenizer needs: it never sees image bytes.
TemplateMessage = dict[str, Any]


@dataclass(frozen=True)
class PromptInputs:
    input_ids: list[int]
    num_images: int
    tokenize_s: float = 0.0  # what rendering and tokenizing took, for the request's record
    # The prompt's prefix key, block by block (`llava_serve.routing.key`): what the request router
    # matches against what each model replica holds, and what the replica reports it holds.
    route_blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class PreparedImage:
    """Model-ready tiles (or a video's frames), what the prompt needs to know of them, and the
    hash that keys the engine's vision cache."""

    # float32 [tiles, 3, H, W], base tile first. Between deployments, a reference to them in the
    # object store (so the ingress and the tokenizer never hold pixels); the model resolves it.
    pixel_values: Any
    content_hash: str  # of the tiles and of how they are encoded (base_only)
    size: tuple[int, int] = (0, 0)  # the original (height, width): anyres packing needs it
    num_tokens: int = 0  # placeholder tokens this image becomes in the prompt
    base_only: bool = False  # reduced to its base tile (detail low; OneVision's multi-image rule)
    kind: str = "image"  # or "video": then `pixel_values` are its sampled frames
    # Seconds this image spent being fetched and decoded + preprocessed (filled by the preprocessor).
    fetch_s: float = 0.0
    preprocess_s: float = 0.0


@dataclass(frozen=True)
class SampledLogprob:
    """A sampled token's log-probability under the model, and the most likely alternatives.

    `token` is the text this token added to the answer (so the tokens of an answer concatenate
    to its text; empty while a multi-byte character is incomplete), `bytes` the token's own
    bytes. The alternatives are (decoded text, bytes, log-probability).
    """

    token: str
    bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass(frozen=True)
class StepOutput:
    """What one request produced since its last output: one step's token, or several when its
    consumer fell behind and they were sent together. `text` may be empty while held back;
    `logprobs` has an entry per token when they were asked for."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[SampledLogprob, ...] = ()
    # Seconds per stage before the first token (image_fetch, image_preprocess, tokenize, queue,
    # vision_encode, prefill); on the first output only.
    stages: dict[str, float] | None = None
    index: int = 0  # which of the request's `n` choices this is
    cached_tokens: int = 0  # prompt positions whose KV came from the prefix cache, not computed

    @property
    def token_id(self) -> int:
        """The latest token: the next step's input."""
        return self.token_ids[-1]

    @property
    def accepted(self) -> bool:
        """The marker a stream starts with once the engine has queued the request."""
        return self.completion_tokens == 0

    def __add__(self, later: StepOutput) -> StepOutput:
        """This output followed by `later`, as one."""
        return StepOutput(
            self.token_ids + later.token_ids,
            self.text + later.text,
            later.finish_reason,
            later.prompt_tokens,
            later.completion_tokens,
            self.logprobs + later.logprobs,
            self.stages or later.stages,
            self.index,
            later.cached_tokens,
        )


# Sent first on the model deployment's stream: the request passed every check and is queued.
ACCEPTED = StepOutput(token_ids=(), text="", finish_reason=None, prompt_tokens=0, completion_tokens=0)
