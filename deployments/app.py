"""The Ray Serve app builder: `serve run deployments.app:build_app model=DIR` or `serve_config.yaml`."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.cluster import require_token_auth
from deployments.ingress import Ingress
from deployments.model import LlavaModel
from deployments.preprocess import ImagePreprocessor, PromptTokenizer
from llava_serve.config import AppConfig, runtime_share


def build(config: AppConfig) -> Application:
    """Compose the deployments, each with its own options from `config`."""
    preprocessor = ImagePreprocessor.options(**config.image_preprocessor.to_serve_options()).bind(config)
    tokenizer = PromptTokenizer.options(**config.prompt_tokenizer.to_serve_options()).bind(config)
    # Runtime knobs also travel as each deployment's user_config, so that a Serve config changing
    # only them (in its `deployments:` list) reconfigures the replicas instead of replacing them.
    model = LlavaModel.options(
        **config.llava_model.to_serve_options(), user_config=runtime_share(config, "LlavaModel")
    ).bind(config)
    return Ingress.options(
        **config.ingress.to_serve_options(), user_config=runtime_share(config, "Ingress")
    ).bind(config, preprocessor, tokenizer, model)


def build_app(args: dict[str, Any]) -> Application:
    """Serve app builder (`serve run`, `serve deploy`); `args` has the shape of `AppConfig`
    (validated here). It runs on the cluster that will serve the app, so that is where Ray's token
    auth is checked."""
    config = AppConfig.model_validate(dict(args))
    if config.auth.require_ray_token:
        require_token_auth()
    return build(config)
