"""`pagedjax serve MODEL --quantization fp8 --kv-cache-dtype fp8` end to end, with the openai client;
and `pagedjax generate` with the same flags.

The server runs in a process of its own (`python -m pagedjax.cli serve ... --port 0`; the port it
took is read from the line it prints). Its greedy completions must be those of an engine built
here with the same options (FP8 weights quantized at load, an e4m3 pool), and differ from the
unquantized model's, so the flags are shown to reach the engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest

import pagedjax as pj

from tests import hf_models

REPO = Path(__file__).resolve().parent.parent
ENGINE = ["--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--num-pages", "33", "--max-model-len", "128"]
OPTIONS = dict(max_num_seqs=4, max_num_batched_tokens=64, num_pages=33, max_model_len=128)
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time there was"]
STARTUP_TIMEOUT_S = 300
MAX_TOKENS = 10


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "JAX_DEFAULT_MATMUL_PRECISION": "highest",  # as conftest sets it here: the same numerics
            "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in sys.path if p])}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_models.build("llama", folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The server on a port of its choosing; (base url, log path); killed at the end."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "pagedjax.cli", "serve", str(model_dir), "--port", "0", "--dtype", "float32",
           "--quantization", "fp8", "--kv-cache-dtype", "fp8", "--served-model-name", "tiny", *ENGINE]
    if shutil.which("setpriv"):  # Linux: the server gets SIGTERM even if this process is killed
        cmd = ["setpriv", "--pdeathsig", "TERM", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=REPO, text=True)
    lines: list[str] = []
    port = threading.Event()
    found: list[str] = []

    def read():  # keeps draining the pipe into the log, so the server never blocks on it
        with open(log, "w") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                lines.append(line)
                m = re.search(r"serving .* on (http://[\d.]+:\d+)", line)
                if m and not found:
                    found.append(m.group(1))
                    port.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not port.wait(0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not come up (exit {proc.poll()}):\n{''.join(lines)[-4000:]}")
        url = found[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        while True:  # the port is bound before uvicorn serves: wait for an answer
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer:\n{''.join(lines)[-4000:]}")
                time.sleep(0.3)
        yield client, "".join(lines)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _texts(model_dir, **options) -> list[str]:
    llm = pj.LLM(str(model_dir), dtype=np.float32, **OPTIONS, **options)
    sp = pj.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, sp, use_tqdm=False)]


def test_serve_fp8_weights_and_kv_cache(server, model_dir):
    client, startup_log = server
    assert "weights fp8" in startup_log and "KV pages of float8_e4m3fn" in startup_log, startup_log
    got = []
    for p in PROMPTS:
        r = client.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0.0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"
        got.append(r.choices[0].text)
    want = _texts(model_dir, quantization="fp8", kv_cache_dtype="fp8")
    assert got == want
    assert got != _texts(model_dir), "the unquantized model answers the same: the flags did not reach the engine"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0.0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1


def test_generate_cli_with_fp8_flags(model_dir):
    cmd = [sys.executable, "-m", "pagedjax.cli", "generate", PROMPTS[1], "--model", str(model_dir), "--no-chat",
           "--dtype", "float32", "--max-tokens", str(MAX_TOKENS), "--quantization", "fp8", "--kv-cache-dtype", "fp8",
           *ENGINE]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=STARTUP_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-4000:]
    want = pj.LLM(str(model_dir), dtype=np.float32, quantization="fp8", kv_cache_dtype="fp8", **OPTIONS).generate(
        PROMPTS[1], pj.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)[0].outputs[0].text
    assert out.stdout.rstrip("\n") == want
    bad = subprocess.run([sys.executable, "-m", "pagedjax.cli", "generate", "x", "--quantization", "int8"],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    assert bad.returncode != 0 and "invalid choice: 'int8'" in bad.stderr
