"""The one place entry points start or join Ray; Ray's token authentication is left as Ray configures it.

``ray.init`` joins ``RAY_ADDRESS`` or a ``ray start`` cluster on this machine when there is one, else starts a
local cluster. Ray 2.60 turns token authentication on by default, and its processes listen on every
interface (it has no option to bind them to loopback), so nothing here turns authentication off: a cluster
that should take ``ray job submit`` is started and reached with ``RAY_AUTH_MODE=token`` and a token
(``ray get-auth-token --generate``, or ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``); see README.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def init_ray(**kwargs) -> None:
    """``ray.init`` for an entry point (a no-op when Ray is already initialised)."""
    import ray

    if not ray.is_initialized():
        ray.init(**kwargs)


def started_here() -> bool:
    """Whether this process started the Ray cluster it is on (a local ``ray.init``): no autoscaler adds nodes."""
    import ray._private.worker

    return bool(getattr(getattr(ray._private.worker, "_global_node", None), "head", False))


def check_fits(needed: dict[str, float], what: str) -> None:
    """Where ``needed`` (Ray resources in all) is more than the whole cluster holds, Ray waits for nodes to join.
    On a cluster this process started none will, so that is a ValueError naming what is missing; on another
    cluster an autoscaler may add them, so it is a warning and the run waits."""
    import ray

    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in needed.items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return
    text = ", ".join(f"{k} {v:g} (the cluster has {h:g})" for k, (v, h) in sorted(short.items()))
    if started_here():
        raise ValueError(
            f"{what} needs {text}, and this local Ray cluster cannot grow: ask for less, or start a bigger cluster "
            "(`ray start` on more machines, `ray up cluster.yaml`) and run against it"
        )
    logger.warning("%s needs %s: waiting for the cluster's autoscaler to add nodes (Ctrl-C to stop)", what, text)
