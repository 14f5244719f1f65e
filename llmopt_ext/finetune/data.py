"""Data for :mod:`llmopt_ext.finetune`: the embedded instruction task, Alpaca-style and
conversational (``{"messages": [...]}``) file loading, prompt templates (Alpaca, compact, or the
tokenizer's own chat template with the loss on the assistant turns only), tokenisation with the
prompt masked out of the loss, and batching.

The embedded task (no download) is generated deterministically from a seed. Every example has
one correct answer, so exact-match accuracy is meaningful:

* ``add``: two numbers 0-99 -> their sum;
* ``reverse``: 3-6 lower-case letters -> reversed;
* ``copy``: 3-6 lower-case letters -> the same string;
* ``sort``: 3-5 digits -> sorted ascending;
* ``text``: a templated sentence about one of a fixed set of subjects (free text, but
  still deterministic given the subject, so it is checkable too).

The base model (``python -m llmopt_ext.finetune.pretrain``) is pretrained on the same skills in
a terse plain-text form (``add 37 45 = 82``, see :func:`pretrain_line`), never in the
instruction template, so the base model scores ~0 exact match on the instruction prompts and
fine-tuning has something to teach: the mapping from instructions to skills and the response
format.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

IGNORE_INDEX = -100  # label value skipped by the cross-entropy of HF causal LMs

TASKS = ("add", "reverse", "copy", "sort", "text")

_INSTRUCTIONS = {
    "add": "Add the two numbers.",
    "reverse": "Reverse the letters.",
    "copy": "Repeat the text exactly.",
    "sort": "Sort the digits in ascending order.",
}
_SUBJECTS = {  # subject -> (adjective, place): fixed, so the "free text" answer is checkable
    "cat": ("sleepy", "on the sofa"), "dog": ("happy", "in the garden"),
    "bird": ("small", "in the tree"), "fish": ("quick", "in the pond"),
    "horse": ("strong", "in the field"), "owl": ("wise", "in the barn"),
    "fox": ("clever", "in the woods"), "bee": ("busy", "near the flowers"),
}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class DataError(ValueError):
    """Bad input data (missing file, malformed record, empty dataset): the message says where."""


def make_example(rng: random.Random, task: str) -> dict:
    """One example of ``task`` as an Alpaca record (instruction, input, output, task)."""
    if task == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        inp, out = f"{a} {b}", str(a + b)
    elif task in ("reverse", "copy"):
        s = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
        inp, out = s, (s[::-1] if task == "reverse" else s)
    elif task == "sort":
        d = [rng.choice("0123456789") for _ in range(rng.randint(3, 5))]
        inp, out = "".join(d), "".join(sorted(d))
    elif task == "text":
        subj = rng.choice(sorted(_SUBJECTS))
        adj, place = _SUBJECTS[subj]
        return {"instruction": f"Write a sentence about the {subj}.", "input": "",
                "output": f"The {adj} {subj} is {place}.", "task": task}
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return {"instruction": _INSTRUCTIONS[task], "input": inp, "output": out, "task": task}


def generate_dataset(n: int, seed: int, tasks: Sequence[str] = TASKS) -> list[dict]:
    """``n`` examples, tasks drawn uniformly; the same (n, seed, tasks) gives the same list."""
    rng = random.Random(seed)
    return [make_example(rng, rng.choice(tasks)) for _ in range(n)]


def pretrain_line(ex: dict, form: int = 0) -> str:
    """A plain-text form of an example used to pretrain the base model. Form 0 is terse
    (``add 37 45 = 82``), form 1 spreads over lines (``add:\n37 45\n\nresult:\n82``) so the
    skills do not depend on one fixed distance between input and answer: with form 0 alone,
    LoRA (r=8, 600 AdamW steps) learned sort but stayed at 0 exact match on copy and reverse,
    which the base model does at 93-100% in the terse form."""
    task = ex["task"]
    if task == "text":
        return ex["output"]
    if form == 1:
        return f"{task}:\n{ex['input']}\n\nresult:\n{ex['output']}"
    return f"{task} {ex['input']} = {ex['output']}"


# ---------------------------------------------------------------------------------- templates

TEMPLATES = {
    # The standard Alpaca template (Taori et al., 2023).
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    # Alpaca's section headers without the fixed preamble: the embedded model is
    # character-level, where the preamble alone is ~190 tokens (3x the rest of a prompt).
    "compact": (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}


# ``chat`` is the tokenizer's own chat template (:func:`encode_chat`), not a format string
TEMPLATE_NAMES = ("alpaca", "chat", "compact")


def checkpoint_has_chat_template(path: str) -> bool:
    """Whether the tokenizer saved in ``path`` has a chat template (without loading it):
    transformers keeps it in chat_template.jinja / .json or in tokenizer_config.json."""
    if any(os.path.exists(os.path.join(path, f)) for f in ("chat_template.jinja", "chat_template.json")):
        return True
    cfg = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(cfg):
        return False
    with open(cfg, encoding="utf-8") as f:
        try:
            return bool(json.load(f).get("chat_template"))
        except (json.JSONDecodeError, AttributeError):
            return False


def format_prompt(ex: dict, template: str = "alpaca") -> str:
    with_input, without_input = TEMPLATES[template]
    if ex.get("input"):
        return with_input.format(instruction=ex["instruction"], input=ex["input"])
    return without_input.format(instruction=ex["instruction"])


# ------------------------------------------------------------------------------- file loading

def _check_record(rec, where: str) -> dict:
    if isinstance(rec, dict) and "messages" in rec:
        return check_conversation(rec, where)
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction' and 'output', "
                        f"got {type(rec).__name__}")
    for key in ("instruction", "output"):
        if key not in rec:
            raise DataError(f"{where}: missing key {key!r} (an Alpaca record needs "
                            "'instruction', 'output' and optionally 'input')")
    for key in ("instruction", "output"):
        if rec[key] is None:  # str(None) would otherwise be trained on as the text "None"
            raise DataError(f"{where}: {key!r} is null; it must be a string")
    for key in ("instruction", "input", "output"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
    return {"instruction": rec["instruction"], "input": rec.get("input") or "",
            "output": rec["output"], "task": rec.get("task", "file")}


def _read_text(path: str) -> str:
    """The file as text; bytes that are not UTF-8 are a DataError naming the line (a UTF-8
    byte-order mark is accepted)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                        f"{col}); re-save the file as UTF-8") from None


