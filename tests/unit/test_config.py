"""The shipped configs validate and build into a Serve app without loading any weights."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.app import build
from llava_serve.config import RUNTIME_KNOBS, AppConfig, from_serve_app, runtime_share, with_runtime

ROOT = Path(__file__).resolve().parents[2]


def _app_args(path: Path) -> dict:
    """The app's `AppConfig` tree: its args with its deployments' runtime knobs laid over them."""
    data = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(data)
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app"
    return from_serve_app(data["applications"][0])


CONFIGS = [
    "configs/llava-1.5-7b.yaml",
    "configs/llava-v1.6-mistral-7b.yaml",
    "configs/llava-onevision-qwen2-7b.yaml",
]


@pytest.mark.parametrize("path", ["serve_config.yaml", *CONFIGS])
def test_shipped_configs_validate_and_build(path):
    config = AppConfig.model_validate(_app_args(ROOT / path))
    ingress = build(config)._bound_deployment  # binds deployments; nothing loads until replicas start
    assert ingress.name == "Ingress" and ingress.init_args[0] == config
    bound = {app._bound_deployment.name: app._bound_deployment for app in ingress.init_args[1:]}
    assert list(bound) == ["ImagePreprocessor", "PromptTokenizer", "LlavaModel"]
    for section, name in [("image_preprocessor", "ImagePreprocessor"), ("llava_model", "LlavaModel")]:
        options = getattr(config, section)
        assert bound[name].ray_actor_options["num_gpus"] == options.num_gpus
        assert bound[name].max_ongoing_requests == options.max_ongoing_requests


@pytest.mark.parametrize(
    ("path", "checkpoint"),
    [
        (CONFIGS[0], "llava-hf/llava-1.5-7b-hf"),
        (CONFIGS[1], "llava-hf/llava-v1.6-mistral-7b-hf"),
        (CONFIGS[2], "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    ],
)
def test_gpu_examples_pin_the_model_to_a_gpu_in_fp16(path, checkpoint):
    config = AppConfig.model_validate(_app_args(ROOT / path))
    assert config.model.name == checkpoint
    assert config.model.dtype == "float16" and config.model.device == "cuda"
    opts = config.llava_model.to_serve_options()
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert config.image_preprocessor.to_serve_options()["ray_actor_options"]["num_gpus"] == 0
    assert "autoscaling_config" in config.image_preprocessor.to_serve_options()


def test_default_config_is_every_default():
    assert AppConfig.model_validate(_app_args(ROOT / "serve_config.yaml")) == AppConfig()


def test_cli_shorthand_and_misspelt_knobs():
    assert AppConfig.model_validate({"model": "/models/x"}).model.name == "/models/x"
    with pytest.raises(ValidationError, match="max_batch_sise"):
        AppConfig.model_validate({"engine": {"max_batch_sise": 4}})
    with pytest.raises(ValidationError, match="max_tokens_limit"):
        AppConfig.model_validate({"generation": {"max_tokens": 10, "max_tokens_limit": 5}})


def test_a_partial_deployment_section_keeps_the_other_defaults():
    config = AppConfig.model_validate({"llava_model": {"num_gpus": 1}, "image_preprocessor": {"num_cpus": 2}})
    assert config.llava_model.max_ongoing_requests == AppConfig().llava_model.max_ongoing_requests == 256
    assert config.image_preprocessor.env_vars["MALLOC_ARENA_MAX"] == "2"
    actor = config.image_preprocessor.to_serve_options()["ray_actor_options"]
    assert actor["runtime_env"]["env_vars"]["MALLOC_ARENA_MAX"] == "2" and actor["num_cpus"] == 2


def test_the_model_must_take_every_request_the_ingresses_admit():
    with pytest.raises(ValidationError, match=r"llava_model\.max_ongoing_requests"):
        AppConfig.model_validate(
            {"admission": {"max_inflight_requests": 100}, "llava_model": {"max_ongoing_requests": 64}}
        )
    with pytest.raises(ValidationError, match=r"llava_model\.max_ongoing_requests"):
        AppConfig.model_validate({"ingress": {"num_replicas": 3}})  # 3 x 128 admitted, 256 taken


def test_pillows_own_bomb_guard_caps_max_pixels():
    with pytest.raises(ValidationError, match="max_pixels"):
        AppConfig.model_validate({"images": {"max_pixels": 100_000_000}})


def test_an_admission_limit_serve_would_never_reach_is_refused():
    with pytest.raises(ValidationError, match=r"below ingress\.max_ongoing_requests"):
        AppConfig.model_validate(
            {"admission": {"max_inflight_requests": 1100}, "llava_model": {"max_ongoing_requests": 1100}}
        )
    off = AppConfig.model_validate({"admission": {"max_inflight_requests": 0}})
    assert off.admission.max_inflight_requests == 0


def test_a_step_must_have_room_for_prompts_beside_a_full_batch():
    with pytest.raises(ValidationError, match=r"max_step_tokens must exceed engine\.max_batch_size"):
        AppConfig.model_validate({"engine": {"max_batch_size": 64, "max_step_tokens": 64}})
    ok = AppConfig.model_validate({"engine": {"max_batch_size": 64, "max_step_tokens": 65}})
    assert ok.engine.max_step_tokens == 65


def test_dependency_floors_exclude_releases_with_known_cves_in_what_we_use():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = {
        r.name.lower(): r.specifier
        for r in map(
            Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        )
    }
    # Pillow: libwebp (CVE-2023-4863, fixed 10.0.1), ImageCms (CVE-2024-28219, 10.3), CVE-2025-48379 (11.3).
    assert not deps["pillow"].contains(Version("11.2.1")) and deps["pillow"].contains(Version("11.3.0"))
    # torch.load with weights_only=True could run code before 2.6 (CVE-2025-32434).
    assert not deps["torch"].contains(Version("2.5.1")) and deps["torch"].contains(Version("2.6.0"))


def test_runtime_knobs_travel_as_user_config_and_only_they_do():
    config = AppConfig.model_validate({"http": {"sse_keepalive_s": 3}, "engine": {"stream_interval_s": 0.2}})
    ingress = build(config)._bound_deployment
    model = next(
        a._bound_deployment for a in ingress.init_args[1:] if a._bound_deployment.name == "LlavaModel"
    )
    assert ingress._deployment_config.user_config == runtime_share(config, "Ingress")
    assert model._deployment_config.user_config == {"engine": runtime_share(config, "LlavaModel")["engine"]}
    assert with_runtime(AppConfig(), "Ingress", runtime_share(config, "Ingress")).http.sse_keepalive_s == 3
    assert with_runtime(AppConfig(), "LlavaModel", {"engine": {"stream_interval_s": 0.2}}) == AppConfig(
        engine={"stream_interval_s": 0.2}
    )
    with pytest.raises(ValueError, match=r"engine\.max_batch_size is not a runtime knob"):
        with_runtime(AppConfig(), "LlavaModel", {"engine": {"max_batch_size": 2}})
    with pytest.raises(ValueError, match="not 'images'"):
        with_runtime(AppConfig(), "Ingress", {"images": {}})
    with pytest.raises(ValidationError):  # validated as a whole, as args are
        with_runtime(AppConfig(), "Ingress", {"http": {"sse_keepalive_s": -1}})


def test_the_shipped_config_keeps_its_runtime_knobs_out_of_args():
    """A change to `args` restarts every replica (Serve's code version hashes them), so the
    knobs meant to change on a running server live in the deployments' user_config."""
    (app,) = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    for deployment, sections in RUNTIME_KNOBS.items():
        (entry,) = [d for d in app["deployments"] if d["name"] == deployment]
        for section, fields in sections.items():
            moved = set(entry["user_config"][section])
            assert moved == (fields or set(AppConfig.model_fields[section].annotation.model_fields))
            assert not moved & set(app["args"].get(section, {}))


def test_the_proxy_limit_make_serve_sets_is_what_serve_config_yaml_admits():
    """`make serve` cannot run our code to work the number out, so it is written in the Makefile;
    this keeps it equal to the config's (admission.max_inflight_requests x Ingress replicas)."""
    (line,) = [x for x in (ROOT / "Makefile").read_text().splitlines() if x.startswith("EDGE_MAX_INFLIGHT")]
    config = AppConfig.model_validate(_app_args(ROOT / "serve_config.yaml"))
    assert int(line.split("=")[-1]) == config.edge_max_inflight() == 128
    autoscaling = {"min_replicas": 1, "max_replicas": 3}
    scaled = AppConfig.model_validate({"ingress": {"autoscaling_config": autoscaling}})
    assert scaled.edge_max_inflight() == 3 * 128
    assert AppConfig.model_validate({"admission": {"max_inflight_requests": 0}}).edge_max_inflight() == 0
