"""What the gateway is doing without: the dependencies that failed and how it copes.

A degradation never fails `/readyz` (the pod keeps serving, on the policy's default route or
as cache misses); it is listed there and counted by the `smallfirst.degraded` gauge.
"""

from __future__ import annotations

from typing import Any


def degradations(gateway: Any) -> dict[str, str]:
    """Component -> what is wrong; empty when every dependency works as configured."""
    found: dict[str, str] = {}
    cache = gateway.cache
    if cache is not None and (why := cache.health()) is not None:
        found["cache"] = why
    embed = gateway.embed
    if embed is not None and embed.failure is not None:
        found["embedder"] = (f"{embed.failure}: semantic cache and learned scoring skipped")
    bundles = gateway.engine.bundles
    for name, why in sorted((bundles.failures if bundles is not None else {}).items()):
        found[f"router_bundle:{name}"] = f"{why}: scored without it (the policy's default route)"
    return found
