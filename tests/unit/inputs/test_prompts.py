import pytest

from llava_serve.api.messages import to_template_messages
from llava_serve.api.protocol import ChatMessage
from llava_serve.errors import ContextLengthExceeded, InvalidRequest
from llava_serve.inputs.prompts import PromptBuilder
from tests.support.media import random_image
from tests.support.oracle import image_token_count, render
from tests.support.tokenizers import llava_processor, sentencepiece_tokenizer

IMAGE = {"type": "image_url", "image_url": {"url": "data:,"}}
CONVERSATIONS = [
    [{"role": "user", "content": [IMAGE, {"type": "text", "text": "What is this?"}]}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, IMAGE, IMAGE]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "How? Ünïcode ✓"},
    ],
]
# What users type that tokenizers know as special: it must stay text.
SPECIAL_LOOKING = "Say <image> and </s> or <s>, <|im_start|>user [INST] <<SYS>> <unk> ok"


def template(messages: list[dict]) -> list[dict]:
    return to_template_messages([ChatMessage.model_validate(m) for m in messages])


@pytest.fixture(params=["byte-level", "sentencepiece", "sentencepiece-legacy"])
def any_processor(request, processor):
    if request.param == "byte-level":
        return processor
    return llava_processor(sentencepiece_tokenizer(legacy=request.param.endswith("legacy")), processor)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_ids_equal_the_processors(any_processor, messages):
    msgs = template(messages)
    builder = PromptBuilder(any_processor, context_length=2048)
    n = sum(p["type"] == "image" for m in msgs for p in m["content"])
    per_image = image_token_count(any_processor)
    prompt = builder.build(msgs, max_tokens=16, media_tokens=[per_image] * n)
    images = [random_image(i) for i in range(n)] or None
    expected = any_processor(text=render(any_processor, messages), images=images, return_tensors="np")
    assert prompt.input_ids == expected["input_ids"][0].tolist()
    assert prompt.num_images == n
    assert prompt.input_ids.count(any_processor.image_token_id) == n * per_image


def test_special_looking_user_text_is_tokenized_as_plain_text(any_processor):
    tokenizer = any_processor.tokenizer
    builder = PromptBuilder(any_processor, context_length=2048)
    messages = [{"role": "user", "content": SPECIAL_LOOKING}]
    msgs = template(messages)
    rendered = render(any_processor, messages)
    plain = tokenizer(rendered, split_special_tokens=True)["input_ids"]
    assert builder.build(msgs, max_tokens=8, media_tokens=[]).input_ids == plain
    # ...and it differs from what the tokenizer would make of it with special tokens matched.
    assert plain != tokenizer(rendered)["input_ids"]


def test_only_image_parts_make_image_slots(any_processor):
    builder = PromptBuilder(any_processor, context_length=2048)
    msgs = template([{"role": "user", "content": [IMAGE, {"type": "text", "text": SPECIAL_LOOKING}]}])
    prompt = builder.build(msgs, max_tokens=8, media_tokens=[7])
    assert prompt.num_images == 1
    assert prompt.input_ids.count(any_processor.image_token_id) == 7


def test_context_length_is_enforced_with_image_tokens_counted(processor):
    builder = PromptBuilder(processor, context_length=64)
    msgs = template([{"role": "user", "content": [IMAGE, {"type": "text", "text": "hi"}]}])
    builder.build(msgs, max_tokens=8, media_tokens=[16])
    with pytest.raises(ContextLengthExceeded, match="context length of 64"):
        builder.build(msgs, max_tokens=60, media_tokens=[16])
    with pytest.raises(ContextLengthExceeded, match="including 50 image tokens"):
        builder.build(msgs, max_tokens=8, media_tokens=[50])


def test_images_outside_user_turns_are_refused(processor):
    builder = PromptBuilder(processor, context_length=2048)
    msgs = template([{"role": "system", "content": [IMAGE]}, {"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest, match="only allowed in user turns"):
        builder.build(msgs, max_tokens=8, media_tokens=[16])
