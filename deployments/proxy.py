"""Ray Serve's HTTP proxy callback: `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy:middlewares`
in the cluster's environment (set by `llava-serve serve` and `make serve`; README, Security). Serve
applies the returned middlewares around its proxy and its direct-ingress servers, before it reads
any header itself:

- the client headers Serve obeys are scrubbed (`ClientHeaderScrub`);
- a response whose client stops reading is dropped after `LLAVA_SERVE_SEND_TIMEOUT_S` (30; 0
  turns it off) seconds of one write waiting (`SendTimeout`);
- past `LLAVA_SERVE_EDGE_MAX_INFLIGHT` generation requests held open (unset or 0: no limit
  here, the ingress's admission alone), a request is refused before it is routed
  (`EdgeAdmission`); `llava-serve serve` sets it from the config.
"""

from __future__ import annotations

import os

from starlette.middleware import Middleware

from deployments.cluster import EDGE_LIMIT
from llava_serve.api.http import ClientHeaderScrub, EdgeAdmission, SendTimeout

# The proxy runs no app code and reads no app config: its knobs come from the environment.
SEND_TIMEOUT_ENV = "LLAVA_SERVE_SEND_TIMEOUT_S"


def middlewares() -> list[Middleware]:
    chain = [Middleware(ClientHeaderScrub)]
    send_timeout = float(os.environ.get(SEND_TIMEOUT_ENV, "30"))
    if send_timeout > 0:  # else a reader that stops reading holds its request to its end
        chain.append(Middleware(SendTimeout, timeout_s=send_timeout))
    edge_limit = int(os.environ.get(EDGE_LIMIT, "0"))
    if edge_limit > 0:
        chain.append(Middleware(EdgeAdmission, limit=edge_limit, on_refused=_refusal_counter()))
    return chain


def _refusal_counter():
    from ray.util import metrics  # the proxy is a Ray actor, not a Serve replica

    refused = metrics.Counter(
        "llava_edge_refusals_total",
        "Generation requests Serve's proxy refused past LLAVA_SERVE_EDGE_MAX_INFLIGHT.",
    )
    return refused.inc
