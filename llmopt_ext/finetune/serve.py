"""``llmopt-serve`` / ``python -m llmopt_ext.finetune.serve``: an OpenAI-compatible HTTP server
over a base model and any number of unmerged LoRA adapters.

    llmopt-serve --model ./my-llama --adapter support=runs/a/adapter --adapter legal=runs/b/adapter

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(``"stream": true`` answers with server-sent events, ending with ``data: [DONE]``). The
request's ``model`` picks what answers: an adapter's name serves that adapter (peft
``set_adapter``), the base model's name (``--served-model-name``, default the model directory's
name) serves the base with the adapters disabled. A merged model directory (``llmopt-finetune
--merge``) is just another ``--model``.

Adapters are loaded with peft into llmopt_ext's fused LoRA layer
(:func:`llmopt_ext.nn.use_fused_lora` on each adapter's own LoraConfig).

Concurrency: requests are QUEUED, not batched. One worker thread owns the model and runs one
generation at a time (the active adapter is model-wide state, so two generations cannot
interleave on it); the HTTP side stays responsive and each request waits its turn. A streaming
client that disconnects cancels its generation at the next token.

Limits (each a clear 4xx with an OpenAI-style ``{"error": {...}}`` body): request body bytes
(``--max-body-bytes``, 413), ``max_tokens`` (``--max-tokens-cap``), prompt tokens
(``--max-prompt-tokens``, and prompt + max_tokens within the model's context), unknown model
(404), bad JSON or bad field types (400).

Chat prompts use the tokenizer's chat template (``add_generation_prompt=True``) when it has one,
else ``"role: content"`` lines followed by ``"assistant:"``. ``temperature`` 0 is greedy;
otherwise sampling with ``temperature`` / ``top_p``, reproducible with ``seed``.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Union

import torch

EMBEDDED_NAME = "llmopt-embedded-base"


class ServeError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type and code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


# ----------------------------------------------------------------------------- the model side

@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 512
    max_prompt_tokens: int = 2048


@dataclass
class Job:
    """One generation, run by the worker; tokens come back through ``out`` (None ends it)."""
    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    cancelled: threading.Event = field(default_factory=threading.Event)
    finish_reason: str = "length"
    out: Optional[asyncio.Queue] = None  # set by submit(), on the event loop's thread
    loop: Optional[asyncio.AbstractEventLoop] = None

    def put(self, item) -> None:
        """From the worker thread: hand a token (or an exception, or None: the end) over."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def _load_adapters(model, adapters: dict[str, str]):
    """The base model with every adapter loaded unmerged into fused LoRA layers."""
    from peft import LoraConfig, PeftModel

    from ..nn import use_fused_lora
    peft_model = None
    for name, path in adapters.items():
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise SystemExit(f"llmopt-serve: --adapter {name}={path}: no adapter_config.json there")
        cfg = use_fused_lora(LoraConfig.from_pretrained(path))
        cfg.inference_mode = True
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=name, config=cfg)
        else:  # add_adapter first so load_adapter keeps our config (with the fused mapping)
            peft_model.add_adapter(name, cfg)
            peft_model.load_adapter(path, adapter_name=name)
    return peft_model if peft_model is not None else model


