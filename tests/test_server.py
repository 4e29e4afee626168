"""The OpenAI-compatible server, started as a real process on 127.0.0.1, against real clients.

One server (a tiny random HF Llama + a test tokenizer, float32, a small engine and a 40-page
pool) serves the whole module. The official `openai` client completes, chat-completes and
streams; greedy outputs equal HF `generate`'s (transformers' model and tokenizer of the same
folder) and `pagedjax.generate`'s in this process; 72 concurrent clients, some disconnecting
early, all finish correctly and leave the pool fully free; a table of bad inputs each gets its
4xx while the server keeps serving.

The server is `pagedjax serve --port 0` in its own process: it binds a free port itself and
prints it, so no other process can take the port between choosing it and serving on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).absolute().parents[1]
MODEL = "tiny"
API_KEY = "sk-pagedjax-test"
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=64, num_pages=41, max_model_len=128)
PROMPTS = ["Hello world", "The quick brown fox", "def fib(n):", "Once upon a time there was"]
STARTUP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (seeded) with a 512-token byte-level BPE tokenizer and a ChatML template."""
    from tests import hf_models

    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_models.build("llama", folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def hf(model_dir):
    """The oracle: (transformers' float32 model, transformers' tokenizer) of the served folder."""
    import transformers

    return (transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval(),
            transformers.AutoTokenizer.from_pretrained(model_dir))


def hf_greedy(hf, prompt_ids: list[int], max_tokens: int) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of HF greedy `generate`, ending at EOS (not text)."""
    from tests import hf_models

    model, tok = hf
    out = hf_models.hf_greedy(model, prompt_ids, max_tokens, eos=hf_models.EOS)
    prompt_text = tok.decode(prompt_ids, skip_special_tokens=True)
    text = tok.decode(prompt_ids + out, skip_special_tokens=True)[len(prompt_text):]
    return text, "stop" if out[-1] == hf_models.EOS else "length", len(out)


def hf_chat_ids(hf, messages: list[dict]) -> list[int]:
    return hf[1].apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log
        self.http = httpx.Client(base_url=url, trust_env=False, timeout=60,
                                 headers={"Authorization": f"Bearer {API_KEY}"})

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(pagedjax_[^\s]+) (\S+)$", text, re.M)}

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module", params=["engine-thread", "engine-process"])
def server(request, model_dir, tmp_path_factory):
    """`pagedjax serve --port 0` (the server takes a free port and prints it); killed at the end
    whatever happens. Every test runs against both process modes: the engine loop on a thread of
    the server's process (--no-engine-process), and the engine in a process of its own (the default)."""
    extra = ["--no-engine-process"] if request.param == "engine-thread" else []
    yield from _serve(model_dir, tmp_path_factory.mktemp("server") / "server.log", extra)


# a chat template of the server's own (--chat-template), in place of the model's ChatML one
OWN_TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<<assistant>> {% endif %}")


# the generation config the interval server reads its sampling defaults from (--generation-config)
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.7, "top_k": 1, "max_new_tokens": 13}


@pytest.fixture(scope="module")
def interval_server(model_dir, tmp_path_factory):
    """The server with --stream-interval 3, --chat-template (a file) and --generation-config (a
    folder) (the engine in its own process)."""
    folder = tmp_path_factory.mktemp("server")
    (folder / "own.jinja").write_text(OWN_TEMPLATE)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    yield from _serve(model_dir, folder / "server.log",
                      ["--stream-interval", "3", "--chat-template", str(folder / "own.jinja"),
                       "--generation-config", str(folder)])


def _serve(model_dir: Path, log: Path, extra: list[str]):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest",  # as conftest sets it here: same numerics, same compile cache
           # The server imports pagedjax exactly as this process does (under Bazel: the runfiles,
           # with the extension Bazel built).
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in sys.path if p])}
    cmd = [sys.executable, "-m", "pagedjax.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
           "--dtype", "float32", "--served-model-name", MODEL, "--api-key", API_KEY,
           "--max-num-seqs", str(ENGINE["max_num_seqs"]),
           "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
           "--num-pages", str(ENGINE["num_pages"]), "--max-model-len", str(ENGINE["max_model_len"])]
    cmd += extra
    if shutil.which("setpriv"):  # Linux: the server gets SIGTERM even if this process is killed
        cmd = ["setpriv", "--pdeathsig", "TERM", *cmd]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    srv = None
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while srv is None:  # the port it took, from its start-up line
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            found = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
            if found:
                srv = Server(found.group(1), proc, log)
            elif time.monotonic() > deadline:
                pytest.fail(f"the server did not start in {STARTUP_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")
            else:
                time.sleep(0.3)
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                if srv.http.get("/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not come up in {STARTUP_TIMEOUT_S} s:\n{srv.log_tail()}")
            time.sleep(0.3)
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


