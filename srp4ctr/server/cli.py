"""``srp4ctr serve``: the command line over :func:`srp4ctr.server.app.create_app`."""

from __future__ import annotations

import argparse
import logging
import os

from srp4ctr.errors import InputError

from .app import CONFIG_ENV, ServerConfig


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model=str(args.model), backend=args.backend, threads=args.threads,
        batching=not args.no_batching, batch_window_ms=args.batch_window_ms,
        max_batch_requests=args.max_batch_requests,
        max_batch_candidates=args.max_batch_candidates, max_candidates=args.max_candidates,
        max_history=args.max_history, max_users=args.max_users,
        max_body_bytes=args.max_body_bytes, store=args.store, redis_url=args.redis_url,
        store_ttl_s=args.store_ttl_s, store_bytes=args.store_bytes)


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise InputError("srp4ctr serve needs the serve extra: pip install 'srp4ctr[serve]'") \
            from None
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    cfg = config_from_args(args)
    from srp4ctr.bundle import is_bundle

    if not os.path.isdir(cfg.model):
        raise InputError(f"--model {cfg.model}: no such folder")
    if not is_bundle(cfg.model):
        logging.getLogger(__name__).warning(
            f"serve: {cfg.model} is not a bundle; the engine looks for the prepared dataset "
            "the run recorded (make a bundle with srp4ctr bundle)")
    os.environ[CONFIG_ENV] = cfg.to_json()  # every worker process builds its app from it
    uvicorn.run("srp4ctr.server.app:app_from_env", factory=True, host=args.host,
                port=args.port, workers=args.workers, log_level="warning" if args.quiet else args.log_level,
                timeout_graceful_shutdown=30, access_log=False)
    return 0