class Engine:
    """The model, its tokenizer and the worker thread that runs generations one at a time."""

    def __init__(self, model, tokenizer, base_name: str, adapters: tuple[str, ...] = (),
                 limits: Limits | None = None, device: str = "cpu"):
        self.model, self.tokenizer, self.base_name = model.eval(), tokenizer, base_name
        self.adapters, self.limits, self.device = tuple(adapters), limits or Limits(), device
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.created = int(time.time())
        self.jobs: "queue.Queue[Job | None]" = queue.Queue()
        self.finished: collections.Counter = collections.Counter()  # finish reason -> jobs
        self.worker = threading.Thread(target=self._work, name="llmopt-serve-worker", daemon=True)
        self.worker.start()

    @classmethod
    def load(cls, model_dir: str | None, adapters: dict[str, str], name: str | None = None,
             limits: Limits | None = None, device: str = "cpu") -> "Engine":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if model_dir is None:
            from .train import base_model_dir
            model_dir = base_model_dir()
            name = name or EMBEDDED_NAME
        if not os.path.isdir(model_dir):
            raise SystemExit(f"llmopt-serve: --model {model_dir}: not a directory")
        name = name or os.path.basename(os.path.normpath(model_dir))
        if name in adapters:
            raise SystemExit(f"llmopt-serve: adapter name {name!r} is the base model's name")
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        return cls(_load_adapters(model, adapters), tok, name, tuple(adapters), limits, device)

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    # -- the worker
    def submit(self, job: Job) -> Job:
        """Queues ``job``; call from the event loop (its tokens arrive on ``job.out``)."""
        job.loop, job.out = asyncio.get_running_loop(), asyncio.Queue()
        self.jobs.put(job)
        return job

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                for tok in self._generate(job):
                    job.put(tok)
            except Exception as e:  # noqa: BLE001 - reported to that request, the worker lives on
                job.put(e)
                job.finish_reason = "error"
            self.finished[job.finish_reason] += 1
            job.put(None)

    def _select(self, name: str):
        """A context in which the model answers as ``name`` (adapter, or base without one)."""
        import contextlib
        if name == self.base_name:
            return self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _generate(self, job: Job) -> Iterator[int]:
        gen = None
        if job.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(job.seed if job.seed is not None else int.from_bytes(os.urandom(6), "big"))
        eos = _eos_ids(self.tokenizer, self.model)
        ids = torch.tensor([job.prompt_ids], device=self.device)
        past = None
        with self._select(job.model):
            for _ in range(job.max_tokens):
                if job.cancelled.is_set():
                    job.finish_reason = "cancelled"
                    return
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = _pick(out.logits[0, -1].float(), job.temperature, job.top_p, gen)
                if nxt in eos:
                    job.finish_reason = "stop"
                    return
                yield nxt
                ids = torch.tensor([[nxt]], device=self.device)
        job.finish_reason = "length"


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids.update(v if isinstance(v, (list, tuple)) else [v] if v is not None else [])
    return ids


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


# ----------------------------------------------------------------------------- requests

def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def make_job(engine: Engine, req, prompt_ids: list[int]) -> Job:
    lim = engine.limits
    if req.model not in engine.names():
        raise ServeError(404, f"model {req.model!r} does not exist; served: "
                         f"{', '.join(engine.names())}", "model", "model_not_found")
    max_tokens = req.max_tokens if req.max_tokens is not None else min(16, lim.max_tokens_cap)
    if not 1 <= max_tokens <= lim.max_tokens_cap:
        raise ServeError(400, f"max_tokens must be in [1, {lim.max_tokens_cap}], got {max_tokens}",
                         "max_tokens", "invalid_value")
    if not prompt_ids:
        raise ServeError(400, "the prompt is empty", "prompt", "invalid_value")
    if len(prompt_ids) > lim.max_prompt_tokens:
        raise ServeError(400, f"the prompt has {len(prompt_ids)} tokens, more than the limit "
                         f"{lim.max_prompt_tokens}", "messages", "context_length_exceeded")
    if engine.context and len(prompt_ids) + max_tokens > engine.context:
        raise ServeError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) "
                         f"exceeds the model's context of {engine.context}", "max_tokens",
                         "context_length_exceeded")
    if not 0.0 <= req.temperature <= 2.0:
        raise ServeError(400, "temperature must be in [0, 2]", "temperature", "invalid_value")
    if not 0.0 < req.top_p <= 1.0:
        raise ServeError(400, "top_p must be in (0, 1]", "top_p", "invalid_value")
    return Job(req.model, list(prompt_ids), max_tokens, req.temperature, req.top_p, req.seed)


class Detokenizer:
    """Text deltas from a growing token list (decoding the whole list each time keeps
    multi-token characters intact; a trailing U+FFFD is held back until it completes)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent:], len(text)
        return delta

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


async def tokens_of(job: Job):
    """The job's tokens as they come; cancels the job when the consumer goes away."""
    try:
        while True:
            item = await job.out.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        job.cancelled.set()


# ----------------------------------------------------------------------------- request schemas
# Module-level so that FastAPI resolves the endpoints' (string) annotations. Strict types: a
# "5" for max_tokens is a 400, not silently 5.
try:
    from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr
except ImportError:  # pragma: no cover - pydantic comes with fastapi (the serve extra)
    BaseModel = None
else:
    Number = Union[StrictInt, StrictFloat]

    class Message(BaseModel):
        role: StrictStr
        content: StrictStr

    class Common(BaseModel):
        model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted, unused
        model: StrictStr
        max_tokens: Optional[StrictInt] = None
        temperature: Number = 1.0
        top_p: Number = 1.0
        seed: Optional[StrictInt] = None
        stream: StrictBool = False

    class ChatRequest(Common):
        messages: List[Message]
        max_completion_tokens: Optional[StrictInt] = None

    class CompletionRequest(Common):
        prompt: Union[StrictStr, List[StrictInt]]


