"""llmopt-finetune does not lose, silently overwrite or mis-resume a run, and never runs code
from a checkpoint: pickle-free checkpoints, atomic writes, SIGINT/SIGTERM saving, --overwrite,
--resume option checks, data/model errors that name the file and line, --max-length counts,
--ddp-timeout on a stalled rank."""
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

if importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("peft and transformers are needed", allow_module_level=True)

from llmopt_ext.finetune import checkpoint as C  # noqa: E402
from llmopt_ext.finetune import data as D  # noqa: E402
from llmopt_ext.finetune.cli import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--train-size", "64", "--eval-size", "8", "--em-samples", "4", "--max-new-tokens", "4",
        "--batch-size", "4", "--threads", "1", "--no-progress"]
CK = "state.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out, *argv):
    return main([*TINY, "--output-dir", str(out), *argv])


def _results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _adapter(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A 3-step AdamW run that checkpointed at step 2."""
    out = tmp_path_factory.mktemp("ck") / "run"
    assert _run(out, "--max-steps", "3", "--save-every", "2", "--no-eval") == 0
    return out


# ------------------------------------------------------------------------------ security

class _Payload:
    """Unpickling this calls os.system, which creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["state.pt", CK])
def test_malicious_pickle_checkpoint_is_never_run(tmp_path, capsys, name):
    import pickle
    marker = tmp_path / "PWNED"
    ck = tmp_path / "evil"
    ck.mkdir()
    payload = {"step": 1, "x": _Payload(marker)}
    if name == CK:
        (ck / name).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, ck / name)  # what the pickle-format checkpoints were
    rc = _run(tmp_path / "out", "--max-steps", "1", "--no-eval", "--resume", str(ck))
    err = capsys.readouterr().err
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert rc == 2 and "llmopt-finetune: error: --resume" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "header_only"])
def test_damaged_checkpoint_is_one_clear_error(tmp_path, capsys, checkpointed, damage):
    good = (checkpointed / "checkpoint" / CK).read_bytes()
    ck = tmp_path / "ck"
    ck.mkdir()
    bad = {"empty": b"", "truncated": good[:len(good) // 2],
           "random": os.urandom(4096), "header_only": good[:8]}[damage]
    (ck / CK).write_bytes(bad)
    rc = _run(tmp_path / "out", "--max-steps", "3", "--no-eval", "--resume", str(ck))
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and str(ck / CK) in lines[0] and "not a readable" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_checkpoint_encoding_keeps_types_and_layout():
    t = torch.arange(6.0).reshape(2, 3).t()  # transposed strides
    state = {"step": 3, "params": {"a.weight": t}, "optimizer": {
        "state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones(3)}, 1: {}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "amsgrad": False,
                          "foreach": None, "name": "x"}]},
        "stream": {"epoch": 1, "index": 8}, "history": [(1, 2.5), (2, float("nan"))],
        "rng": {"python": (3, (1, 2, 3), None), "torch": torch.get_rng_state()}}
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, CK)
        with open(f, "wb") as fh:
            fh.write(C.encode_state(state))
        back = C.decode_state(f)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys stay int
    assert back["rng"]["python"] == state["rng"]["python"]  # tuples stay tuples
    assert back["history"][0] == (1, 2.5) and math.isnan(back["history"][1][1])
    assert torch.equal(back["params"]["a.weight"], t)
    assert back["params"]["a.weight"].stride() == t.stride()
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    with pytest.raises(TypeError, match="object"):
        C.encode_state({"x": object()})


UNSAFE = [r"weights_only\s*=\s*False", r"\bpickle\.loads?\(", r"(?<![\w.])(?<!def )eval\(",
          r"(?<![\w.])exec\(", r"trust_remote_code\s*=\s*True", r"\bmarshal\.loads?\(",
          r"\bdill\.", r"\bcloudpickle\."]


def test_package_source_has_no_unsafe_deserialisation():
    """No code path in the package unpickles or evaluates data (nothing is allow-listed)."""
    found = []
    pkg = os.path.join(ROOT, "llmopt_ext")
    for dirpath, _, files in os.walk(pkg):
        for fn in files:
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        code = line.split("#", 1)[0]
                        found += [f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}"
                                  for p in UNSAFE if re.search(p, code)]
                        if "torch.load(" in code and "weights_only=True" not in code:
                            found.append(f"{os.path.relpath(path, ROOT)}:{i}: torch.load without "
                                         "weights_only=True")
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------- atomic writes

def _tiny_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    exs = [{"input_ids": [1, 2], "labels": [1, 2]}] * 4
    return model, opt, D.BatchStream(exs, 2, 0, seed=0)


