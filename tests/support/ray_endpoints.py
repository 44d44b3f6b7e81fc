"""`python -m tests.support.ray_endpoints SESSION_DIR`: a second driver joins the cluster of that Ray
session (with the cluster's token, as any local user with the token file could) and prints, as
JSON, the endpoints a stranger would try: the dashboard, the dashboard agent's HTTP port and a
Serve replica's gRPC server."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def port(session: Path, name: str) -> int:
    (file,) = session.glob(f"{name}_*")
    return int(file.read_text().strip())


def main(session: Path) -> None:
    import ray

    ctx = ray.init(address=f"127.0.0.1:{port(session, 'gcs_server_port')}", log_to_driver=False)
    replicas = [
        a["Address"]
        for a in ray._private.state.actors().values()
        if a["State"] == "ALIVE" and "Replica" in (a.get("ActorClassName") or "")
    ]
    print(
        json.dumps(
            {
                "dashboard": ctx.dashboard_url,
                "agent_port": port(session, "dashboard_agent_listen_port"),
                "replica": [replicas[0]["IPAddress"], replicas[0]["Port"]],
            }
        )
    )
    ray.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
