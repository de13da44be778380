"""The `smallfirst` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from gateway.config import ConfigError, Settings, load_settings
from router import cli as router_cli
from tooling import cache_admin


def _serve_settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(
        args.config,
        host=args.host,
        port=args.port,
        policies=args.policies,
        workers=args.workers,
        auth="off" if args.no_auth else None,
    )
    from gateway.api.auth import is_loopback

    if settings.auth == "off" and not is_loopback(settings.host):
        raise ConfigError(
            f"refusing to run without auth on a non-loopback address ({settings.host}); "
            "configure SMALLFIRST_API_KEYS_FILE or bind 127.0.0.1"
        )
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _serve_settings(args)
    if args.worker is not None:  # one of several, started by the supervisor below
        from gateway.api.workers import serve_worker

        _log_to_stderr(settings, f"worker {args.worker[0]} ")
        serve_worker(settings, *args.worker)
        return 0
    _check_port_free(settings.host, settings.port)
    _log_to_stderr(settings)
    if settings.workers > 1:
        return _supervise(args, settings)
    from gateway.api.app import create_app
    from gateway.api.server import serve
    from gateway.service import Gateway

    gateway = Gateway.from_settings(settings)
    serve(create_app(gateway), gateway)
    return 0


def _log_to_stderr(settings: Settings, prefix: str = "") -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"{prefix}%(levelname)s %(name)s %(message)s"
    )


def _supervise(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.api import workers

    if settings.redis_url is None:
        logging.getLogger("smallfirst.workers").warning(
            "%d workers without redis_url: each worker keeps its own cache, rate limits and "
            "shadow-call budgets (a limit of N a minute admits up to %d x N)",
            settings.workers, settings.workers)

    def command(slot: int, fd: int, directory: Path) -> list[str]:
        argv = [sys.executable, "-m", "tooling.cli", "serve", "--worker",
                f"{slot},{fd},{directory}"]
        for flag, value in (("--config", args.config), ("--host", args.host),
                            ("--port", args.port), ("--policies", args.policies)):
            if value is not None:
                argv += [flag, str(value)]
        return argv + (["--no-auth"] if args.no_auth else [])

    sock = workers.listen(settings.host, settings.port)
    return workers.Supervisor(command, settings.workers, sock, settings.shutdown_grace_s).run()


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {value!r}")
    return int(value)


def _worker_spec(value: str) -> tuple[int, int, Path]:
    """`SLOT,FD,FOLDER`: how the supervisor starts each worker."""
    slot, fd, folder = value.split(",", 2)
    return int(slot), int(fd), Path(folder)


def _check_port_free(host: str, port: int) -> None:
    """Fail before loading anything when another process holds the port."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); stop what "
                              "holds the port or pass --port") from exc


def cmd_policy_check(args: argparse.Namespace) -> int:
    from gateway.policy_store import PolicyError, load_policy_dir

    try:
        policies = load_policy_dir(Path(args.directory))
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    for policy in policies.policies:
        print(f"ok  {policy.name}  ({', '.join(policy.names)})")
    return 0


def policy_schema() -> str:
    from gateway.policy import Policy

    return json.dumps(Policy.model_json_schema(), indent=2, sort_keys=True) + "\n"


def cmd_policy_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(policy_schema())
    return 0


def cmd_keys_hash(args: argparse.Namespace) -> int:
    from gateway.api.auth import hash_key

    print(hash_key(args.key))
    return 0


def cmd_small_model(args: argparse.Namespace) -> int:
    from tooling import smallmodel

    python = smallmodel.ensure_vllm()
    model_dir = smallmodel.ensure_model()
    if args.action == "setup":
        print(f"vLLM: {python}\nmodel: {model_dir}")
        return 0
    server = smallmodel.VLLMServer(
        model_dir, port=args.port, python=python, **_serving_options(args)
    )
    smallmodel.exit_on_sigterm()
    with server:
        server.wait_ready(timeout=300)
        print(f"small model serving at {server.api_base} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)


def _serving_options(args: argparse.Namespace) -> dict[str, object]:
    """The serving options given on the command line ("none" turns one off); the others keep
    the model's defaults."""
    names = ("tool_call_parser", "chat_template", "reasoning_parser")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {name: None if value.lower() == "none" else value for name, value in given.items()}


def cmd_budget(args: argparse.Namespace) -> int:
    import httpx

    from gateway.telemetry.budget import render

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        response = httpx.get(args.url.rstrip("/") + "/admin/budget", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(f"smallfirst: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"smallfirst: {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    report = response.json()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def cmd_redis(args: argparse.Namespace) -> int:
    from tooling.redis_local import serve

    return serve(port=args.port, directory=args.dir)


def cmd_demo(args: argparse.Namespace) -> int:
    from tooling.demo import run_demo

    return run_demo(port=args.port, keep_running=not args.exit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smallfirst", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="YAML config file")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--policies", type=Path, help="policy directory")
    serve.add_argument("--no-auth", action="store_true", help="open mode (loopback only)")
    serve.add_argument("--workers", type=_positive,
                       help="worker processes on the one port (default 1; see README)")
    serve.add_argument("--worker", type=_worker_spec, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(required=True)
    check = policy.add_parser("check", help="validate a policy directory")
    check.add_argument("directory")
    check.set_defaults(func=cmd_policy_check)
    policy.add_parser("schema", help="print the policy JSON Schema").set_defaults(
        func=cmd_policy_schema)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(required=True)
    hashing = keys.add_parser("hash", help="print the hash to store for a key")
    hashing.add_argument("key")
    hashing.set_defaults(func=cmd_keys_hash)

    small = sub.add_parser("small-model", help="install, convert and serve the local small model")
    small.add_argument("action", choices=["setup", "serve"])
    small.add_argument("--port", type=int, default=8100)
    small.add_argument("--tool-call-parser", metavar="NAME",
                       help="vLLM tool-call parser (default: the model's, hermes for SmolLM2; "
                            "none: no tool calls)")
    small.add_argument("--chat-template", metavar="FILE",
                       help="chat template file (default: the one shipped for the model, with "
                            "tools; none: the model folder's own)")
    small.add_argument("--reasoning-parser", metavar="NAME",
                       help="vLLM reasoning parser (default: the model's; SmolLM2 has none)")
    small.set_defaults(func=cmd_small_model)

    budget = sub.add_parser("budget", help="latency spend vs allocation, per policy")
    budget.add_argument("--url", default="http://127.0.0.1:8000")
    budget.add_argument("--api-key", default=os.environ.get("SMALLFIRST_API_KEY"))
    budget.add_argument("--json", action="store_true")
    budget.set_defaults(func=cmd_budget)

    redis = sub.add_parser("redis", help="a local Redis with the query engine (dev extra)")
    redis_serve = redis.add_subparsers(required=True).add_parser(
        "serve", help="run Valkey with the search module until Ctrl-C")
    redis_serve.add_argument("--port", type=int, default=6379)
    redis_serve.add_argument("--dir", type=Path, help="working folder (default: a temporary one)")
    redis_serve.set_defaults(func=cmd_redis)

    demo = sub.add_parser("demo", help="start the small model and the gateway, and show it work")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--exit", action="store_true", help="stop after the demo requests")
    demo.set_defaults(func=cmd_demo)
    cache_admin.register(sub)
    router_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gateway.policy_store import PolicyError

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"smallfirst: {exc}", file=sys.stderr)
        return 2
    except PolicyError as exc:
        for problem in exc.problems:
            print(f"smallfirst: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