def _element_lines(text: str) -> list[int]:
    """The line on which each element of a top-level JSON array starts (``text`` is known to
    be a valid JSON array), so record errors in a .json file can name a line."""
    dec, ws = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    i = ws.match(text, text.index("[") + 1).end()
    lines, line, counted = [], 1, 0
    while text[i] != "]":
        line += text.count("\n", counted, i)
        counted = i
        lines.append(line)
        _, i = dec.raw_decode(text, i)
        i = ws.match(text, i).end()
        if text[i] == ",":
            i = ws.match(text, i + 1).end()
    return lines


def load_alpaca(path: str) -> list[dict]:
    """Reads an Alpaca-style dataset: a JSON list of records, or JSONL (one record a line,
    blank lines skipped). Raises :class:`DataError` naming the file and line on any problem."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such data file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a .json or .jsonl file")
    text = _read_text(path)
    records: list[dict] = []
    jsonl = path.endswith(".jsonl")
    if not jsonl:
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # several top-level values: it is JSONL after all
                raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            jsonl = True
        else:
            top_list = isinstance(data, list)
            if isinstance(data, dict):
                data = [data]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            lines = _element_lines(text) if top_list and data else [1]
            records = [_check_record(r, f"{path}:{ln}: record {i}")
                       for i, (r, ln) in enumerate(zip(data, lines))]
    if jsonl:
        # split on "\n" only: str.splitlines also breaks at U+2028/U+0085, which JSON strings
        # may hold raw, and would then misnumber the lines
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            records.append(_check_record(rec, f"{path}:{lineno}"))
    if not records:
        raise DataError(f"{path}: the dataset is empty (no records)")
    return records


# ------------------------------------------------------------------------------- tokenisation

def encode_example(tokenizer, ex: dict, template: str, max_length: int) -> dict | None:
    """``input_ids`` = prompt (with the tokenizer's special prefix) + output + EOS;
    ``labels`` = the same with the prompt replaced by -100, so only the response is learned.
    Truncated to ``max_length``; None when no response token survives the truncation."""
    if template == "chat":
        return encode_chat(tokenizer, ex, max_length)
    ex = as_alpaca(ex, template)
    prompt_ids = tokenizer(format_prompt(ex, template), add_special_tokens=True)["input_ids"]
    resp_ids = tokenizer(ex["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        resp_ids = resp_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + resp_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + resp_ids)[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return {"input_ids": ids, "labels": labels, "prompt_len": len(prompt_ids)}


def encode_dataset(tokenizer, records: Iterable[dict], template: str, max_length: int,
                   what: str = "dataset", stats: dict | None = None) -> list[dict]:
    """The encoded examples; ``stats`` (when given) gets how many were ``truncated`` to
    ``max_length`` and how many ``dropped`` (no response token left)."""
    out, truncated, dropped = [], 0, 0
    for r in records:
        e = encode_example(tokenizer, r, template, max_length)
        if e is None:
            dropped += 1
            continue
        truncated += len(e["input_ids"]) == max_length and _longer_than(tokenizer, r, template,
                                                                        max_length)
        out.append(e)
    if stats is not None:
        stats.update(examples=len(out) + dropped, truncated=truncated, dropped=dropped)
    if not out:
        raise DataError(f"{what}: no example has a response token within --max-length {max_length}")
    return out


def _longer_than(tokenizer, ex: dict, template: str, max_length: int) -> bool:
    """Whether the untruncated example has more than ``max_length`` tokens (asked only for
    examples exactly ``max_length`` long, so the common case tokenises once)."""
    return len(encode_example(tokenizer, ex, template, 1 << 30)["input_ids"]) > max_length


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[dict], pad: int) -> Batch:
    """Right-padded batch (padding is masked in attention and ignored in the loss)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return Batch(ids, mask, labels)


class BatchStream:
    """Endless shuffled mini-batches (reshuffled each epoch from a seeded generator). The
    position (epoch, index) is part of :meth:`state_dict` so a resumed run sees the same data."""

    def __init__(self, examples: list[dict], batch_size: int, pad: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.examples, self.batch_size, self.pad, self.seed = examples, batch_size, pad, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next(self) -> Batch:
        # each rank takes its own slice of a global batch of batch_size * world_size
        need = self.batch_size * self.world_size
        picked: list[int] = []
        while len(picked) < need:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm()
            take = self._order[self.index:self.index + need - len(picked)]
            picked += take
            self.index += len(take)
        mine = picked[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return collate([self.examples[i] for i in mine], self.pad)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.index = sd["epoch"], sd["index"]
        self._order = self._perm()


# ----------------------------------------------------------------------- chat conversations

ROLES = ("system", "user", "assistant")


def check_conversation(rec: dict, where: str) -> dict:
    """A conversational record (``{"messages": [{"role", "content"}, ...]}``, the TRL /
    Axolotl form), checked: roles in :data:`ROLES`, string contents, at least one assistant
    turn. Raises :class:`DataError` naming ``where`` and the message index."""
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', "
                            f"got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: message {i} has no {key!r}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} ({m['role']}): 'content' must be a string, "
                            f"got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn (nothing to learn from)")
    return {"messages": out, "task": rec.get("task", "file")}


def to_messages(ex: dict) -> list[dict]:
    """The conversation of a record: its messages, or for an Alpaca record one user turn
    (instruction, then the input after a blank line) and one assistant turn."""
    if "messages" in ex:
        return ex["messages"]
    user = ex["instruction"] + (f"\n\n{ex['input']}" if ex.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": ex["output"]}]


def as_alpaca(ex: dict, template: str) -> dict:
    """A record for the Alpaca-style templates: conversational records qualify only as one
    user turn and one assistant turn (a system turn or more turns have no place there)."""
    if "messages" not in ex:
        return ex
    roles = [m["role"] for m in ex["messages"]]
    if roles != ["user", "assistant"]:
        raise DataError(f"--template {template} takes single-turn conversations (user, then "
                        f"assistant); got roles {roles}: use --template chat")
    return {"instruction": ex["messages"][0]["content"], "input": "",
            "output": ex["messages"][1]["content"], "task": ex.get("task", "file")}


def reference_answer(ex: dict) -> str:
    """What exact match compares a generation with: the output, or the last assistant turn."""
    if "messages" in ex:
        return [m for m in ex["messages"] if m["role"] == "assistant"][-1]["content"]
    return ex["output"]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _require_chat_template(tokenizer) -> None:
    if not has_chat_template(tokenizer):
        raise DataError("--template chat: this tokenizer has no chat template; use "
                        "--template alpaca or compact")


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _assistant_tokens(tokenizer, text: str, content: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of one rendered assistant turn: the content and the template's
    end-of-turn token are learned; what the template puts after that token (ChatML: a
    newline) is masked, so the model learns to stop exactly at the end of turn."""
    start = text.find(content)
    if start < 0:  # the template rewrote the content (e.g. stripped it): learn the whole turn
        start, content = 0, text
    cut = start + len(content)
    ids = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    tail = tokenizer(text[cut:], add_special_tokens=False)["input_ids"] if text[cut:] else []
    special = set(tokenizer.all_special_ids)
    eot_at = next((i for i, t in enumerate(tail) if t in special), None)
    if eot_at is None:  # the template closes the turn with no special token: add EOS
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return ids + tail + eos, ids + tail + eos
    keep = tail[:eot_at + 1]
    return ids + tail, ids + keep + [IGNORE_INDEX] * (len(tail) - len(keep))


def encode_chat(tokenizer, ex: dict, max_length: int) -> dict | None:
    """A conversation through the tokenizer's chat template, with labels on the assistant
    turns only. Each turn is the difference between the rendering up to it and the rendering
    up to the previous turn (with the generation prompt before an assistant turn), so the
    tokens are exactly the template's, whatever it adds between turns."""
    _require_chat_template(tokenizer)
    msgs = to_messages(ex)
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(msgs):
        assistant = m["role"] == "assistant"
        if assistant:  # the header of the turn (generation prompt) belongs to the prompt
            head = _render(tokenizer, msgs[:i], True)
            ids_h = _segment(tokenizer, head, done)
            ids, labels, done = ids + ids_h, labels + [IGNORE_INDEX] * len(ids_h), head
        upto = _render(tokenizer, msgs[:i + 1], False)
        if assistant:
            seg_ids, seg_labels = _assistant_tokens(tokenizer, _suffix(upto, done), m["content"])
        else:
            seg_ids = _segment(tokenizer, upto, done)
            seg_labels = [IGNORE_INDEX] * len(seg_ids)
        ids, labels, done = ids + seg_ids, labels + seg_labels, upto
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None
    prompt_len = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "prompt_len": prompt_len}


def _suffix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise DataError("--template chat: the tokenizer's chat template does not render a "
                        "conversation as an extension of its shorter prefixes, so the assistant "
                        "turns cannot be located; use --template alpaca")
    return text[len(prefix):]


def _segment(tokenizer, text: str, prefix: str) -> list[int]:
    seg = _suffix(text, prefix)
    return tokenizer(seg, add_special_tokens=False)["input_ids"] if seg else []


def prompt_ids(tokenizer, ex: dict, template: str) -> list[int]:
    """The token ids a model is given to generate the answer of ``ex``: the formatted prompt,
    or with ``chat`` the conversation before the last assistant turn plus the template's
    generation prompt."""
    if template == "chat":
        _require_chat_template(tokenizer)
        msgs = to_messages(ex)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        text = _render(tokenizer, msgs[:last], True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(format_prompt(as_alpaca(ex, template), template),
                     add_special_tokens=True)["input_ids"]
