"""The `specsplit` command: one server per subcommand, flags as in `vllm serve`.

Every flag can also be set by an environment variable SPECSPLIT_<FLAG> (upper snake case,
e.g. SPECSPLIT_GRPC_PORT, SPECSPLIT_SPECULATIVE_CONFIG; MODEL by SPECSPLIT_MODEL), which is
how the Helm chart and docker-compose configure the containers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("specsplit")

# The tiers sit above the core library: the command reaches each by its module's name, and
# imports it only to run it (`<module>.run(args) -> exit code`).
TIER_COMMANDS = {"target": "target_service.cli", "draft": "draft_service.cli", "gateway": "gateway.cli"}


def _env(name: str, default: Any = None, cast: Callable[[str], Any] = str) -> Any:
    raw = os.environ.get("SPECSPLIT_" + name.upper().replace("-", "_"))
    if raw is None:
        return default
    try:
        return cast(raw)
    except ValueError:
        raise SystemExit(f"environment variable SPECSPLIT_{name.upper().replace('-', '_')}={raw!r} is not valid") from None


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(s)


def _add(p: argparse.ArgumentParser, flag: str, *, type: Callable[[str], Any] = str, default: Any = None,
         help: str, **kw: Any) -> None:
    name = flag.lstrip("-")
    p.add_argument(flag, type=type, default=_env(name, default, type), help=f"{help} [env SPECSPLIT_{name.upper().replace('-', '_')}]", **kw)


def _names(s: str) -> list[str]:
    """A list of names from one environment variable: comma- or space-separated."""
    return s.replace(",", " ").split()


def _served_names(p: argparse.ArgumentParser) -> None:
    p.add_argument("--served-model-name", nargs="+", metavar="NAME", default=_env("served-model-name", None, _names),
                   help="names clients use as `model`, as vLLM's flag: the first is reported in responses; "
                        "default: MODEL as given [env SPECSPLIT_SERVED_MODEL_NAME, comma-separated]")


def _model_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    env = _env("model")
    p.add_argument("model", nargs="?" if (env or not required) else None, default=env,
                   help="target model: HF folder, GGUF file, hub id or catalogue name "
                        "(smollm2-135m, qwen2.5-coder-1.5b, qwen2.5-coder-0.5b) [env SPECSPLIT_MODEL]")


def _max_branches(p: argparse.ArgumentParser) -> None:
    _add(p, "--max-branches", type=int, default=0, help="the tree of guesses: at most this many outcomes of a "
         "verify the draft tier drafts ahead for while the target verifies (its likeliest; 1 = only the "
         "all-accepted guess), 1..64; 0 = every outcome it guesses (how many: the draft tier's "
         "--branch-alternatives)")


ROUND_MODES = ("direct", "gateway")  # who drives the rounds (GatewayConfig.round_mode)


def _branch_alternatives(p: argparse.ArgumentParser) -> None:
    _add(p, "--branch-alternatives", type=int, help="runner-up guesses per drafted token that the pipelined "
         "tree of guesses branches on (top-m, m = 1 + this), 0..8; 0: only the all-accepted guess (default: 1 "
         "on a GPU, 0 on a CPU)")


def _rounds(p: argparse.ArgumentParser) -> None:
    _add(p, "--no-pipeline", type=_bool, default=False, help="disable drafting block i+1 during verify", nargs="?",
         const=True)
    _max_branches(p)
    _add(p, "--round", default="direct", choices=ROUND_MODES, help="who drives the rounds: direct = the "
         "target tier, streaming to the draft tier itself (fewer hops); gateway = the gateway, between the tiers")


def _engine_flags(p: argparse.ArgumentParser, *, spec: bool) -> None:
    if spec:
        _add(p, "--speculative-config", help="JSON with vLLM's keys: method (draft_model, ngram, eagle, eagle3), "
             "model (draft model, or EAGLE head folder: the head reads MODEL's embeddings), num_speculative_tokens, "
             "prompt_lookup_max, prompt_lookup_min, draft_tensor_parallel_size")
    _add(p, "--dtype", default="auto", help="auto, float32, bfloat16, float16")
    _add(p, "--max-model-len", type=int, help="context limit (default: the model's)")
    _add(p, "--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory to use")
    _add(p, "--kv-cache-memory-bytes", type=int, help="explicit KV cache budget in bytes")
    _add(p, "--max-batch", type=int, default=64, help="sessions per batched step")
    _add(p, "--step-gather", type=float, default=0.25, help="hold a step up to this fraction of a usual "
         "step's time for the last step's sessions that come back promptly, so they share one step (0 = off)")
    _add(p, "--enforce-eager", type=_bool, default=False, nargs="?", const=True,
         help="no CUDA graphs (eager PyTorch on GPU)")


def _server_flags(p: argparse.ArgumentParser, grpc_port: int, metrics: bool = True) -> None:
    _add(p, "--host", default="0.0.0.0", help="interface to bind")
    _add(p, "--grpc-port", type=int, default=grpc_port, help="gRPC port")
    if metrics:
        _add(p, "--metrics-port", type=int, default=9100, help="Prometheus /metrics port (0 = off)")
    _add(p, "--shutdown-grace-seconds", type=float, default=30.0, help="on SIGTERM: NOT_SERVING, new calls refused, "
         "calls in flight get this long to finish before they are handed back (UNAVAILABLE); then exit 0")
    _add(p, "--log-level", default="info", help="debug, info, warning")
    _add(p, "--tls-cert", help="PEM certificate (chain) to serve TLS with; without it the port is plaintext")
    _add(p, "--tls-key", help="PEM private key of --tls-cert")
    _add(p, "--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    if metrics:  # the tiers: kubelet gRPC probes cannot speak TLS
        _add(p, "--health-port", type=int, help="also serve grpc.health.v1 (only) on this plaintext port")


def build_parser() -> argparse.ArgumentParser:
    from specsplit import __version__

    ap = argparse.ArgumentParser(prog="specsplit", description="Speculative decoding as gRPC microservices.")
    ap.add_argument("--version", action="version", version=f"specsplit {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("target", help="run the target (verify) service")
    _model_arg(p)
    _engine_flags(p, spec=False)
    _add(p, "--tensor-parallel-size", type=int, default=1, help="GPUs to shard the target over")
    _server_flags(p, 50052)
    _add(p, "--draft-tls-ca", help="direct rounds: dial draft replicas over TLS, trusting this CA")
    _add(p, "--draft-tls-cert", help="direct rounds: client certificate for draft replicas (mutual TLS)")
    _add(p, "--draft-tls-key", help="private key of --draft-tls-cert")
    _add(p, "--draft-tls-server-name", help="name the draft replicas' certificates carry")
    _add(p, "--round-timeout", type=float, default=30.0, help="direct rounds: seconds a draft replica may take "
         "for one block before the completion goes on without it")

    p = sub.add_parser("draft", help="run the draft service")
    _model_arg(p)
    _engine_flags(p, spec=True)
    _server_flags(p, 50053)
    _branch_alternatives(p)

    p = sub.add_parser("gateway", help="run the gateway (OpenAI HTTP + public gRPC)")
    _model_arg(p)
    _add(p, "--speculative-config", help="same JSON as the draft service; omit for plain decoding")
    _served_names(p)
    _add(p, "--port", type=int, default=8000, help="HTTP port (OpenAI API, /metrics)")
    _server_flags(p, 50051, metrics=False)
    _add(p, "--discovery", default="static", help="static | dns | kubernetes")
    _add(p, "--draft-addresses", default="", help="static: comma-separated host:port of draft replicas")
    _add(p, "--target-addresses", default="", help="static: comma-separated host:port of target replicas")
    _add(p, "--draft-service", help="dns/kubernetes: draft Service name")
    _add(p, "--target-service", help="dns/kubernetes: target Service name")
    _add(p, "--namespace", help="kubernetes: namespace")
    _add(p, "--draft-port", type=int, default=50053, help="dns: draft replicas' gRPC port")
    _add(p, "--target-port", type=int, default=50052, help="dns: target replicas' gRPC port")
    _add(p, "--max-concurrent-requests", type=int, default=256, help="completions running at once")
    _add(p, "--max-queued-requests", type=int, default=1024, help="waiting requests before 429")
    _rounds(p)
    _add(p, "--max-model-len", type=int, help="context limit (default: the model's)")
    _add(p, "--max-prompt-tokens", type=int, help="longest prompt accepted (default: the context minus one)")
    _add(p, "--max-tokens-limit", type=int, default=8192, help="largest max_tokens a request may ask for")
    _add(p, "--round-timeout", type=float, default=30.0, help="seconds a tier may go without answering a round "
         "or reporting prefill progress before the session moves to another replica (never re-run on the same one)")
    _add(p, "--request-timeout", type=float, default=600.0, help="deadline of a request without a client deadline")
    _add(p, "--kv-wait", type=float, default=30.0, help="seconds a request waits for KV memory on the target "
         "tier before RESOURCE_EXHAUSTED / 429")
    _add(p, "--api-key-file", help="require `Authorization: Bearer <key>` with a key from this file "
         "(one per line, `name:key [max_concurrent=N] [tokens_per_minute=N]`; re-read when it changes)")
    _add(p, "--api-key-max-concurrent", type=int, default=0, help="default per-key limit of running requests "
         "(0 = none)")
    _add(p, "--api-key-tokens-per-minute", type=int, default=0, help="default per-key limit of prompt + "
         "completion tokens per minute (0 = none)")
    _add(p, "--tier-tls-ca", help="PEM CA that signed the draft/target certificates: dial the tiers over TLS")
    _add(p, "--tier-tls-cert", help="PEM client certificate for tiers that require mutual TLS")
    _add(p, "--tier-tls-key", help="PEM private key of --tier-tls-cert")
    _add(p, "--tier-tls-server-name", help="name the tiers' certificates carry (default: the Service's "
         "DNS name service.namespace.svc in dns/kubernetes discovery, the address's host in static)")

    p = sub.add_parser("up", help="start target, draft and gateway as local processes (quick start)")
    _model_arg(p)
    _add(p, "--speculative-config", help="JSON as for `draft`; default: n-gram lookup")
    _served_names(p)
    _add(p, "--host", default="127.0.0.1", help="interface for all three")
    _add(p, "--port", type=int, default=8000, help="gateway HTTP port")
    _add(p, "--grpc-port", type=int, default=50051, help="gateway gRPC port")
    _add(p, "--dtype", default="auto", help="auto, float32, bfloat16, float16")
    _add(p, "--max-model-len", type=int, help="context limit")
    _add(p, "--log-level", default="warning", help="log level of the three processes")
    _rounds(p)  # the gateway's
    _branch_alternatives(p)  # the draft tier's
    p.add_argument("--prompt", help="after start, stream this prompt's answer and its stats, then stop")
    p.add_argument("--max-tokens", type=int, default=128, help="for --prompt")

    p = sub.add_parser("generate", help="send a prompt to a running gateway and stream the answer")
    p.add_argument("prompt", help="the prompt (use --chat to send it as a user message)")
    _add(p, "--address", default="127.0.0.1:50051", help="gateway gRPC address")
    _add(p, "--api-key", help="API key of the gateway (sent as `authorization: Bearer <key>`)")
    _add(p, "--tls-ca", help="PEM CA of a gateway that serves TLS")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")

    try:
        from specsplit.models.cli import add_models_subparser
    except ImportError:  # pragma: no cover - models subpackage always ships
        add_models_subparser = None
    if add_models_subparser is not None:
        add_models_subparser(sub)
    from specsplit.speculation.eagle.cli import add_eagle_subparser

    add_eagle_subparser(sub)
    return ap


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_generate(a: argparse.Namespace) -> int:
    from specsplit.client import Client
    from specsplit.sampling.params import SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed)
    from specsplit.serving.tls import ClientTLS

    tls = ClientTLS(a.tls_ca) if a.tls_ca else None
    with Client(a.address, timeout=a.timeout, api_key=a.api_key, tls=tls) as client:
        stream = client.stream_chat([{"role": "user", "content": a.prompt}], params) if a.chat \
            else client.stream(a.prompt, params)
        final = None
        for ev in stream:
            if ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            if ev.finished:
                final = ev
        sys.stdout.write("\n")
        if final is not None:
            print(final.summary(), file=sys.stderr)
    return 0


def die_with_parent() -> None:
    """Under `specsplit up` (launcher.PARENT_ENV set): get SIGTERM when the launcher dies, even by
    SIGKILL, so no server outlives it re-parented to PID 1 (Linux; elsewhere a no-op)."""
    parent = os.environ.pop("SPECSPLIT_PARENT_PID", None)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.command in ("target", "draft", "gateway", "up") and not a.model:
        ap.error(f"{a.command}: MODEL is required (or set SPECSPLIT_MODEL)")
    if a.command in ("target", "draft", "gateway"):
        die_with_parent()
        _setup_logging(a.log_level)
    try:
        if a.command in TIER_COMMANDS:
            return importlib.import_module(TIER_COMMANDS[a.command]).run(a)
        if a.command == "up":
            from specsplit.launcher import run_up

            return run_up(a)
        if a.command == "generate":
            return run_generate(a)
        if a.command == "models":
            from specsplit.models.cli import run_models

            return run_models(a)
        if a.command == "eagle":
            from specsplit.speculation.eagle.cli import run_eagle

            return run_eagle(a)
    except ValueError as e:
        print(f"specsplit: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a refused call of `generate` (e.g. UNAUTHENTICATED): one line, no traceback
        import grpc

        if not isinstance(e, grpc.RpcError):
            raise
        print(f"specsplit: error: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except KeyboardInterrupt:
        return 130
    ap.error(f"unknown command {a.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
