"""The Ray Serve app builder: `serve run deployments.app:build_app model=DIR` or `serve_config.yaml`."""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.cluster import require_token_auth
from deployments.ingress import Ingress
from deployments.model import LlavaModel
from deployments.preprocess import ImagePreprocessor, PromptTokenizer
from llava_serve.config import AppConfig, RoutingConfig, runtime_share


def build(config: AppConfig) -> Application:
    """Compose the deployments, each with its own options from `config`."""
    preprocessor = ImagePreprocessor.options(**config.image_preprocessor.to_serve_options()).bind(config)
    tokenizer = PromptTokenizer.options(**config.prompt_tokenizer.to_serve_options()).bind(config)
    # Runtime knobs also travel as each deployment's user_config, so that a Serve config changing
    # only them (in its `deployments:` list) reconfigures the replicas instead of replacing them.
    model = LlavaModel.options(
        **config.llava_model.to_serve_options(),
        **request_router(config.routing),
        user_config=runtime_share(config, "LlavaModel"),
    ).bind(config)
    return Ingress.options(
        **config.ingress.to_serve_options(), user_config=runtime_share(config, "Ingress")
    ).bind(config, preprocessor, tokenizer, model)


def request_router(routing: RoutingConfig) -> dict[str, Any]:
    """The model deployment's router options: prefix affinity, or Serve's default."""
    if routing.policy == "default":
        return {}
    kwargs = {
        "min_match_share": routing.min_match_share,
        "max_imbalance": routing.max_imbalance,
        "max_sent_blocks": routing.max_sent_blocks,
        # Until a replica's report covers a request sent to it (it reports running requests too).
        "recent_s": 3 * routing.stats_period_s + 5.0,
    }
    config = RequestRouterConfig(
        request_router_class="deployments.routing:PrefixAffinityRouter",
        request_router_kwargs=kwargs,
        request_routing_stats_period_s=routing.stats_period_s,
        request_routing_stats_timeout_s=max(10.0, 5 * routing.stats_period_s),
    )
    return {"request_router_config": config}


def build_app(args: dict[str, Any]) -> Application:
    """Serve app builder (`serve run`, `serve deploy`); `args` has the shape of `AppConfig`
    (validated here). It runs on the cluster that will serve the app, so that is where Ray's token
    auth is checked."""
    config = AppConfig.model_validate(dict(args))
    if config.auth.require_ray_token:
        require_token_auth()
    return build(config)
