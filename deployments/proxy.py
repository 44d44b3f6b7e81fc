"""Ray Serve's HTTP proxy callback: `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy:middlewares`
in the cluster's environment (set by `llava-serve serve` and `make serve`; README, Security). Serve
applies the returned middlewares around its proxy and its direct-ingress servers, before it reads
any header itself."""

from __future__ import annotations

from starlette.middleware import Middleware

from llava_serve.http import ClientHeaderScrub


def middlewares() -> list[Middleware]:
    return [Middleware(ClientHeaderScrub)]
