"""Kick the tires, as the paper's artifact guide does with its three backends: for each of
``disaggregated``, ``colocated`` and ``chunked``, start the server, wait until it is ready, run
(50 prompts, 2 req/s, or each of ``--rate 2,4,8``) of ShareGPT with ``--verbose`` (prompts and responses printed), stop the server,
and keep the result file; then draw the comparison plot.

    distllm bench kick-the-tires                      # the embedded default model, on any machine
    distllm bench kick-the-tires --checkpoint ckpt/opt-1.3b --num-prompts 200 --rate 4
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from distllm_jax.workload.slo import SLO

MODES = ("disaggregated", "colocated", "chunked")


def start_server(mode: str, serve_args: list[str], timeout: float = 900) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "distllm_jax.cli", "serve", "--mode", mode, "--port", "0", "--metrics-port", "-1",
           "--quiet", *serve_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    address, log, end = None, [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {mode} server exited:\n{''.join(log)}")
        log.append(line)
        print(f"[{mode} server] {line}", end="", flush=True)
        if m := re.search(r"listening on grpcs?://([\d.]+:\d+)", line):
            address = m.group(1)
        if "serve: ready" in line and address:
            return proc, address
    proc.kill()
    raise TimeoutError(f"the {mode} server was not ready after {timeout}s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    for line in (rest or "").splitlines():
        print(f"[server] {line}")
    return proc.returncode


def serve_arguments(args: argparse.Namespace) -> list[str]:
    """``distllm serve``'s arguments: the checkpoint made absolute and checked before any server starts
    (a bad path then fails in one line, not in each server's log)."""
    if not args.checkpoint:
        return list(args.serve_arg)
    from distllm_jax.checkpoint import read_meta
    from distllm_jax.checkpoint.paths import user_path

    ckpt = user_path(args.checkpoint)
    read_meta(ckpt)
    return ["--checkpoint", str(ckpt), *args.serve_arg]


def main(args: argparse.Namespace) -> int:
    from bench.plot import plot
    from bench.runs import Target, run_once
    from distllm_jax.workload.slo import resolve

    slo = resolve(args.slo)
    serve_args = serve_arguments(args)
    runs, dirs = [], set()
    for mode in args.modes.split(","):
        try:
            proc, address = start_server(mode, serve_args)
        except (RuntimeError, TimeoutError) as e:  # the server's own output is already printed above
            print(f"distllm bench kick-the-tires: error: {str(e).splitlines()[0].rstrip(':')}", file=sys.stderr)
            return 1
        try:
            target = Target(address)
            for rate in (float(r) for r in str(args.rate).split(",")):
                run = run_once(target, args.dataset, args.num_prompts, rate, slo, seed=args.seed,
                               verbose=not args.quiet, progress=True, results=args.results)
                runs.append(run)
                dirs.add(Path(run["path"]).parent)
                print(f"wrote {run['path']}")
        finally:
            code = stop_server(proc)
        if code != 0:
            print(f"the {mode} server exited with {code}", file=sys.stderr)
            return 1
    print()
    print_results(runs, slo, args.slo)
    png = Path(args.results) / f"kick-the-tires-{runs[0]['config']['model']}.png"
    plot(sorted(dirs), slo, png, per_gpu=False)  # the table's rates, not the rates per device
    print(f"wrote {png}")
    return 0


def print_results(runs: list[dict], slo: SLO, slo_name: str) -> None:
    """The closing table, and the SLO its attain column counts against (a bare percentage is meaningless
    without it)."""
    from bench.runs import print_table

    print_table(runs)
    print(f"attain: share of requests with TTFT <= {slo.ttft:g} s and TPOT <= {slo.tpot:g} s "
          f"(--slo {slo_name}); rate: requests per second sent to the whole server")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="serve this checkpoint (default: the embedded default model)")
    p.add_argument("--modes", default=",".join(MODES), help="modes served in turn, comma list")
    p.add_argument("--dataset", default="sharegpt", help="sharegpt | humaneval | longbench | file:PATH")
    p.add_argument("--num-prompts", type=int, default=50, help="requests per rate")
    p.add_argument("--rate", default="2", help="request rate (req/s); a comma list runs each against the same server")
    p.add_argument("--slo", default="opt-13b-sharegpt", help="preset or 'TTFT,TPOT' seconds")
    p.add_argument("--seed", type=int, default=0, help="seed for the workload sample and the arrivals")
    p.add_argument("--results", default="bench/results", help="folder for the run files and the plot")
    p.add_argument("--quiet", action="store_true", help="do not print prompts and responses")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for `distllm serve` (repeat)")
