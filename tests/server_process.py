"""`python -m pagedjax.cli serve` as a real process for tests: started on port 0, the port read
from the line it prints ("[pagedjax] serving ... on http://HOST:PORT"), killed at the end."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).absolute().parents[1]
API_KEY = "sk-pagedjax-test"
STARTUP_TIMEOUT_S = 300
_SERVING = re.compile(rb"\[pagedjax\] serving .* on (http://[^\s]+:\d+)")


class Server:
    """A running server: its URL, an httpx client with the API key, `client()` for openai's."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path, model: str):
        self.url, self.proc, self.log, self.model = url, proc, log, model
        self.http = httpx.Client(base_url=url, trust_env=False, timeout=120,
                                 headers={"Authorization": f"Bearer {API_KEY}"})

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def assert_healthy(self) -> None:
        assert self.proc.poll() is None, self.log_tail()
        assert self.http.get("/health").status_code == 200, self.log_tail()


@contextlib.contextmanager
def serve(model_dir: Path, log: Path, *args: str, model: str = "tiny") -> Iterator[Server]:
    """Serves `model_dir` (float32) with extra CLI `args` on a free port; yields once /health is 200."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest",  # as conftest sets it here: the same numerics
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in sys.path if p])}
    cmd = [sys.executable, "-m", "pagedjax.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
           "--dtype", "float32", "--served-model-name", model, "--api-key", API_KEY, *args]
    if shutil.which("setpriv"):  # Linux: the server gets SIGTERM even if this process is killed
        cmd = ["setpriv", "--pdeathsig", "TERM", *cmd]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    srv = None
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while srv is None:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            m = _SERVING.search(log.read_bytes())
            if m:
                srv = Server(m.group(1).decode(), proc, log, model)
            elif time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start in {STARTUP_TIMEOUT_S} s")
            else:
                time.sleep(0.2)
        while True:
            try:
                if srv.http.get("/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up:\n{srv.log_tail()}")
            time.sleep(0.2)
        yield srv
    finally:
        if srv is not None:
            srv.http.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
