import hashlib
from pathlib import Path

from llava_serve.cli import main


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