def test_checkpoint_write_failure_leaves_the_old_checkpoint_and_no_temporaries(tmp_path, monkeypatch):
    model, opt, stream = _tiny_state()
    C.save_checkpoint(str(tmp_path), model, opt, None, stream, 1, [(1, 0.5)])
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        C.save_checkpoint(str(tmp_path), model, opt, None, stream, 2, [(1, 0.5), (2, 0.4)])
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


def test_checkpoint_write_is_fsynced_file_and_directory(tmp_path, monkeypatch):
    model, opt, stream = _tiny_state()
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    C.save_checkpoint(str(tmp_path), model, opt, None, stream, 1, [])
    assert str(tmp_path.resolve()) in synced  # the rename made durable
    assert any(os.path.basename(p).endswith(".tmp") for p in synced)  # the data before the rename
    assert os.listdir(tmp_path) == [CK]


# ------------------------------------------------------------------------ interruption

def _start(out, *argv):
    cmd = [sys.executable, "-m", "llmopt_ext.finetune",
           *[a for a in TINY if a != "--no-progress"], "--output-dir", str(out), *argv]
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    buf = {"err": b"", "out": b""}

    def pump(stream, key):
        for chunk in iter(lambda: stream.read1(4096), b""):
            buf[key] += chunk
    for s, k in ((p.stderr, "err"), (p.stdout, "out")):
        threading.Thread(target=pump, args=(s, k), daemon=True).start()
    return p, buf


