"""llmopt-serve through the official ``openai`` client against 127.0.0.1: two adapters on the
embedded model (each answers as the in-process peft model does), the base, streaming,
concurrency, client disconnects, the 4xx errors; one short chat on the real model."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from llmopt_ext.finetune import serve  # noqa: E402
from llmopt_ext.finetune.train import base_model_dir  # noqa: E402


class Server:
    """uvicorn in a thread on a free port (the socket is bound here, so no port race)."""

    def __init__(self, engine):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        cfg = uvicorn.Config(serve.build_app(engine), log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=120)

    def stop(self, engine):
        self.server.should_exit = True
        self.thread.join(10)
        engine.close()


def _make_adapter(path: str, seed: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(base_model_dir(), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # B = 0 at init would make every adapter the base model
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(path)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    paths = {"alpha": str(root / "alpha"), "beta": str(root / "beta")}
    for i, p in enumerate(paths.values()):
        _make_adapter(p, seed=10 + i)
    engine = serve.Engine.load(None, paths, limits=serve.Limits(max_body_bytes=4096,
                                                                 max_tokens_cap=200,
                                                                 max_prompt_tokens=40))
    srv = Server(engine)
    yield srv, paths, engine
    srv.stop(engine)


def _reference(paths, name, prompt, n):
    """Greedy continuation by plain peft (no fused layer), in this process."""
    tok = AutoTokenizer.from_pretrained(base_model_dir())
    model = AutoModelForCausalLM.from_pretrained(base_model_dir(), dtype=torch.float32)
    if name is not None:
        model = PeftModel.from_pretrained(model, paths[name])
    ids = tok(prompt, return_tensors="pt")
    out = model.eval().generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_models_lists_base_and_adapters(embedded):
    srv, _, _ = embedded
    ids = [m.id for m in srv.client.models.list().data]
    assert ids == [serve.EMBEDDED_NAME, "alpha", "beta"]


def test_each_model_answers_as_in_process_peft(embedded):
    srv, paths, _ = embedded
    prompt, n = "Reverse: abc\n", 12
    got = {}
    for name in (serve.EMBEDDED_NAME, "alpha", "beta"):
        r = srv.client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
        got[name] = r.choices[0].text
        ref = _reference(paths, None if name == serve.EMBEDDED_NAME else name, prompt, n)
        assert got[name] == ref, name
        assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"
    assert len(set(got.values())) == 3, got  # the adapters differ from each other and the base


def test_streaming_equals_non_streaming(embedded):
    srv, _, _ = embedded
    kw = dict(model="alpha", prompt="Sort: dcba\n", max_tokens=10, temperature=0)
    full = srv.client.completions.create(**kw).choices[0].text
    chunks = list(srv.client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    msgs = [{"role": "user", "content": "Reverse: xyz"}]
    chat = srv.client.chat.completions.create(model="beta", messages=msgs, max_tokens=8,
                                              temperature=0).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in srv.client.chat.completions.create(
        model="beta", messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert streamed == chat


def test_sampling_is_seeded(embedded):
    srv, _, _ = embedded
    kw = dict(model="alpha", prompt="Copy: hello\n", max_tokens=16, temperature=1.0, top_p=0.9)
    a = srv.client.completions.create(seed=3, **kw).choices[0].text
    b = srv.client.completions.create(seed=3, **kw).choices[0].text
    others = {srv.client.completions.create(seed=s, **kw).choices[0].text for s in (4, 5, 6)}
    assert a == b
    assert others - {a}, "different seeds gave the same sample every time"


def test_two_concurrent_requests(embedded):
    srv, _, _ = embedded
    kw = dict(prompt="Reverse: hello\n", max_tokens=24, temperature=0)
    want = {m: srv.client.completions.create(model=m, **kw).choices[0].text for m in ("alpha", "beta")}
    got, errors = {}, []

    def call(m):
        try:
            got[m] = srv.client.completions.create(model=m, **kw).choices[0].text
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=call, args=(m,)) for m in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and got == want


def test_client_disconnect_mid_stream(embedded):
    srv, _, engine = embedded
    body = json.dumps({"model": "alpha", "prompt": "Copy: abc\n", "max_tokens": 200,
                       "temperature": 0, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    seen = b""
    while b"data:" not in seen:
        seen += s.recv(4096)
    cancelled = engine.finished["cancelled"]
    s.close()  # gone mid-stream
    r = srv.client.completions.create(model="beta", prompt="Sort: cab\n", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and engine.worker.is_alive()
    assert engine.finished["cancelled"] == cancelled + 1  # stopped early, not run to 200 tokens


def _post(url, data: bytes):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, "invalid_json"),
    (json.dumps({"model": "nope", "prompt": "a"}).encode(), 404, "model_not_found"),
    (json.dumps({"model": "alpha", "prompt": "a", "max_tokens": "5"}).encode(), 400, "invalid_type"),
    (json.dumps({"model": "alpha", "prompt": 7}).encode(), 400, "invalid_type"),
    (json.dumps({"model": "alpha", "prompt": "a", "max_tokens": 201}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "alpha", "prompt": "a" * 50}).encode(), 400, "context_length_exceeded"),
    (json.dumps({"model": "alpha", "prompt": "a" * 5000}).encode(), 413, "request_too_large"),
    (json.dumps({"model": "alpha", "prompt": "a", "top_p": 0}).encode(), 400, "invalid_value"),
])
def test_bad_requests_get_openai_errors(embedded, body, status, code):
    srv, _, _ = embedded
    got, payload = _post(srv.url + "/completions", body)
    assert got == status and payload["error"]["code"] == code, payload
    assert payload["error"]["message"]


def test_openai_client_raises_on_unknown_model(embedded):
    srv, _, _ = embedded
    with pytest.raises(openai.NotFoundError):
        srv.client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "x"}])


def test_chat_prompt_without_template_joins_roles():
    tok = AutoTokenizer.from_pretrained(base_model_dir())
    assert not getattr(tok, "chat_template", None)
    ids = serve.chat_prompt(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert tok.decode(ids, skip_special_tokens=True) == "system: s\nuser: u\nassistant:"


def test_real_model_short_chat(real_model_dir):
    engine = serve.Engine.load(real_model_dir, {})
    srv = Server(engine)
    try:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        t0 = time.perf_counter()
        r = srv.client.chat.completions.create(model=os.path.basename(real_model_dir),
                                               messages=msgs, max_tokens=8, temperature=0)
        latency = time.perf_counter() - t0
        tok = engine.tokenizer
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        ref = engine.model.generate(**ids, max_new_tokens=8, do_sample=False)
        want = tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert r.choices[0].message.content == want and want.strip()
        print(f"real model: 8-token chat completion in {latency:.2f} s: {want!r}")
    finally:
        srv.stop(engine)
