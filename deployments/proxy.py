"""Ray Serve's HTTP proxy callback: `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy:middlewares`
in the cluster's environment (set by `llava-serve serve` and `make serve`; README, Security). Serve
applies the returned middlewares around its proxy and its direct-ingress servers, before it reads
any header itself. A response whose client stops reading is dropped after
`LLAVA_SERVE_SEND_TIMEOUT_S` (30; 0 turns it off) seconds of one write waiting."""

from __future__ import annotations

import os

from starlette.middleware import Middleware

from llava_serve.http import ClientHeaderScrub, SendTimeout

# The proxy runs no app code and reads no app config: its one knob comes from the environment.
SEND_TIMEOUT_ENV = "LLAVA_SERVE_SEND_TIMEOUT_S"


def middlewares() -> list[Middleware]:
    send_timeout = float(os.environ.get(SEND_TIMEOUT_ENV, "30"))
    if send_timeout <= 0:  # off: a reader that stops reading holds its request to its end
        return [Middleware(ClientHeaderScrub)]
    return [Middleware(ClientHeaderScrub), Middleware(SendTimeout, timeout_s=send_timeout)]