def _assert_healthy(server: Server) -> None:
    assert server.proc.poll() is None, server.log_tail()
    assert server.http.get("/health").status_code == 200


def _assert_pool_drained(server: Server, timeout: float = 30.0) -> dict[str, float]:
    """Waits until no request runs or waits and every KV page is free again."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m["pagedjax_num_requests_running"] == 0 and m["pagedjax_num_requests_waiting"] == 0
                and m["pagedjax_kv_pages_free"] == m["pagedjax_kv_pages_total"] == ENGINE["num_pages"] - 1):
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"the pool did not drain: {m}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------- the openai client


def test_openai_client_models_completion_chat(server, hf):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]

    c = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert c.object == "text_completion" and len(c.choices) == 1
    prompt_ids = hf[1].encode(PROMPTS[0])
    assert server.http.post("/tokenize", json={"prompt": PROMPTS[0]}).json()["tokens"] == prompt_ids
    text, finish_reason, num_tokens = hf_greedy(hf, prompt_ids, 8)
    assert (c.choices[0].text, c.choices[0].finish_reason) == (text, finish_reason)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(prompt_ids), num_tokens)
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    # vLLM's spaces_between_special_tokens is accepted and changes nothing (vLLM reads it for slow
    # tokenizers only; every tokenizer here is a `tokenizers` one).
    for spaces in (False, True):
        again = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                          extra_body={"spaces_between_special_tokens": spaces})
        assert again.choices[0].text == text

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    template_ids = hf_chat_ids(hf, messages)
    assert server.http.post("/tokenize", json={"messages": messages}).json()["tokens"] == template_ids
    text, finish_reason, num_tokens = hf_greedy(hf, template_ids, 6)
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (text, finish_reason)
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(template_ids), num_tokens)

    # Several prompts, n > 1, logprobs, and a seed that makes sampling reproducible.
    kw = dict(model=MODEL, prompt=PROMPTS[:2], max_tokens=5, temperature=0.9, seed=7, n=2, logprobs=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    for ch in a.choices:
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
        assert all(lp_ <= 0 for lp_ in lp.token_logprobs)
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)  # top 2 + the sampled token (names may repeat)
    assert a.usage.completion_tokens == sum(len(ch.logprobs.tokens) for ch in a.choices)


def _hf_prompt_logprobs(hf, ids: list[int]) -> "np.ndarray":
    """HF's float32 log-softmax at each prompt position (row j: the next-token distribution after
    ids[:j + 1])."""
    import numpy as np
    import torch

    with torch.no_grad():
        logits = hf[0](torch.tensor([ids])).logits[0].double()
    return np.asarray(torch.log_softmax(logits, -1))


def test_prompt_logprobs_and_echo_without_generation(server, hf):
    """vLLM's prompt_logprobs (completions and chat, per position {token id: logprob, rank,
    decoded_token}), and echo with max_tokens 0: the prompt alone with its logprobs, how evaluation
    harnesses score text. Logprobs are HF's log-softmax; streamed echo gives the same text."""
    client = server.client()
    ids = hf[1].encode(PROMPTS[3])
    ref = _hf_prompt_logprobs(hf, ids)
    c = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=3, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    shown = c.choices[0].model_extra["prompt_logprobs"]
    assert len(shown) == len(ids) and shown[0] is None
    for j, entry in enumerate(shown[1:]):
        row = ref[j]
        order = (-row).argsort()
        assert str(ids[j + 1]) in entry and {str(t) for t in order[:2]} <= set(entry) and len(entry) <= 3
        for t, lp in entry.items():
            assert lp["logprob"] == pytest.approx(row[int(t)], abs=1e-4)
            assert lp["rank"] == 1 + int((row > row[int(t)] + 1e-9).sum()), (j, t)
            assert lp["decoded_token"] == hf[1].decode([int(t)])

    echo = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=0, echo=True, logprobs=1)
    ch = echo.choices[0]
    assert (ch.text, ch.finish_reason) == (PROMPTS[3], "length")
    assert (echo.usage.prompt_tokens, echo.usage.completion_tokens) == (len(ids), 0)
    assert ch.logprobs.token_logprobs[0] is None and len(ch.logprobs.token_logprobs) == len(ids)
    want = [ref[j][ids[j + 1]] for j in range(len(ids) - 1)]
    assert ch.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    events = [json.loads(line[6:]) for line in server.http.post(
        "/v1/completions", json={"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 0, "echo": True,
                                 "stream": True}).text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == PROMPTS[3]
    assert events[-1]["choices"][0]["finish_reason"] == "length"

    messages = [{"role": "user", "content": "Hi there"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0,
                                          extra_body={"prompt_logprobs": 0})
    template_ids = hf_chat_ids(hf, messages)
    shown, ref = chat.model_extra["prompt_logprobs"], _hf_prompt_logprobs(hf, template_ids)
    assert len(shown) == len(template_ids) and shown[0] is None
    assert [e[str(t)]["logprob"] for e, t in zip(shown[1:], template_ids[1:])] == pytest.approx(
        [ref[j][template_ids[j + 1]] for j in range(len(template_ids) - 1)], abs=1e-4)
    for body, param in (({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
                        ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
                        ({"prompt": "hi", "prompt_logprobs": -1}, "prompt_logprobs"),
                        ({"prompt": "hi", "max_tokens": 0}, "max_tokens")):
        r = server.http.post("/v1/completions", json={"model": MODEL, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_truncate_prompt_tokens(server, hf):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens only, in completions (echo shows
    them) and chat; a prompt past max_model_len runs; the output is HF's greedy one on those tokens."""
    client = server.client()
    ids = hf[1].encode(" ".join(PROMPTS) * 8)
    assert len(ids) > ENGINE["max_model_len"]
    kw = dict(model=MODEL, max_tokens=5, temperature=0, extra_body={"truncate_prompt_tokens": 12, "ignore_eos": True})
    c = client.completions.create(prompt=" ".join(PROMPTS) * 8, echo=True, logprobs=0, **kw)
    text, _, _ = hf_greedy(hf, ids[-12:], 5)
    assert c.usage.prompt_tokens == 12 and c.choices[0].text == hf[1].decode(ids[-12:]) + text
    assert len(c.choices[0].logprobs.tokens) == 12 + 5
    messages = [{"role": "user", "content": PROMPTS[3]}]
    chat = client.chat.completions.create(messages=messages, **kw)
    template_ids = hf_chat_ids(hf, messages)
    assert chat.usage.prompt_tokens == 12
    assert chat.choices[0].message.content == hf_greedy(hf, template_ids[-12:], 5)[0]
    r = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", r.text


def test_return_token_ids(server, hf):
    """vLLM's return_token_ids: the prompt's token ids (as the model read them) and each choice's
    beside the text, in completions (several prompts, n > 1) and chat, whole and streamed."""
    client = server.client()
    kw = dict(model=MODEL, max_tokens=4, temperature=0.8, seed=5, n=2, logprobs=0)
    c = client.completions.create(prompt=PROMPTS[:2], extra_body={"return_token_ids": True}, **kw)
    for ch in c.choices:
        assert ch.model_extra["prompt_token_ids"] == hf[1].encode(PROMPTS[ch.index // 2])
        ids = ch.model_extra["token_ids"]
        assert len(ids) == len(ch.logprobs.tokens) and hf[1].decode(ids) == ch.text
    plain = client.completions.create(prompt=PROMPTS[:2], **kw)
    assert [ch.text for ch in plain.choices] == [ch.text for ch in c.choices]
    assert "token_ids" not in plain.choices[0].model_extra or plain.choices[0].model_extra["token_ids"] is None
    messages = [{"role": "user", "content": PROMPTS[1]}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                          extra_body={"return_token_ids": True, "truncate_prompt_tokens": 9})
    assert chat.model_extra["prompt_token_ids"] == hf_chat_ids(hf, messages)[-9:]
    assert hf[1].decode(chat.choices[0].model_extra["token_ids"]) == chat.choices[0].message.content
    # streamed: the prompt's ids in each choice's first chunk, each chunk's new ids; joined, the
    # whole answer's (the same seeds give the same tokens as above)
    ckw = {k: v for k, v in kw.items() if k != "logprobs"}
    prompt_ids, ids = {}, {}
    for chunk in client.completions.create(prompt=PROMPTS[:2], stream=True, extra_body={"return_token_ids": True},
                                           **ckw):
        for ch in chunk.choices:
            first = ch.index not in ids
            assert (ch.model_extra["prompt_token_ids"] is not None) == first, chunk
            if first:
                prompt_ids[ch.index] = ch.model_extra["prompt_token_ids"]
            ids.setdefault(ch.index, []).extend(ch.model_extra["token_ids"])
    assert prompt_ids == {ch.index: ch.model_extra["prompt_token_ids"] for ch in c.choices}
    assert ids == {ch.index: ch.model_extra["token_ids"] for ch in c.choices}
    ids, prompt_ids = {}, []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                                stream=True, extra_body={"return_token_ids": True,
                                                                         "truncate_prompt_tokens": 9}):
        prompt_ids.append(chunk.model_extra.get("prompt_token_ids"))
        for ch in chunk.choices:
            ids.setdefault(ch.index, []).extend(ch.model_extra["token_ids"])
    assert prompt_ids[0] == hf_chat_ids(hf, messages)[-9:] and not any(prompt_ids[1:]), prompt_ids
    assert ids == {0: chat.choices[0].model_extra["token_ids"]}


def hf_beams(hf, prompt_ids: list[int], width: int, max_tokens: int, eos: bool) -> list[tuple[list[int], float]]:
    """HF's beam search (transformers' generate, num_beams): [(generated ids, score)] best first."""
    import torch

    from tests import hf_models

    with torch.no_grad():
        g = hf[0].generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                           max_new_tokens=max_tokens, num_beams=width, num_return_sequences=width, do_sample=False,
                           eos_token_id=[hf_models.EOS] if eos else None, pad_token_id=hf_models.EOS,
                           length_penalty=1.0, early_stopping=False, output_scores=True, return_dict_in_generate=True)
    out = []
    for seq, score in zip(g.sequences[:, len(prompt_ids):].tolist(), g.sequences_scores.tolist()):
        end = next((i + 1 for i, t in enumerate(seq) if eos and t == hf_models.EOS), max_tokens)
        out.append((seq[:end], score))
    return out


def test_use_beam_search(server, hf):
    """vLLM's use_beam_search: n beams, the n best hypotheses as the choices, best first: HF's beam
    search token for token (completions with two prompts, chat, streamed too); each choice's
    logprobs add up to its score; fields that would change the search are a 400 naming them."""
    client = server.client()
    tok = hf[1]
    kw = dict(model=MODEL, max_tokens=7, n=3, logprobs=2)
    c = client.completions.create(prompt=PROMPTS[:2], extra_body={"use_beam_search": True, "ignore_eos": True,
                                                                  "return_token_ids": True}, **kw)
    assert [ch.index for ch in c.choices] == list(range(6))
    for ch in c.choices:
        ids = tok.encode(PROMPTS[ch.index // 3])
        tokens, score = hf_beams(hf, ids, 3, 7, eos=False)[ch.index % 3]
        assert ch.model_extra["token_ids"] == tokens, ch.index
        assert ch.text == tok.decode(ids + tokens, skip_special_tokens=True)[len(tok.decode(ids)):]
        assert ch.finish_reason == "length"
        assert sum(ch.logprobs.token_logprobs) / len(tokens) == pytest.approx(score, abs=2e-4)
    assert c.usage.completion_tokens == 6 * 7
    chunks = {}
    for chunk in client.completions.create(prompt=PROMPTS[:2], stream=True,
                                           extra_body={"use_beam_search": True, "ignore_eos": True}, **kw):
        for ch in chunk.choices:
            chunks[ch.index] = chunks.get(ch.index, "") + ch.text
    assert chunks == {ch.index: ch.text for ch in c.choices}
    # chat, EOS allowed: the hypotheses HF keeps, ending at EOS (not text) or at max_tokens
    messages = [{"role": "user", "content": PROMPTS[2]}]
    ids = hf_chat_ids(hf, messages)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, n=2,
                                          extra_body={"use_beam_search": True, "return_token_ids": True})
    expected = hf_beams(hf, ids, 2, 9, eos=True)
    assert [ch.model_extra["token_ids"] for ch in chat.choices] == [t for t, _ in expected]
    for ch, (tokens, _) in zip(chat.choices, expected):
        assert ch.message.content == tok.decode(tokens, skip_special_tokens=True)
        assert ch.finish_reason == ("stop" if tokens[-1] == tok.eos_token_id else "length")
    for extra, param in (({"temperature": 0.7}, "temperature"), ({"top_p": 0.5}, "top_p"),
                         ({"stop": ["x"]}, "stop"), ({"logprobs": 7}, "logprobs"),
                         ({"guided_regex": "a+"}, "use_beam_search"), ({"presence_penalty": 1.0}, "presence_penalty")):
        r = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "n": 3, "max_tokens": 3,
                                                      "use_beam_search": True, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    assert server.http.get("/health").status_code == 200


def test_streamed_equals_non_streamed(server):
    client = server.client()
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0.8, seed=1234)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    messages = [{"role": "user", "content": "Tell me a story"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0.8, seed=99, n=2)
    full = client.chat.completions.create(**kw)
    texts = {0: "", 1: ""}
    finish = {}
    with client.chat.completions.create(**kw, stream=True) as stream:
        for chunk in stream:
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
                if ch.finish_reason:
                    finish[ch.index] = ch.finish_reason
    assert texts == {ch.index: ch.message.content for ch in full.choices}
    assert finish == {ch.index: ch.finish_reason for ch in full.choices}


def test_echo_stop_best_of_and_chat_logprobs(server):
    client = server.client()
    base = dict(model=MODEL, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    ref = client.completions.create(prompt=PROMPTS[0], **base).choices[0]
    echo = client.completions.create(prompt=PROMPTS[0], echo=True, **base).choices[0]
    assert echo.text == PROMPTS[0] + ref.text
    # A stop string taken from the greedy output: the same output, cut before it.
    start = next(i for i in range(1, len(ref.text) - 1) if ref.text[i:i + 2].isascii() and ref.text[i:i + 2].strip())
    stop = ref.text[start:start + 2]
    cut = client.completions.create(prompt=PROMPTS[0], stop=[stop], **base).choices[0]
    assert cut.text == ref.text[:ref.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.model_extra["stop_reason"] == stop

    # best_of=3: the 2 most likely of the 3 samples that n=3 gives with the same seed (sample i
    # draws with seed + i), most likely first; likelihood = the sum of the tokens' logprobs.
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=1.0, seed=3, logprobs=0)
    three = client.completions.create(n=3, **kw).choices
    assert len({ch.text for ch in three}) == 3  # three different samples to choose from
    likely = sorted(three, key=lambda ch: -sum(ch.logprobs.token_logprobs))[:2]
    best = client.completions.create(n=2, best_of=3, **kw)
    assert [ch.index for ch in best.choices] == [0, 1]
    assert [ch.text for ch in best.choices] == [ch.text for ch in likely]
    assert [ch.logprobs.token_logprobs for ch in best.choices] == [ch.logprobs.token_logprobs for ch in likely]

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 2 and tops == sorted(tops, reverse=True) and entry.logprob <= tops[0] + 1e-6
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy: the sampled token is the top one


def test_stream_interval_chunks_and_their_sum(interval_server):
    """--stream-interval 3: a stream's first chunk carries one token, the next ones three, the last
    the rest (the usage on every chunk counts them); joined, the chunks' text and logprobs are the
    non-streamed response's, for a completion and for a chat with n=2. /metrics still counts one
    inter-token latency a token."""
    srv = interval_server
    base = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 11, "ignore_eos": True, "temperature": 0,
            "logprobs": 1}
    itl = srv.metrics()["pagedjax_inter_token_latency_seconds_count"]
    full = srv.http.post("/v1/completions", json=base).json()["choices"][0]
    body = {**base, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with srv.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    # the metrics count a gap between every two tokens, however many a chunk carried
    assert srv.metrics()["pagedjax_inter_token_latency_seconds_count"] - itl == 2 * 10
    chunks = [json.loads(e[len("data: "):]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert [b - a for a, b in zip([0, *counts], counts)] == [1, 3, 3, 3, 1], counts
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["text"] for c in choices) == full["text"]
    # (the second run of a prompt reads its prefix from the cache: logprobs equal to float32's noise)
    assert sum((c["logprobs"]["tokens"] for c in choices), []) == full["logprobs"]["tokens"]
    assert sum((c["logprobs"]["token_logprobs"] for c in choices), []) == pytest.approx(
        full["logprobs"]["token_logprobs"], abs=1e-4)
    assert choices[-1]["finish_reason"] == full["finish_reason"] == "length"

    client = srv.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=10,
              temperature=0.8, seed=99, n=2, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kw)
    texts, tokens = {0: "", 1: ""}, {0: [], 1: []}
    with client.chat.completions.create(**kw, stream=True) as stream:
        for chunk in stream:
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
                tokens[ch.index] += ch.logprobs.content if ch.logprobs else []
    assert texts == {ch.index: ch.message.content for ch in full.choices}
    for ch in full.choices:
        assert [e.token for e in tokens[ch.index]] == [e.token for e in ch.logprobs.content]
        assert [e.logprob for e in tokens[ch.index]] == pytest.approx([e.logprob for e in ch.logprobs.content],
                                                                      abs=1e-4)
    _assert_healthy(srv)


def test_chat_template_option(interval_server, hf):
    """--chat-template renders every chat (/tokenize, chat completions) in place of the model's
    template: the prompt ids are transformers' tokens of the text that template gives."""
    srv = interval_server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want = hf[1].encode("<<system>> Be brief.\n<<user>> Hi there\n<<assistant>> ", add_special_tokens=False)
    assert srv.http.post("/tokenize", json={"messages": messages, "add_special_tokens": False}).json()["tokens"] == want
    assert want != hf_chat_ids(hf, messages)  # not the model's own template
    r = srv.http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want), r.text


def test_generation_config_defaults(interval_server):
    """--generation-config: a request that leaves out its sampling fields samples with the config's
    (top_k 1: the greedy tokens, whatever the temperature 0.7), max_new_tokens (13) bounds every
    request's max_tokens, and a request's own fields win."""
    srv = interval_server
    base = {"model": MODEL, "prompt": PROMPTS[1], "ignore_eos": True}
    greedy = srv.http.post("/v1/completions", json={**base, "max_tokens": 13, "temperature": 0}).json()
    sampled = [srv.http.post("/v1/completions", json={**base, "max_tokens": 40, "seed": s}).json() for s in (1, 2)]
    for r in sampled:
        assert r["usage"]["completion_tokens"] == 13, r["usage"]
        assert r["choices"][0]["text"] == greedy["choices"][0]["text"]
    chat = srv.http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                       "ignore_eos": True}).json()
    assert chat["usage"]["completion_tokens"] == 13, chat["usage"]
    # the request's own top_k and temperature: sampled, so the two seeds differ somewhere
    own = [srv.http.post("/v1/completions", json={**base, "max_tokens": 13, "top_k": 0, "temperature": 1.5,
                                                  "seed": s}).json()["choices"][0]["text"] for s in (1, 2, 3)]
    assert len(set(own)) > 1, own


def test_stream_wire_format(server):
    """Raw SSE: `data: {...}` events, usage when asked, `data: [DONE]` last."""
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 4, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 4
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------------ greedy == pagedjax.generate


def test_greedy_equals_generate(server, model_dir):
    import jax.numpy as jnp

    import pagedjax
    from pagedjax.tokenizer import load_tokenizer

    params = pagedjax.load_params(model_dir, dtype=jnp.float32, progress=False)
    tok = load_tokenizer(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    token_prompt = tok.encode(PROMPTS[3])
    sp = pagedjax.SamplingParams(max_tokens=16, temperature=0.0)
    want = pagedjax.generate(params, [*PROMPTS[:3], token_prompt, chat_ids], sp, use_tqdm=False, **ENGINE)

    client = server.client()
    got = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=16, temperature=0)
    got_ids = client.completions.create(model=MODEL, prompt=token_prompt, max_tokens=16, temperature=0)
    got_chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    for ch, w in zip([*got.choices, *got_ids.choices], want[:4]):
        assert ch.text == w.outputs[0].text and ch.finish_reason == w.outputs[0].finish_reason
    assert got.usage.completion_tokens == sum(len(w.outputs[0].token_ids) for w in want[:3])
    assert got_chat.choices[0].message.content == want[4].outputs[0].text
    assert got_chat.usage.completion_tokens == len(want[4].outputs[0].token_ids)


# ------------------------------------------------------------------- many clients, early disconnects


def test_concurrent_clients_with_disconnects(server):
    client = server.client()
    refs = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0]
            for p in PROMPTS}
    aborts_before = server.metrics().get('pagedjax_requests_finished_total{finished_reason="abort"}', 0.0)
    rng = random.Random(0)
    kinds = ["stream", "full", "stream_cut", "full_cut", "stream", "full"] * 12  # 72 clients
    rng.shuffle(kinds)
    long = {"max_tokens": 100, "ignore_eos": True, "temperature": 0}  # still running when the client leaves

    async def one(http: httpx.AsyncClient, i: int, kind: str):
        prompt = PROMPTS[i % len(PROMPTS)]
        await asyncio.sleep(rng.random() * 0.5)
        if kind == "full":
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                          "temperature": 0})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            return kind, (choice["text"], choice["finish_reason"]), prompt
        if kind == "stream":
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
            text, finish, done = "", None, False
            async with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["text"]
                        finish = choice["finish_reason"] or finish
            assert done
            return kind, (text, finish), prompt
        if kind == "stream_cut":  # leave after two chunks, mid-generation
            body = {"model": MODEL, "prompt": prompt, "stream": True, **long}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen == 2:
                        break
            return kind, None, prompt
        # full_cut: give up on a non-streamed request after a random wait (queued or running)
        try:
            await asyncio.wait_for(http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **long}),
                                   timeout=0.05 + rng.random())
        except asyncio.TimeoutError:
            pass
        return kind, None, prompt

    async def main():
        limits = httpx.Limits(max_connections=len(kinds) + 8, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=90, limits=limits,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, i, k) for i, k in enumerate(kinds))), 150)

    results = asyncio.run(main())
    for kind, got, prompt in results:
        if kind in ("stream", "full"):
            assert got == (refs[prompt].text, refs[prompt].finish_reason), (kind, prompt)
    m = _assert_pool_drained(server)
    aborts = m.get('pagedjax_requests_finished_total{finished_reason="abort"}', 0.0) - aborts_before
    assert aborts >= kinds.count("stream_cut")  # each of them left a running request behind
    _assert_healthy(server)
    again = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert again.choices[0].text == refs[PROMPTS[0]].text


