import hashlib
from pathlib import Path

import pytest

from deployments.cli import main


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_make_tiny_model_is_deterministic_and_loads_offline(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    main(["make-tiny-model", str(tmp_path / "a")])
    main(["make-tiny-model", str(tmp_path / "b")])
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    processor = AutoProcessor.from_pretrained(tmp_path / "a")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    assert processor.image_token_id == model.config.image_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert processor.chat_template


@pytest.mark.parametrize(
    ("arch", "model_class"),
    [
        ("llava_next", "LlavaNextForConditionalGeneration"),
        ("llava_onevision", "LlavaOnevisionForConditionalGeneration"),
    ],
)
def test_every_architecture_builds_deterministically_and_loads_offline(tmp_path, arch, model_class):
    import transformers

    from llava_serve.models import load_adapter

    main(["make-tiny-model", str(tmp_path / "a"), "--arch", arch])
    main(["make-tiny-model", str(tmp_path / "b"), "--arch", arch])
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    model = getattr(transformers, model_class).from_pretrained(tmp_path / "a")
    adapter = load_adapter(str(tmp_path / "a"))
    assert adapter.model_class == model_class and adapter.chat_template
    assert adapter.tokenizer.convert_tokens_to_ids(adapter.image_token) == model.config.image_token_id
    assert len(model.config.image_grid_pinpoints) >= 5  # anyres: a grid of tile arrangements


def test_model_name_picks_the_embedded_checkpoint_of_each_architecture(tmp_path):
    from llava_serve.config import ModelConfig
    from llava_serve.models import checkpoint, model_type

    for name, kind in [("tiny", "llava"), ("tiny-next", "llava_next"), ("tiny-onevision", "llava_onevision")]:
        path = checkpoint.resolve_path(ModelConfig(name=name, cache_dir=str(tmp_path)))
        assert model_type(path) == kind
