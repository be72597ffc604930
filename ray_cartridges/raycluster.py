"""The one place entry points start or join Ray; Ray's token authentication is left as Ray configures it.

``ray.init`` joins ``RAY_ADDRESS`` or a ``ray start`` cluster on this machine when there is one, else starts a
local cluster. Ray 2.60 turns token authentication on by default, and its processes listen on every
interface (it has no option to bind them to loopback), so nothing here turns authentication off: a cluster
that should take ``ray job submit`` is started and reached with ``RAY_AUTH_MODE=token`` and a token
(``ray get-auth-token --generate``, or ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``); see README.
"""

from __future__ import annotations


def init_ray(**kwargs) -> None:
    """``ray.init`` for an entry point (a no-op when Ray is already initialised)."""
    import ray

    if not ray.is_initialized():
        ray.init(**kwargs)
