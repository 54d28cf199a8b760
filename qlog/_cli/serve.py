"""``qlog serve DIR|URL``: Cloudflare's Queues API, a dashboard and
Prometheus metrics over HTTP (qlog/_server; needs ``qlog[server]``)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from typing import Any, Optional

from .common import EXIT_OK, UsageError, data_dir, open_broker, where

TOKEN_ENV = "QLOG_TOKEN"


def add_serve(sub: Any) -> None:
    """``qlog serve DIR``"""
    s = sub.add_parser(
        "serve", help="serve Cloudflare's Queues HTTP API, a dashboard and /metrics",
        description="Serve the queues of DIR (a data directory or a PostgreSQL URL) over HTTP: "
        "Cloudflare's Queues API under /client/v4 (and at the root), the dashboard at /, "
        "Prometheus metrics at /metrics. Every request needs the bearer token (--token, "
        f"--token-file or ${TOKEN_ENV}); without one the server listens on loopback only.",
    )
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8787, help="port (default 8787)")
    s.add_argument("--token", default=None, help=f"the bearer token (prefer --token-file or ${TOKEN_ENV}: "
                   "a command line is visible to other users)")
    s.add_argument("--token-file", default=None, metavar="FILE", help="read the bearer token from FILE")
    s.add_argument("--cert", default=None, metavar="FILE", help="TLS certificate (PEM); with --key")
    s.add_argument("--key", default=None, metavar="FILE", help="TLS private key (PEM)")
    s.add_argument("--max-body", type=int, default=None, metavar="BYTES",
                   help="largest request body read (default 8 MiB); larger ones are refused unread")
    s.set_defaults(func=cmd_serve)


def _token(args: argparse.Namespace) -> Optional[str]:
    given = [x for x in (args.token is not None, args.token_file is not None) if x]
    if len(given) > 1:
        raise UsageError("give the token once: --token or --token-file")
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise UsageError(f"cannot read the token file {args.token_file!r}: {e.strerror}") from None
        if not token:
            raise UsageError(f"the token file {args.token_file!r} is empty")
        return token
    given_token: Optional[str] = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if given_token is not None and not given_token.strip():
        raise UsageError("the token is empty")
    return given_token


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .._server.app import DEFAULT_MAX_BODY, build_app
    except ImportError:
        raise UsageError("qlog serve needs the server extra: pip install 'qlog[server]'") from None
    token = _token(args)
    if token is None and not _loopback(args.host):
        raise UsageError(f"without a token the server listens on loopback only, not {args.host!r}: "
                         f"give --token-file FILE (or ${TOKEN_ENV})")
    if (args.cert is None) != (args.key is None):
        raise UsageError("TLS needs both --cert and --key")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be from 1 to 65535, got {args.port}")
    max_body = DEFAULT_MAX_BODY if args.max_body is None else args.max_body
    if max_body < 1024:
        raise UsageError(f"--max-body must be at least 1024 bytes, got {max_body}")
    # A new directory is created (as by qlog send); an existing one must hold qlog data.
    broker = open_broker(args.dir if not os.path.exists(args.dir) else data_dir(args.dir))
    app = build_app(broker, token, max_body)
    scheme = "https" if args.cert else "http"
    print(f"qlog serve: {scheme}://{args.host}:{args.port}/ serving {where(args.dir)} "
          f"(engine {broker.engine}); "
          + ("bearer token required" if token else "NO TOKEN: loopback only, anyone on this machine can use it"),
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            ssl_certfile=args.cert, ssl_keyfile=args.key, lifespan="off")
    # uvicorn shuts down on SIGTERM and SIGINT, then raises the signal again
    # for the handler it found: a handler of ours, so that a stop by signal
    # exits 0 (as qlog worker does) instead of dying of it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run()
    finally:
        broker.close()
    print("qlog serve: stopped", file=sys.stderr, flush=True)
    return EXIT_OK
