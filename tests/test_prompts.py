import pytest

from llava_serve.errors import ContextLengthExceeded, InvalidRequest
from llava_serve.prompts import PromptBuilder, image_sources
from llava_serve.protocol import ChatMessage
from tests.conftest import random_image


def _image_part():
    return {"type": "image_url", "image_url": {"url": "data:,"}}


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": [_image_part(), {"type": "text", "text": "What is this?"}]}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Compare"}, _image_part(), _image_part()]},
            {"role": "assistant", "content": "They differ."},
            {"role": "user", "content": "How? Ünïcode ✓"},
        ],
    ],
)
def test_ids_equal_the_processors(processor, messages):
    msgs = [ChatMessage.model_validate(m) for m in messages]
    builder = PromptBuilder(processor, context_length=2048)
    prompt = builder.build(msgs, max_tokens=16)
    n = len(image_sources(msgs))
    expected = processor(
        text=builder.render(msgs), images=[random_image(i) for i in range(n)] or None, return_tensors="np"
    )
    assert prompt.input_ids == expected["input_ids"][0].tolist()
    assert prompt.num_images == n
    assert prompt.input_ids.count(processor.image_token_id) == n * builder.tokens_per_image


def test_context_length_is_enforced_with_image_tokens_counted(processor):
    builder = PromptBuilder(processor, context_length=64)
    msgs = [ChatMessage(role="user", content=[_image_part(), {"type": "text", "text": "hi"}])]
    builder.build(msgs, max_tokens=8)
    with pytest.raises(ContextLengthExceeded, match="context length of 64"):
        builder.build(msgs, max_tokens=60)


def test_images_outside_user_turns_are_refused(processor):
    builder = PromptBuilder(processor, context_length=2048)
    msgs = [
        ChatMessage(role="system", content=[_image_part()]),
        ChatMessage(role="user", content="hi"),
    ]
    with pytest.raises(InvalidRequest, match="only allowed in user turns"):
        builder.build(msgs, max_tokens=8)
