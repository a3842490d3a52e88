"""`ptune serve`: one frozen backbone answering many prompts over HTTP.

* ``batcher``: the one thread that owns the model (the main thread under ``ptune serve``); it gathers concurrent
  requests into mixed batches;
* ``decode``: batched token-by-token decoding for /v1/completions (greedy or sampled, stop strings, streaming);
* ``app``: the ASGI application (endpoints, request checks, limits, errors as JSON, bearer token);
* ``metrics``: the Prometheus text of GET /metrics.
"""