def _wait_for_steps(p, buf, n, total, timeout=300):
    """Waits until the progress bar shows at least ``n`` finished steps."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        bar = rb"finetune [\w-]+:[^\r\n]*?\|\s*(\d+)/%d\b" % total  # not "Loading weights"
        done = [int(m) for m in re.findall(bar, buf["err"])]
        if done and max(done) >= n:
            return
        assert p.poll() is None, buf["err"].decode(errors="replace")[-3000:]
        time.sleep(0.05)
    p.kill()
    raise AssertionError("no training progress:\n" + buf["err"].decode(errors="replace")[-3000:])


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_resumable_run(tmp_path, sig, code):
    """A signal mid-run: adapter, checkpoint and results.json (interrupted) are saved, exit code
    128 + signal; --resume continues from there and gives the adapter of an uninterrupted run."""
    out, total = tmp_path / "run", 100000
    common = ["--no-eval", "--lr-schedule", "constant"]
    p, buf = _start(out, "--max-steps", str(total), *common)
    _wait_for_steps(p, buf, 2, total)
    p.send_signal(sig)
    rc = p.wait(timeout=120)
    assert rc == code, buf["err"].decode(errors="replace")[-3000:]
    r = _results(out)
    k = r["train"]["end_step"]
    assert r["interrupted"] == sig.name and r["train"]["interrupted"] == sig.name
    assert k >= 2 and r["train"]["steps"] == k and len(r["train"]["history"]) == k
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert C.decode_state(str(out / "checkpoint" / CK))["step"] == k
    if sig != signal.SIGINT:
        return
    assert _run(out, "--max-steps", str(k + 2), *common, "--resume", str(out / "checkpoint")) == 0
    r = _results(out)
    assert "interrupted" not in r and r["train"]["start_step"] == k and r["train"]["steps"] == 2
    assert _run(tmp_path / "straight", "--max-steps", str(k + 2), *common) == 0
    a, b = _adapter(out), _adapter(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_signal_during_the_final_evaluation_saves(tmp_path, monkeypatch):
    """SIGINT while the evaluation after training runs (which a real model spends minutes on):
    the trained adapter and a checkpoint at the last step are saved, exit code 130. In-process:
    the signal is sent as that evaluation starts, so the timing is exact."""
    from llmopt_ext.finetune import train as T
    real = T._evaluate
    # the handler this process started with (SIG_IGN when started as a background job)
    handler_before = signal.getsignal(signal.SIGINT)

    def evaluate(r, when):
        if when == "after":
            os.kill(os.getpid(), signal.SIGINT)
        return real(r, when)
    monkeypatch.setattr(T, "_evaluate", evaluate)
    out = tmp_path / "run"
    assert _run(out, "--max-steps", "3") == 130
    r = _results(out)
    assert r["interrupted"] == "SIGINT" and "after" not in r and "before" in r
    assert r["train"]["steps"] == 3
    assert C.decode_state(str(out / "checkpoint" / CK))["step"] == 3
    monkeypatch.setattr(T, "_evaluate", real)
    assert _run(out, "--max-steps", "3", "--resume", str(out / "checkpoint")) == 0
    r = _results(out)
    assert r["train"]["steps"] == 0 and "after" in r and "interrupted" not in r
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored


# -------------------------------------------------------------------- output dir / resume

def test_output_dir_with_a_previous_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--max-steps", "2", "--save-every", "1", "--no-eval") == 0
    stamp = {f: os.stat(out / f).st_mtime_ns for f in ("results.json", "adapter", "checkpoint")}
    capsys.readouterr()
    assert _run(out, "--max-steps", "2", "--no-eval") == 2
    err = capsys.readouterr().err
    assert f"--output-dir {out} holds a previous run" in err and "--overwrite" in err
    assert {f: os.stat(out / f).st_mtime_ns for f in stamp} == stamp  # nothing touched
    # resuming from the directory's own checkpoint is allowed, and so is --overwrite
    assert _run(out, "--max-steps", "3", "--no-eval", "--resume", str(out / "checkpoint")) == 0
    assert _results(out)["train"]["start_step"] == 1
    assert _run(out, "--max-steps", "1", "--no-eval", "--overwrite") == 0
    assert _results(out)["train"]["steps"] == 1


@pytest.mark.parametrize("argv, expect", [
    (["--lr", "0.001"], ["--lr: checkpoint 0.002, this command 0.001"]),
    (["--lora-r", "4", "--batch-size", "2"], ["--lora-r: checkpoint 8, this command 4",
                                              "--batch-size: checkpoint 4, this command 2"]),
    (["--optimizer", "sophiag"], ["--optimizer: checkpoint 'adamw', this command 'sophiag'"]),
    (["--seed", "1"], ["--seed: checkpoint 0, this command 1"]),
    (["--precision", "bf16"], ["--precision: checkpoint 'fp32', this command 'bf16'"]),
    (["--lora-dropout", "0.1"], ["--lora-dropout"]),
    (["--target-modules", "q_proj"], ["--target-modules"]),
    (["--lora-alpha", "8"], ["--lora-alpha: checkpoint 16.0, this command 8.0"]),
    (["--template", "alpaca"], ["--template: checkpoint 'compact', this command 'alpaca'"]),
])
def test_resume_refuses_other_options_naming_them(tmp_path, capsys, checkpointed, argv, expect):
    rc = _run(tmp_path / "out", "--max-steps", "3", "--no-eval", *argv,
              "--resume", str(checkpointed / "checkpoint"))
    err = capsys.readouterr().err
    assert rc == 2, err
    for e in expect:
        assert e in err, err
    assert not (tmp_path / "out").exists()


def test_resume_allows_the_documented_options_to_change(tmp_path, checkpointed):
    from llmopt_ext.finetune.cli import build_parser
    assert "--max-steps" in build_parser().format_help() and "--resume" in build_parser().format_help()
    rc = _run(tmp_path / "out", "--max-steps", "4", "--save-every", "3", "--threads", "1",
              "--em-samples", "2", "--ddp-timeout", "30", "--device", "cpu",
              "--resume", str(checkpointed / "checkpoint"))
    assert rc == 0
    assert _results(tmp_path / "out")["train"]["steps"] == 2


def test_resume_past_max_steps(tmp_path, capsys, checkpointed):
    rc = _run(tmp_path / "a", "--max-steps", "1", "--no-eval", "--resume", str(checkpointed / "checkpoint"))
    assert rc == 2
    assert "the checkpoint is at step 2, past --max-steps 1" in capsys.readouterr().err
    assert _run(tmp_path / "b", "--max-steps", "2", "--no-eval",
                "--resume", str(checkpointed / "checkpoint")) == 0
    assert _results(tmp_path / "b")["train"]["steps"] == 0


# ---------------------------------------------------------------------------- data errors

@pytest.mark.parametrize("content, match", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
     r"d\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 21\)"),
    (b'{"instruction": "a", "output": null}\n', r"d\.jsonl:1: 'output' is null"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": null, "output": "b"}\n',
     r"d\.jsonl:2: 'instruction' is null"),
])
def test_data_errors_name_file_and_line(tmp_path, capsys, content, match):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(D.DataError, match=match):
        D.load_alpaca(str(p))
    assert _run(tmp_path / "out", "--data", str(p), "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert re.search("llmopt-finetune: error: .*" + match, err) and "Traceback" not in err


def test_json_list_record_errors_name_the_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "a",\n'
                 '   "output": null}\n]')
    with pytest.raises(D.DataError, match=r"d\.json:4: record 1: 'output' is null"):
        D.load_alpaca(str(p))


def test_jsonl_with_unicode_line_separator_in_a_string(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a\u2028b", "output": "c"}\n{"instruction": "x", "output": "y"}\n',
                 encoding="utf-8")
    assert [r["instruction"] for r in D.load_alpaca(str(p))] == ["a\u2028b", "x"]


def _model_copy(tmp_path, skip=()):
    import shutil
    from llmopt_ext.finetune.pretrain import BASE_DIR
    d = tmp_path / "model"
    d.mkdir()
    for f in os.listdir(BASE_DIR):
        if f not in skip:
            shutil.copy(os.path.join(BASE_DIR, f), d / f)
    return d


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupted_model_weights_are_a_usage_error(tmp_path, capsys, damage):
    d = _model_copy(tmp_path)
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:len(data) // 3] if damage == "truncated" else b"\x08" + bytes(7) + b"{}junk")
    assert _run(tmp_path / "out", "--model", str(d), "--template", "compact", "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert f"llmopt-finetune: error: --model {d}: the model could not be loaded" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_model_without_tokenizer_is_a_usage_error(tmp_path, capsys):
    d = _model_copy(tmp_path, skip=("tokenizer.json", "tokenizer_config.json"))
    assert _run(tmp_path / "out", "--model", str(d), "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert f"llmopt-finetune: error: --model {d}: no tokenizer there" in err


def test_max_length_truncations_and_drops_are_counted(tmp_path, capsys):
    from transformers import AutoTokenizer
    from llmopt_ext.finetune.pretrain import BASE_DIR
    tok = AutoTokenizer.from_pretrained(BASE_DIR)
    n = 80  # these prompts are 65-86 tokens, the examples 74-97: 11 dropped, 20 truncated
    recs = D.generate_dataset(64, seed=0)
    full = [D.encode_example(tok, r, "compact", 1 << 30) for r in recs]
    dropped = sum(f["prompt_len"] >= n for f in full)
    truncated = sum(len(f["input_ids"]) > n and f["prompt_len"] < n for f in full)
    assert dropped > 0 and truncated > 0
    stats = {}
    D.encode_dataset(tok, recs, "compact", n, stats=stats)
    assert stats == {"examples": 64, "truncated": truncated, "dropped": dropped}
    assert _run(tmp_path / "out", "--max-length", str(n), "--max-steps", "1", "--no-eval") == 0
    assert _results(tmp_path / "out")["data"]["train"] == stats
    assert f"{truncated} train examples truncated, {dropped} dropped" in capsys.readouterr().out


# -------------------------------------------------------------------------------- DDP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(out, *argv):
    """Two gloo ranks of the CLI, started as torchrun would (env://); rank 0's output pumped."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "llmopt_ext.finetune",
               *[a for a in TINY if a != "--no-progress"], "--device", "cpu", "--no-eval",
               "--output-dir", str(out), *argv]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    buf = {"err": b"", "out": b""}

    def pump(stream, key):
        for chunk in iter(lambda: stream.read1(4096), b""):
            buf[key] += chunk
    threading.Thread(target=pump, args=(procs[0].stderr, "err"), daemon=True).start()
    threading.Thread(target=pump, args=(procs[0].stdout, "out"), daemon=True).start()
    threading.Thread(target=procs[1].communicate, daemon=True).start()  # drain rank 1
    return procs, buf