# ----------------------------------------------------------------------------------- bad inputs

_LONG_IDS = list(range(3, 3 + 200))  # 200 tokens > max_model_len 128

BAD = [  # (case, path, body: dict | bytes, status, param)
    ("prompt wrong type", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("max_tokens string", "/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens float", "/v1/completions", {"prompt": "hi", "max_tokens": 5.5}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens huge", "/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ("n above limit", "/v1/completions", {"prompt": "hi", "n": 1000}, 400, "n"),
    ("best_of above limit", "/v1/completions", {"prompt": "hi", "best_of": 1000}, 400, "best_of"),
    ("greedy with n=2", "/v1/completions", {"prompt": "hi", "n": 2, "temperature": 0}, 400, "n"),
    ("temperature negative", "/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("seed float", "/v1/completions", {"prompt": "hi", "seed": 1.5}, 400, "seed"),
    ("stop wrong type", "/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("logprobs too many", "/v1/completions", {"prompt": "hi", "logprobs": 100}, 400, "logprobs"),
    ("prompt too long (ids)", "/v1/completions", {"prompt": _LONG_IDS, "max_tokens": 4}, 400, "prompt"),
    ("prompt too long (text)", "/v1/completions", {"prompt": "hello " * 300, "max_tokens": 4}, 400, "prompt"),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 100000]}, 400, "prompt"),
    ("token id negative", "/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("unknown field", "/v1/completions", {"prompt": "hi", "foo": 1}, 400, "foo"),
    ("unknown nested field", "/v1/completions", {"prompt": "hi", "stream": True,
                                                  "stream_options": {"bar": True}}, 400, "stream_options"),
    ("unsupported field", "/v1/completions", {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ("NaN", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("malformed JSON", "/v1/completions", b'{"prompt": "hi"', 400, None),
    ("JSON not an object", "/v1/completions", b'[1, 2, 3]', 400, None),
    ("empty body", "/v1/completions", b"", 400, None),
    ("invalid UTF-8", "/v1/completions", b'{"prompt": "caf\xe9 \xff\xfe"}', 400, None),
    ("lone surrogate", "/v1/completions", b'{"prompt": "\\ud800"}', 400, None),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("missing messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("content wrong type", "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400,
     "messages"),
    ("image content", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                       "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat max_tokens huge", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens"),
    ("detokenize out of vocab", "/detokenize", {"tokens": [1, 99999]}, 400, "tokens"),
    ("tokenize nothing", "/tokenize", {}, 400, "prompt"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("unknown chat model", "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user",
                                                                                     "content": "x"}]}, 404, "model"),
]


@pytest.mark.parametrize("case,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input(server, case, path, body, status, param):
    if isinstance(body, dict):
        body = {"model": MODEL, **body}
        r = server.http.post(path, json=body)
    else:
        r = server.http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_auth_and_routes(server):
    raw = httpx.Client(base_url=server.url, trust_env=False, timeout=30)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = raw.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert raw.get("/health").status_code == 200  # open, like /metrics and /version
    assert raw.get("/version").json()["version"]
    for client in (raw, server.http):  # an unknown route is 404 with or without the key
        r = client.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError", r.text
    assert server.http.get("/v1/completions").status_code == 405
    raw.close()


def test_oversized_body(server):
    """A body past the 4 MiB limit gets 413 as soon as its Content-Length is seen."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {API_KEY}\r\nContent-Length: {5 << 20}\r\n\r\n")
        s.sendall(head.encode() + b'{"prompt": "' + b"a" * 4096)
        response = b""
        while b"\r\n\r\n" not in response:
            data = s.recv(65536)
            if not data:
                break
            response += data
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    _assert_healthy(server)


def test_server_keeps_serving_after_bad_inputs(server, hf):
    for _, path, body, status, _ in BAD[:10]:
        r = server.http.post(path, json=body) if isinstance(body, dict) else server.http.post(path, content=body)
        assert r.status_code == status, r.text
    _assert_healthy(server)
    r = server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == hf_greedy(hf, hf[1].encode(PROMPTS[0]), 3)[:2]
    _assert_pool_drained(server)


def test_tokenize_detokenize_roundtrip(server):
    ids = server.http.post("/tokenize", json={"prompt": "Hello café 日本語"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == ENGINE["max_model_len"]
    assert server.http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "Hello café 日本語"


def test_metrics(server):
    server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    m = _assert_pool_drained(server)
    for name in ("pagedjax_num_requests_running", "pagedjax_num_requests_waiting", "pagedjax_kv_pages_in_use",
                 "pagedjax_generation_tokens_per_second"):
        assert name in m
    assert m["pagedjax_generation_tokens_total"] >= 4
    assert m["pagedjax_time_to_first_token_seconds_count"] >= 1
    assert m["pagedjax_inter_token_latency_seconds_count"] >= 3
    assert m["pagedjax_kv_pages_in_use"] == 0


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_text_chunks_are_the_models_bytes(kind):
    """A stream's plain text chunks, spliced into a pre-rendered event, are byte for byte what the
    pydantic models render, for texts with quotes, backslashes, control characters, non-ASCII
    and the marker's own characters; and the splice is what runs (the template is cached)."""
    from pagedjax.server import protocol as P
    from pagedjax.server.serving import _event, _TextChunks

    def render(i, text):
        if kind == "chat":
            choice = P.ChatChunkChoice(index=i, delta=P.Delta(content=text))
            return _event(P.ChatCompletionChunk(id="chatcmpl-x\"y", created=17, model="m/ü", choices=[choice]))
        choice = P.CompletionChoice(index=i, text=text)
        return _event(P.CompletionResponse(id="cmpl-1", created=17, model="m", choices=[choice]))

    chunks = _TextChunks(render)
    rng = random.Random(3)
    alphabet = ['"', "\\", "\n", "\t", "\r", "\b", "\f", "\x00", "\x1f", "\x7f", "\x85", "\u2028", "\u2029", "é", "😀", "\ufffd",
                "/", "<", " ", "a", "Z", "0", "pagedjax-text"]
    texts = ["", " word", "\x00pagedjax-text\x00"] + ["".join(rng.choices(alphabet, k=rng.randint(1, 12)))
                                                     for _ in range(300)]
    for text in texts:
        for i in (0, 3):
            assert chunks(i, text) == render(i, text), repr(text)
    assert sorted(chunks._parts) == [0, 3]  # the splice ran, for each index
    assert all(chunks._parts.values())


@pytest.mark.parametrize("text", ["a\u2028b", "\x85", "x\u2029\u2028y\x85z", "\n\r\x0b\x0c\x1c\x1d\x1e"])
def test_events_are_one_line_for_any_line_reader(text):
    """Every SSE event is `data: <json>` and a blank line for a reader that splits lines as
    str.splitlines does (httpx's aiter_lines: also at U+0085, U+2028, U+2029, which JSON may leave
    raw), and its JSON gives the text back: for the models' events, the spliced text chunks and
    the error events."""
    from pagedjax.server import protocol as P
    from pagedjax.server.serving import APIError, _error_event, _event, _TextChunks

    def render(i, t):
        return _event(P.CompletionResponse(id="cmpl-1", created=17, model="m",
                                           choices=[P.CompletionChoice(index=i, text=t)]))

    spliced = _TextChunks(render)
    spliced(0, "warm")  # the template cached: the next call splices
    events = {"model": (render(0, text), lambda d: d["choices"][0]["text"]),
              "spliced": (spliced(0, text), lambda d: d["choices"][0]["text"]),
              "error": (_error_event(APIError(400, text)), lambda d: d["error"]["message"])}
    for name, (event, field) in events.items():
        lines = event.splitlines()
        assert len(lines) == 2 and lines[0].startswith("data: ") and lines[1] == "", (name, lines)
        assert field(json.loads(lines[0][6:])) == text, name


def test_text_chunks_without_a_splice_render_each_time():
    """An event where the text does not come out as one JSON string (here twice) is rendered for
    every chunk, and the template is tried once per index, not at every chunk."""
    from pagedjax.server.serving import _TextChunks

    calls = []

    def render(i, text):
        calls.append(text)
        return f"data: {json.dumps([i, text, text])}\n\n"

    chunks = _TextChunks(render)
    for text in ("a", 'b"', "c"):
        assert chunks(1, text) == render(1, text)
    assert chunks._parts == {1: None}
    assert len(calls) == 1 + 2 * 3  # the template once, then each chunk and its check
