"""The HTTP server (``srp4ctr serve``) and its user-state stores; see :mod:`srp4ctr.server.app`
and :mod:`srp4ctr.server.store`. Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client,
cachetools; redis for the Redis store)."""