def _reap(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait()


def test_stalled_rank_ends_the_job_after_ddp_timeout(tmp_path):
    """Two gloo ranks; rank 1 is SIGSTOPped mid-run: rank 0 fails within --ddp-timeout (10 s)
    plus a margin with an error naming itself and the timeout, instead of gloo's 30 minutes."""
    timeout = 10
    procs, buf = _start_ranks(tmp_path / "ddp", "--max-steps", "100000",
                              "--ddp-timeout", str(timeout))
    try:
        _wait_for_steps(procs[0], buf, 2, 100000)
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        rc = procs[0].wait(timeout=timeout + 40)
        took = time.time() - t0
    finally:
        _reap(procs)
    err = buf["err"].decode(errors="replace")
    assert rc != 0 and took < timeout + 30, (rc, took, err[-3000:])
    assert "rank 0 of 2" in err and "--ddp-timeout 10 s" in err, err[-3000:]


def test_sigint_under_ddp_stops_every_rank_at_one_step(tmp_path):
    """Ctrl-C reaches every rank (a terminal signals the process group), at different steps:
    the ranks agree on one step, rank 0 saves the checkpoint at that step, both exit 130."""
    out = tmp_path / "ddp"
    procs, buf = _start_ranks(out, "--max-steps", "100000", "--lr-schedule", "constant")
    try:
        _wait_for_steps(procs[0], buf, 2, 100000)
        procs[0].send_signal(signal.SIGINT)
        time.sleep(0.3)
        procs[1].send_signal(signal.SIGINT)
        rcs = [p.wait(timeout=120) for p in procs]
    finally:
        _reap(procs)
    assert rcs == [130, 130], buf["err"].decode(errors="replace")[-3000:]
    r = _results(out)
    assert r["interrupted"] == "SIGINT" and r["train"]["max_rank_param_diff"] == 0.0
    assert C.decode_state(str(out / "checkpoint" / CK))["step"] == r["train"]["end_step"]
