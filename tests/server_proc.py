"""Starts the real server (``distllm serve``) in a subprocess on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from distllm_jax.tokenizer import byte_level

SMALL_ENGINE = ["--max-seq-len", "128", "--max-decode-batch", "8", "--prefill-token-budget", "64",
                "--num-pages", "160", "--page-size", "16", "--quiet"]


def checkpoint_with_tokenizer(ckpt: Path, out: Path) -> Path:
    """A copy of a test checkpoint (vocabulary 256) with a byte-level tokenizer beside it."""
    if not out.exists():
        shutil.copytree(ckpt, out)
        byte_level().save(str(out / "tokenizer.json"))
    return out


class ServerProc:
    def __init__(self, ckpt: Path, *extra: str, env: dict | None = None, timeout: float = 240):
        cmd = [sys.executable, "-m", "distllm_jax.cli", "serve", "--checkpoint", str(ckpt), "--port", "0",
               "--metrics-port", "0", *SMALL_ENGINE, *extra]
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
        # the CLI gives itself virtual CPU devices; the suite's other XLA flags stay
        full_env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                       full_env.get("XLA_FLAGS", "")).strip()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=full_env)
        self.log: list[str] = []
        self.port = self.metrics_port = None
        started = time.monotonic()
        # readline() has no timeout: a server that hangs without printing would block it forever, so
        # a watchdog kills the server at the bound, and readline() then sees the pipe's end.
        late = threading.Event()
        watchdog = threading.Timer(timeout, lambda: (late.set(), self.proc.kill()))
        watchdog.start()
        try:
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise (TimeoutError if late.is_set() else RuntimeError)(
                        f"server {'did not become ready' if late.is_set() else 'exited'}:\n" + "".join(self.log))
                self.log.append(line)
                if m := re.search(r"listening on grpcs?://[\d.]+:(\d+)", line):
                    self.port = int(m.group(1))
                if m := re.search(r"metrics on http://[\d.]+:(\d+)", line):
                    self.metrics_port = int(m.group(1))
                if "serve: ready" in line:
                    break
        finally:
            watchdog.cancel()
        self.address = f"127.0.0.1:{self.port}"
        # start-up as measured here (loading and compiling every program): what tests scale waits by
        self.ready_s = time.monotonic() - started

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples matching the labels."""
        total, found = 0.0, False
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(name)
        return total

    def stop(self, sig: int | None = None, timeout: float = 60) -> int:
        """Signal the server (SIGTERM by default) and wait for it to exit; its exit code."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        """Wait for the server to exit on its own (a second SIGTERM during a drain exits at once with 1,
        so a test that already sent one waits here); its exit code."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.log.append(out or "")
        return self.proc.returncode
