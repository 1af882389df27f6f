"""taer past one process, on Ray Serve: ``taer serve --replicas N``.

```
client -> Ray Serve's HTTP proxy -> TaerIngress (the single process's FastAPI app; validates,
          tokenises, embeds and retrieves once per request)
            -> TaerModel, N replicas (one engine and its expert slots each; one GPU each on a GPU box),
               chosen by Ray Serve's model multiplexing keyed by the request's pattern
```

- ``state``: a small Ray actor the replicas report to (metrics, resident experts), read by the
  ingress for ``/metrics`` and ``/v1/taer/patterns``.
- ``replica``: the model deployment.
- ``remote_engine``: the ingress's :class:`~server.engine_api.Engine`, whose ``generate`` retrieves
  the pattern and streams from a replica.
- ``app``: the ingress deployment, the application builder (also for ``serve deploy``) and the
  ``taer serve --replicas`` launcher.

Nothing here is imported by the single-process path: ``taer serve`` without ``--replicas`` never
imports Ray.
"""