# ----------------------------------------------------------------------------- the app

def build_app(engine: Engine):
    """The FastAPI app over ``engine``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    app = FastAPI(title="llmopt-serve")
    app.state.engine = engine

    @app.exception_handler(ServeError)
    async def _serve_error(_req, e: ServeError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return JSONResponse(ServeError(400, "the request body is not valid JSON", None,
                                           "invalid_json").body(), status_code=400)
        return JSONResponse(ServeError(400, f"{where or 'body'}: {first.get('msg', 'invalid')}",
                                       where, "invalid_type").body(), status_code=400)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": engine.created, "owned_by": "llmopt"}
            for n in engine.names()]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if req.max_tokens is None and req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        if not req.messages:
            raise ServeError(400, "messages must not be empty", "messages", "invalid_value")
        ids = chat_prompt(engine.tokenizer, [m.model_dump() for m in req.messages])
        job = engine.submit(make_job(engine, req, ids))
        return await respond(engine, job, req.stream, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        ids = (req.prompt if isinstance(req.prompt, list)
               else engine.tokenizer(req.prompt, add_special_tokens=True)["input_ids"])
        job = engine.submit(make_job(engine, req, ids))
        return await respond(engine, job, req.stream, chat=False)

    app.add_middleware(BodyLimit, max_bytes=engine.limits.max_body_bytes)
    return app


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered with 413 before the
    app sees it (declared Content-Length, or counted while a chunked body arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                return await self._reject(send)
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body, done = b"".join(chunks), False

        async def replay():
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    async def _reject(self, send):
        err = ServeError(413, f"the request body exceeds {self.max_bytes} bytes", None,
                         "request_too_large").body()
        data = json.dumps(err).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def _choice(chat: bool, text: str, finish, delta: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    key = "delta" if delta else "message"
    msg = {"role": "assistant", "content": text} if not delta or text is None else {"content": text}
    if delta and text is None:
        msg = {"role": "assistant", "content": ""}
    return {"index": 0, key: msg, "finish_reason": finish}


async def respond(engine: Engine, job: Job, stream: bool, chat: bool):
    from fastapi.responses import JSONResponse, StreamingResponse
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": job.model}
    detok = Detokenizer(engine.tokenizer)
    if not stream:
        async for tok in tokens_of(job):
            detok.push(tok)
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(detok.ids),
                 "total_tokens": len(job.prompt_ids) + len(detok.ids)}
        return JSONResponse({**head, "choices": [_choice(chat, detok.text(), job.finish_reason)],
                             "usage": usage})
    head["object"] = "chat.completion.chunk" if chat else "text_completion"

    def event(choice) -> str:
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    async def events():
        if chat:  # OpenAI's first chunk carries the role
            yield event(_choice(True, None, None, delta=True))
        try:
            async for tok in tokens_of(job):
                piece = detok.push(tok)
                if piece:
                    yield event(_choice(chat, piece, None, delta=True))
        except Exception as e:  # noqa: BLE001 - headers are sent: report inside the stream
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            return
        yield event(_choice(chat, "", job.finish_reason, delta=True))
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


# ----------------------------------------------------------------------------- CLI

def _adapter_arg(s: str) -> tuple[str, str]:
    name, sep, path = s.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter {s!r}: expected NAME=DIR")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmopt-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base (or merged) model directory "
                   "(default: the embedded base model)")
    p.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=DIR",
                   help="an unmerged peft LoRA adapter served as model NAME (repeatable)")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in requests (default: the model directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    p.add_argument("--max-tokens-cap", type=int, default=Limits.max_tokens_cap)
    p.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("llmopt-serve needs fastapi and uvicorn: pip install 'llmopt_ext[serve]'")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise SystemExit("llmopt-serve: two --adapter options have the same name")
    limits = Limits(args.max_body_bytes, args.max_tokens_cap, args.max_prompt_tokens)
    engine = Engine.load(args.model, adapters, args.served_model_name, limits, args.device)
    print(f"llmopt-serve: serving {', '.join(engine.names())} on http://{args.host}:{args.port}/v1",
          flush=True)
    uvicorn.run(build_app(engine), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
