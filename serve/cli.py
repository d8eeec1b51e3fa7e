"""distllm serve and distllm generate: arguments, the model and layout they imply, and the run.

With no arguments serve starts the embedded default: the built-in tiny-opt config with random
weights and the bundled GPT-2 byte-level BPE, laid out disaggregated over the available devices (one
prefill and one decode instance on a CPU's virtual devices; half the GPUs each on several GPUs;
colocated on a single GPU, which cannot hold two disjoint meshes).

A plan file (--plan, as distllm place writes it) is JSON (every field: distllm_jax.placement.plan):

    {"mode": "disaggregated",
     "prefill": [{"tp": 2, "pp": 1}], "decode": [{"tp": 1, "pp": 1}, {"tp": 1, "pp": 1}],
     "colocated": [{"tp": 2, "pp": 1}],                     # for colocated / chunked
     "prefill_token_budget": 512, "max_decode_batch": 64}   # optional

With --cluster auto (start a local Ray cluster) or --cluster ADDRESS (join one) every instance
runs as a Ray actor in its own process; the plan may then pin instances to nodes ("node") and ask
for low node affinity ("same_node": true), see distllm_jax.cluster.config. A lost actor is
replaced while the others serve.

SIGHUP re-reads the plan file and re-places the engine: the plan is checked first (a bad one changes
nothing), then health reports NOT_SERVING, new requests wait, running ones finish (within
--drain-timeout, else the re-plan is abandoned), the old instances are shut down, the new ones are
placed and compiled, and serving resumes (the previous layout is restored if the new one cannot be
built). Without --plan SIGHUP only logs a line.

SIGTERM or Ctrl-C drains: health reports NOT_SERVING and new requests are refused while running ones
finish, then the server exits 0; a second signal during the drain exits at once with code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from distllm_jax.compile_cache import default_dir as compile_cache_dir
from serve.auth import AUTH_ENV


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = _DescriptionAndDefaults  # every flag's default in --help
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", help="a converted checkpoint (none: the built-in --preset, random weights)")
    m.add_argument("--preset", default="tiny-opt", help="built-in config served with random weights")
    m.add_argument("--dtype", help="params and KV dtype (none: the checkpoint's; bfloat16 on GPU, float32 on CPU for presets)")
    m.add_argument("--seed", type=int, default=0, help="random-weight seed")
    m.add_argument("--compile-cache", default=str(compile_cache_dir()),
                   help="jax's persistent compilation cache: a second start of the same model and layout loads "
                        "its programs instead of compiling them ('off': compile everything)")
    m.add_argument("--compile-threads", type=int, default=0,
                   help="threads that build the step programs side by side at start-up (0: one per core, at most "
                        "8, on a GPU; 1 on a CPU)")
    lay = p.add_argument_group("layout")
    lay.add_argument("--mode", choices=["disaggregated", "colocated", "chunked"],
                     help="none: disaggregated with two or more devices (or --cluster), else colocated")
    lay.add_argument("--plan", help="a placement plan (JSON, as `distllm place` writes it) instead of the layout "
                                    "flags; SIGHUP re-reads it")
    lay.add_argument("--num-prefill", type=int, default=1, help="prefill instances (disaggregated)")
    lay.add_argument("--prefill-tp", type=int, help="tensor degree of each prefill instance (none: half the GPUs "
                                                    "shared out; 1 on CPU)")
    lay.add_argument("--prefill-pp", type=int, default=1, help="pipeline degree of each prefill instance")
    lay.add_argument("--num-decode", type=int, default=1, help="decode instances (disaggregated)")
    lay.add_argument("--decode-tp", type=int, help="tensor degree of each decode instance (none: the other half "
                                                   "of the GPUs shared out; 1 on CPU)")
    lay.add_argument("--decode-pp", type=int, default=1, help="pipeline degree of each decode instance")
    lay.add_argument("--tp", type=int, help="tensor degree of the colocated/chunked instance (none: every GPU; 1 on CPU)")
    lay.add_argument("--pp", type=int, default=1, help="pipeline degree of the colocated/chunked instance")
    eng = p.add_argument_group("engine")
    eng.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    eng.add_argument("--num-pages", type=int, default=1024, help="KV pages per instance")
    eng.add_argument("--max-seq-len", type=int, help="context limit in tokens, prompt and output together (none: "
                                                     "the model's, at most 2048; 512 for presets)")
    eng.add_argument("--prefill-token-budget", type=int, default=512, help="prompt tokens per prefill batch")
    eng.add_argument("--max-decode-batch", type=int, default=32, help="requests per decode step")
    eng.add_argument("--kv-transfer", choices=["local", "transfer-server"], default="local",
                     help="how KV moves from prefill to decode instances in one process")
    eng.add_argument("--kv-admission", choices=["on-demand", "reserve"], default="on-demand",
                     help="on-demand: admit by the KV pages a request needs now and grow page by page, preempting "
                          "the newest request when the pool runs short; reserve: take pages for a request's whole "
                          "length (prompt + max_tokens) when it joins, and never preempt")
    eng.add_argument("--preemption", choices=["recompute", "swap"], default="recompute",
                     help="what a preempted request does: recompute its KV from its prompt and output when it "
                          "comes back, or swap its KV to host memory and back")
    eng.add_argument("--kv-watermark", type=float, default=0.01,
                     help="the share of each KV pool that admission leaves free for running requests to grow into")
    eng.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                     help="keep prompts' full KV pages after their requests end, keyed by their tokens, and start "
                          "a prompt that begins with them from those pages (prefill, colocated and chunked "
                          "instances; greedy output is the same either way); on unless --no-prefix-cache")
    eng.add_argument("--prefill-routing", choices=["auto", "prefix", "round-robin", "shared"], default="auto",
                     help="which prompt instance a new request goes to when several take prompts: prefix (the "
                          "fewest tokens to prefill there, cached pages counted, plus those queued there), "
                          "round-robin, or shared (one queue, the first free instance); auto: prefix with the "
                          "prefix cache on, else shared")
    cl = p.add_argument_group("cluster")
    cl.add_argument("--cluster", metavar="auto|ADDRESS",
                    help="run each instance as a Ray actor: 'auto' starts a local Ray cluster, an address joins one")
    cl.add_argument("--cluster-kv-path", choices=["auto", "transfer-server", "staged"], default="auto",
                    help="KV between actors: jax's transfer server, or staged through Ray's object store "
                         "(auto: the transfer server where the backend supports it)")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="address every listener binds")
    srv.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free port (printed)")
    srv.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics; -1 disables, 0 picks")
    srv.add_argument("--http-port", type=int, help="also serve the OpenAI-compatible HTTP API here (0 picks; "
                                                   "none: no HTTP API)")
    srv.add_argument("--allowed-hosts", default="", metavar="HOST[,HOST...]",
                     help="HTTP Host values accepted beside the bound address (a defence against DNS rebinding; "
                          "'*' accepts any)")
    srv.add_argument("--allowed-origins", default="", metavar="ORIGIN[,ORIGIN...]",
                     help="web origins allowed to call the HTTP API from a browser (CORS); none: no CORS headers")
    srv.add_argument("--tls-cert", help="PEM certificate: serve TLS (with --tls-key) on gRPC and HTTP")
    srv.add_argument("--tls-key", help="PEM private key for --tls-cert")
    srv.add_argument("--auth-token", help=f"bearer token required from clients; prefer env {AUTH_ENV}, which "
                                          "keeps the token out of `ps` and shell history")
    srv.add_argument("--max-concurrent", type=int, default=256,
                     help="requests served at once over gRPC and HTTP together; more are refused")
    srv.add_argument("--max-n", type=int, default=8,
                     help="samples one request may ask for (n, best_of); at most the engine's batch rows")
    srv.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024,
                     help="largest request or reply message (and HTTP body)")
    srv.add_argument("--drain-timeout", type=float, default=300.0,
                     help="seconds running requests get to finish on SIGTERM or before a re-plan")
    srv.add_argument("--quiet", action="store_true", help="no compile progress bar")


class _DescriptionAndDefaults(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each flag's default after its help (flags without one say
    what happens when they are left out in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ("", [], argparse.SUPPRESS)
        if not unset and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _hosts(value: str) -> tuple[str, ...]:
    return tuple(h.strip() for h in value.split(",") if h.strip())


def model_source(args: argparse.Namespace) -> tuple[Any, Any]:
    import jax

    from distllm_jax.engine import CheckpointSource, DeviceRandomSource, RandomSource
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.presets import preset
    from distllm_jax.tokenizer import bundled_gpt2, load_tokenizer

    if args.checkpoint:
        source = CheckpointSource(args.checkpoint, args.dtype)
        tok = load_tokenizer(args.checkpoint)
    else:
        cfg = ModelConfig.from_hf_dict(preset(args.preset))
        dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
        # on a GPU the weights are drawn there (seconds for real sizes; the host draw takes minutes)
        source = (DeviceRandomSource if jax.default_backend() == "gpu" else RandomSource)(cfg, dtype, args.seed)
        tok = bundled_gpt2()
    if tok is not None and tok.get_vocab_size() > source.cfg.vocab_size:
        print(f"distllm serve: warning: the tokenizer has {tok.get_vocab_size()} tokens, the model "
              f"{source.cfg.vocab_size}; text that maps past the model's vocabulary is refused", file=sys.stderr)
    return source, tok


def engine_config(args: argparse.Namespace, num_devices: int, backend: str = "cpu"):
    """The engine config of the plan file (whose limits win over the flags), else of the layout flags."""
    from distllm_jax.engine import EngineConfig, InstanceSpec
    from distllm_jax.placement.plan import Plan

    base = dict(page_size=args.page_size, num_pages=args.num_pages, max_seq_len=args.max_seq_len,
                prefill_token_budget=args.prefill_token_budget, max_decode_batch=args.max_decode_batch,
                kv_transfer=args.kv_transfer, dtype=args.dtype, progress=not args.quiet,
                kv_admission=args.kv_admission, preemption=args.preemption, kv_watermark=args.kv_watermark,
                prefix_cache=args.prefix_cache, prefill_routing=args.prefill_routing,
                compile_threads=args.compile_threads)
    if args.plan:
        return Plan.load(args.plan).to_engine_config(**base)
    mode = args.mode or ("disaggregated" if num_devices >= 2 or args.cluster else "colocated")
    # CPU virtual devices share the same cores: tensor parallelism buys nothing there
    half = 1 if backend == "cpu" else max(1, num_devices // 2)
    p_tp = args.prefill_tp or max(1, half // args.num_prefill)
    d_tp = args.decode_tp or max(1, (num_devices - half if backend != "cpu" else 1) // args.num_decode)
    return EngineConfig(mode=mode, prefill=(InstanceSpec(p_tp, args.prefill_pp),) * args.num_prefill,
                        decode=(InstanceSpec(d_tp, args.decode_pp),) * args.num_decode,
                        colocated=(InstanceSpec(args.tp or (1 if backend == "cpu" else num_devices), args.pp),),
                        **base)


def cluster_config(args: argparse.Namespace):
    """The Ray side of ``--cluster``: address, KV path, and node placement from the plan file."""
    from distllm_jax.cluster import ClusterConfig, Placement
    from distllm_jax.placement.plan import Plan

    placement = Placement.from_plan(Plan.load(args.plan)) if args.plan else Placement()
    return ClusterConfig(address=args.cluster, kv_path=args.cluster_kv_path, placement=placement)


def run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import os

    from serve.server import PortInUse, Replan, ServerConfig, check_ports, serve_forever

    metrics_port = None if args.metrics_port < 0 else args.metrics_port
    try:  # before anything loads or compiles: a taken port costs a second, not minutes
        check_ports(args.host, (args.port, args.http_port, metrics_port))
    except PortInUse as e:
        print(f"distllm serve: error: {e}", file=sys.stderr)
        return 2

    import jax

    from distllm_jax import compile_cache
    from distllm_jax.engine import Engine
    from serve.chat_template import load_chat_template

    compile_cache.enable(None if args.compile_cache == "off" else args.compile_cache)

    source, tok = model_source(args)
    owns_ray = False
    if args.cluster:
        from distllm_jax.cluster import ClusterEngine
        from distllm_jax.cluster.bootstrap import connect

        owns_ray = connect(cluster_config(args))
        make = lambda c: ClusterEngine(source, c, cluster_config(args), tokenizer=tok)  # noqa: E731
        where = f"Ray actors ({args.cluster})"
    else:
        make = lambda c: Engine(source, c, tokenizer=tok)  # noqa: E731
        where = f"{len(jax.devices())} {jax.default_backend()} device(s)"

    def layout():  # the engine config from the flags or the (re-read) plan file, checked
        ecfg = engine_config(args, len(jax.devices()), jax.default_backend())
        if args.checkpoint is None and args.max_seq_len is None:
            ecfg = dataclasses.replace(ecfg, max_seq_len=min(512, source.cfg.max_position_embeddings))
        ecfg.seq_len(source.cfg)
        if not args.cluster and ecfg.num_devices > len(jax.devices()):
            raise ValueError(f"the layout needs {ecfg.num_devices} devices; this process has {len(jax.devices())}")
        return ecfg

    ecfg = layout()
    what = args.checkpoint or f"{args.preset} (random weights)"
    desc = ", ".join(f"{i}:{s.label()}" for i, (_, s) in enumerate(ecfg.instances()))
    print(f"distllm serve: {what}, {ecfg.mode} [{desc}] on {where}; compiling...", flush=True)
    try:
        engine = make(ecfg)
        token = args.auth_token if args.auth_token is not None else os.environ.get(AUTH_ENV)
        cfg = ServerConfig(
            host=args.host, port=args.port, metrics_port=metrics_port,
            tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token=token, max_concurrent=args.max_concurrent,
            max_n=args.max_n,
            max_message_bytes=args.max_message_bytes, drain_timeout_s=args.drain_timeout,
            model_name=Path(args.checkpoint).name if args.checkpoint else args.preset,
            http_port=args.http_port, chat_template=load_chat_template(args.checkpoint),
            allowed_hosts=_hosts(args.allowed_hosts), allowed_origins=_hosts(args.allowed_origins),
        )
        replan = Replan(prepare=layout, build=make) if args.plan else None
        asyncio.run(serve_forever(engine, tok, cfg, announce=lambda s: print(s, flush=True), replan=replan))
    except PortInUse as e:  # taken between the check and the bind
        print(f"distllm serve: error: {e}", file=sys.stderr)
        return 2
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    return 0


def add_serve_command(sub: Any) -> None:
    """Mount ``distllm serve`` on the ``distllm`` command's subparsers ``sub`` (the entry point ``serve``
    of group ``distllm.commands``, pyproject.toml)."""
    p = sub.add_parser("serve", help="start the gRPC server (no arguments: the embedded default model)",
                       description=__doc__)
    add_serve_arguments(p)
    p.set_defaults(fn=run_serve)


def add_generate_command(sub: Any) -> None:
    """Mount ``distllm generate`` (the entry point ``generate`` of group ``distllm.commands``)."""
    p = sub.add_parser("generate", help="stream a completion from a running server to the terminal")
    add_generate_arguments(p)
    p.set_defaults(fn=run_generate)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = _DescriptionAndDefaults
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--address", default="127.0.0.1:50051", help="the server's gRPC address")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, help="sampling temperature (none: the server's, greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (none: 1, off)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (none: 0, off)")
    p.add_argument("--seed", type=int, help="sampling seed: the same seed gives the same output")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable; never printed)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--token", help=f"bearer token; prefer env {AUTH_ENV}, which keeps it out of `ps`")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to trust; implies TLS")
    p.add_argument("--timeout", type=float, help="deadline in seconds (none: no deadline)")


def run_generate(args: argparse.Namespace) -> int:
    import grpc

    from serve.client import Client

    with Client(args.address, token=args.token, tls_ca=args.tls_ca, timeout=args.timeout) as c:
        try:
            fin = None
            for r in c.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop or None,
                                ignore_eos=args.ignore_eos or None):
                if r.HasField("chunk"):
                    sys.stdout.write(r.chunk.text)
                    sys.stdout.flush()
                else:
                    fin = r.finished
        except grpc.RpcError as e:
            print(f"\ndistllm generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    t = fin.timings
    print(f"\n[{fin.finish_reason}: {fin.prompt_tokens} prompt + {fin.output_tokens} output tokens, "
          f"TTFT {t.ttft_s * 1e3:.1f} ms, TPOT {t.tpot_s * 1e3:.1f} ms]", file=sys.stderr)
    return 0
