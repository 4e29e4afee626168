"""Multi-host on CPU: 2 processes x 2 fake devices, tp = 4 across them, give one process's tokens.

The test starts two copies of this file as workers (`python -m tests.test_multihost WORKER ...`).
Each joins the run through `parallel.initialize_distributed` (coordinator on 127.0.0.1, a free
port; cross-process collectives through gloo), builds the same engine over the 4 global devices
and generates the same prompts: scheduling is made identically on every process (see
pagedjax/parallel.py). The tiny llama has 2 kv heads, so tp = 4 also replicates kv heads.
Bounded: every wait has a timeout, and the workers are killed if they overrun.

The coordinator binds its port itself, in worker 0, some time after the port was found free: if
another process took it meanwhile, worker 0 fails at once ("Address already in use") and the run
starts again on another port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).absolute().parent.parent
NUM_PROCESSES, LOCAL_DEVICES, TP = 2, 2, 4
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, num_pages=24,
              attn_impl="reference")  # the jnp attention, under plain GSPMD sharding
MAX_TOKENS = 10
TIMEOUT_S = 300


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(11)  # ids in [3, hf_models.VOCAB = 512): no torch in the workers
    return [rng.integers(3, 512, size=n).tolist() for n in (7, 19, 28)]


def _generate(folder: str, tp: int):
    """(greedy tokens of the prompts, the LLM)."""
    import pagedjax as pj

    llm = pj.LLM(folder, dtype=np.float32, tensor_parallel_size=tp, **ENGINE)
    sp = pj.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), sp, use_tqdm=False)], llm


def worker(process_id: int, port: int, folder: str, out: str) -> None:
    """One process of the run: join, generate over the global mesh, write what it saw."""
    from pagedjax import parallel

    parallel.initialize_distributed(f"127.0.0.1:{port}", NUM_PROCESSES, process_id,
                                    initialization_timeout=120)
    import jax

    tokens, llm = _generate(folder, TP)
    pool = llm.engine.runner.pages[0][0]
    Path(out).write_text(json.dumps({
        "tokens": tokens, "process_count": jax.process_count(), "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(), "pool_devices": len(pool.sharding.device_set),
        "local_pool_shards": len(pool.addressable_shards)}))
    jax.distributed.shutdown()


BIND_ATTEMPTS = 3
_BIND_FAILED = "Address already in use"  # gRPC's words when the coordinator cannot bind its port


def _free_port() -> int:
    """A port free on every interface: the coordinator listens on the wildcard address ([::]:port)."""
    family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
    with socket.create_server(("", 0), family=family, dualstack_ipv6=family == socket.AF_INET6) as s:
        return s.getsockname()[1]


def _run_workers(folder: Path, outs: list[Path], env: dict[str, str]) -> list[str]:
    """Runs the workers to the end on a free port, again on another one if the coordinator's was
    taken first; returns their logs. Any other failure fails the test."""
    for _ in range(BIND_ATTEMPTS):
        port = _free_port()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "tests.test_multihost", str(i), str(port), str(folder), str(outs[i])],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(NUM_PROCESSES)]
        logs = []
        try:
            logs.append(procs[0].communicate(timeout=TIMEOUT_S)[0])  # the coordinator first: it fails fast
            if procs[0].returncode != 0 and _BIND_FAILED in logs[0]:
                continue  # the port was taken between choosing and binding it (finally: kill the others)
            for p in procs[1:]:
                logs.append(p.communicate(timeout=TIMEOUT_S)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log[-4000:]
        return logs
    pytest.fail(f"the coordinator's port was taken before it could bind it, {BIND_ATTEMPTS} times")


def test_two_processes_give_the_tokens_of_one(tmp_path):
    from tests import hf_models

    folder = tmp_path / "llama"
    hf_models.build("llama", folder, seed=3)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PAGEDJAX_COMPILE_CACHE": "",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
           # Workers import pagedjax as this process does (under Bazel: the runfiles, with the
           # extension Bazel built).
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in sys.path if p])}
    outs = [tmp_path / f"out{i}.json" for i in range(NUM_PROCESSES)]
    _run_workers(folder, outs, env)
    results = [json.loads(o.read_text()) for o in outs]
    for r in results:
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (
            NUM_PROCESSES, NUM_PROCESSES * LOCAL_DEVICES, LOCAL_DEVICES)
        assert (r["pool_devices"], r["local_pool_shards"]) == (TP, LOCAL_DEVICES)  # split across hosts
    assert results[0]["tokens"] == results[1]["tokens"]
    one_process, _ = _generate(str(folder), 1)
    assert all(len(t) == MAX_TOKENS for t in one_process)
    assert results[0]["tokens"] == one_process


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
