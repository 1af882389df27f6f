"""The container's health probe: exit 0 when taer's ``GET /health`` answers 200, else 1.

``/health`` answers 503 while the model loads, and nothing listens while the entry point shards and
calibrates on first boot: both read as "not healthy yet". Standard library only, so the probe costs
no import of torch.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def health_url() -> str:
    """The URL of ``/health`` as seen from inside the container, from ``TAER_HOST``/``TAER_PORT``."""
    host = os.environ.get("TAER_HOST", "127.0.0.1")
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{os.environ.get('TAER_PORT', '8000')}/health"


def main() -> int:
    request = urllib.request.Request(health_url())
    api_key = os.environ.get("TAER_API_KEY")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    # No proxies: an HTTP_PROXY set for the container must not route a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=float(os.environ.get("TAER_HEALTH_TIMEOUT", "5"))) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as error:
        print(f"taer is not healthy: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
