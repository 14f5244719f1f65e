"""The contract every non-LoRA list op keeps on every path: the reference, the CPU C++ kernel,
the dispatcher called directly (``torch.ops.llmopt_ext.<op>``, whose Meta kernel is the
op's fake) and FakeTensorMode. The same bad input gives the same kind of error naming the
argument on each, and nothing is written. Also: the dispatcher has a kernel for exactly the
dispatch keys ``llmopt_ext.backend`` claims, and a forced backend that cannot run raises."""
from __future__ import annotations

import functools
import re

import pytest
import torch

from llmopt_ext import _extension, backend, ops

from conftest import kernels_loaded

needs_c = pytest.mark.skipif(not kernels_loaded(), reason="needs _C")

SOPHIA = dict(lr=0.1, beta1=0.9, rho=0.05, weight_decay=0.01, eps=1e-12)
ADAHESSIAN = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-4, hessian_power=1.0)

# op -> (number of list arguments, indices of the written lists, number of scalar tensors)
LIST_OPS = {
    "mt_dot": (2, (), 0),
    "mt_norm_sq": (1, (), 0),
    "mt_axpby_": (2, (0,), 2),
    "mt_cg_step_": (4, (0, 1), 1),
    "mt_cg_direction_": (2, (0,), 1),
    "sophia_update_": (4, (0, 2), 0),
    "adahessian_update_": (5, (0, 2, 3), 1),
}
LIST_NAMES = {
    "mt_dot": ("xs", "ys"), "mt_norm_sq": ("xs",), "mt_axpby_": ("ys", "xs"),
    "mt_cg_step_": ("xs", "rs", "ps", "hps"), "mt_cg_direction_": ("ps", "rs"),
    "sophia_update_": ("params", "grads", "exp_avgs", "hessians"),
    "adahessian_update_": ("params", "grads", "exp_avgs", "exp_hessian_diag_sqs", "hessians"),
}
SCALAR_NAMES = {"mt_axpby_": ("a", "b"), "mt_cg_step_": ("alpha",), "mt_cg_direction_": ("beta",),
                "adahessian_update_": ("step",)}

# "dispatcher": torch.ops.llmopt_ext.<op>.default called directly (a meta tensor sends it to
# the Meta kernel, the fake); "cpu-kernel": redispatched to the CPU key, i.e. the C++ glue
PATHS = ["reference", pytest.param("cpu", marks=needs_c), pytest.param("dispatcher", marks=needs_c),
         pytest.param("cpu-kernel", marks=needs_c)]
BACKENDS = ["reference", pytest.param("cpu", marks=needs_c)]


def make_args(op, device="cpu", shapes=((3,), (2, 5))):
    n_lists, _, n_scalars = LIST_OPS[op]
    gen = torch.Generator().manual_seed(0)
    lists = [[(torch.rand(s, generator=gen) + 0.5).to(device) for s in shapes] for _ in range(n_lists)]
    scalars = [torch.tensor(2.0 if op == "adahessian_update_" else 0.5)] * n_scalars
    return lists, scalars


def call(path, op, lists, scalars, **extra):
    if path in ("dispatcher", "cpu-kernel"):
        f = getattr(torch.ops.llmopt_ext, op).default
        if path == "cpu-kernel":
            f = functools.partial(f.redispatch, torch._C.DispatchKeySet(torch._C.DispatchKey.CPU))
        if op == "sophia_update_":
            return f(*lists, *SOPHIA.values(), False, extra.get("grad_scale"))
        if op == "adahessian_update_":
            return f(*lists, *scalars, *ADAHESSIAN.values(), extra.get("grad_scale"))
        return f(*lists, *scalars)
    fn = getattr(ops, op)
    with backend.use(path):
        if op == "sophia_update_":
            return fn(*lists, **SOPHIA, **extra)
        if op == "adahessian_update_":
            return fn(*lists, step=scalars[0], **ADAHESSIAN, **extra)
        return fn(*lists, *scalars)


def snapshot(lists):
    return [[t.clone() if t.device.type != "meta" else None for t in lst] for lst in lists]


def assert_unchanged(lists, before):
    for lst, old in zip(lists, before):
        for t, o in zip(lst, old):
            if o is not None:
                assert torch.equal(t, o), "a rejected call wrote into its arguments"


def raises(exc, words):
    return pytest.raises(exc, match=re.escape(words))


# ---------------------------------------------------------------------------
# one device: a meta tensor among CPU tensors (before: the dispatcher sent the call to the
# unchecking fake; mt_dot returned uninitialised memory and mt_axpby_ wrote nothing)

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", list(LIST_OPS))
def test_meta_tensor_in_a_cpu_list_raises(path, op):
    for which in range(LIST_OPS[op][0]):
        lists, scalars = make_args(op)
        lists[which][1] = torch.empty_like(lists[which][1], device="meta")
        before = snapshot(lists)
        with pytest.raises(ValueError, match=rf"^{op}: \w+\[[01]\] is on (meta|cpu) but \w+\[[01]\] is on "
                           r"(cpu|meta)$") as info:
            call(path, op, lists, scalars)
        assert f"{LIST_NAMES[op][which]}[1] is on meta" in str(info.value) or (
            which == 0 and "params[1] is on meta" in str(info.value))
        assert_unchanged(lists, before)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", [op for op in LIST_OPS if op in SCALAR_NAMES] + ["sophia_update_"])
def test_meta_scalar_with_cpu_lists_raises(path, op):
    lists, scalars = make_args(op)
    extra = {}
    if op == "sophia_update_":
        extra["grad_scale"] = torch.tensor(1.0, device="meta")
        name = "grad_scale"
    else:
        scalars[-1] = torch.tensor(1.0, device="meta")
        name = SCALAR_NAMES[op][-1]
    before = snapshot(lists)
    with raises(ValueError, f"{op}: {name} is on meta but the tensor lists are on cpu"):
        call(path, op, lists, scalars, **extra)
    assert_unchanged(lists, before)


@needs_c
@pytest.mark.parametrize("op", list(LIST_OPS))
def test_fake_checks_shapes_and_dtypes(op):
    """The fakes (Meta kernels, also used by FakeTensorMode) check what the kernels check."""
    lists, scalars = make_args(op, device="meta")
    out = call("dispatcher", op, lists, scalars)
    if op in ("mt_dot", "mt_norm_sq"):
        assert out.device.type == "meta" and out.shape == () and out.dtype == torch.float32
    if op == "mt_cg_step_":
        assert out.device.type == "meta" and out.shape == (3,) and out.dtype == torch.float32
    last = LIST_NAMES[op][-1]
    if LIST_OPS[op][0] > 1:  # shapes are compared with the first list
        bad_shape, _ = make_args(op, device="meta")
        bad_shape[-1][0] = torch.empty(4, device="meta")
        with pytest.raises(ValueError, match=rf"{last}\[0\] has shape \(4,\)"):
            call("dispatcher", op, bad_shape, scalars)
    if op not in ("sophia_update_", "adahessian_update_"):  # their last list is float32 state
        bad_dtype, _ = make_args(op, device="meta")
        bad_dtype[-1][1] = bad_dtype[-1][1].to(torch.bfloat16)
        with pytest.raises(TypeError, match=rf"{last}\[1\] has dtype torch.bfloat16"):
            call("dispatcher", op, bad_dtype, scalars)
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    with FakeTensorMode():
        lists, scalars = make_args(op)
        lists[-1][1] = torch.empty(7, dtype=torch.float16)
        with pytest.raises((ValueError, TypeError), match=rf"{last}\[1\] has (shape \(7,\)|dtype torch.float16)"):
            call("dispatcher", op, lists, scalars)


@needs_c
def test_fake_checks_stiefel_ops():
    x = torch.empty(3, 5, device="meta")
    with raises(ValueError, "orthonormalize: X must be tall"):
        torch.ops.llmopt_ext.orthonormalize(x)
    assert torch.ops.llmopt_ext.orthonormalize(x.t()).shape == (5, 3)
    with raises(TypeError, "philox_normal_: out has dtype torch.float64"):
        torch.ops.llmopt_ext.philox_normal_(torch.empty(4, dtype=torch.float64, device="meta"), 1, 0)


@needs_c
@pytest.mark.parametrize("op", ["lora_merge_", "lora_unmerge_"])
def test_lora_merge_fake_rejects_a_meta_adapter(op):
    weight = torch.randn(4, 3)
    before = weight.clone()
    lora_A, lora_B = torch.randn(2, 3, device="meta"), torch.randn(4, 2)
    with raises(ValueError, f"{op}: lora_A is on meta but weight is on cpu"):
        getattr(torch.ops.llmopt_ext, op)(weight, lora_A, lora_B, torch.tensor(0.5))
    assert torch.equal(weight, before)


# ---------------------------------------------------------------------------
# backends agree: the same clear error, nothing written

@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("op", [op for op, (_, written, _) in LIST_OPS.items() if written])
def test_written_tensor_requiring_grad(b, op):
    _, written, _ = LIST_OPS[op]
    for w in written:
        lists, scalars = make_args(op)
        lists[w][0].requires_grad_(True)  # a leaf
        before = snapshot(lists)
        with raises(RuntimeError, f"{op}: {LIST_NAMES[op][w]}[0] requires grad"):
            call(b, op, lists, scalars)
        assert_unchanged(lists, before)
    # under no_grad (how optimizers call them) the write is allowed, and backends agree
    results = []
    for path in ("reference", b):
        lists, scalars = make_args(op)
        for w in written:
            lists[w][0].requires_grad_(True)
        with torch.no_grad():
            call(path, op, lists, scalars)
        results.append(lists)
    for got, want in zip(*results):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("step", [float("nan"), torch.tensor(float("nan")), 0.5, torch.tensor(0.0)])
def test_adahessian_bad_step(b, step):
    lists, _ = make_args("adahessian_update_")
    before = snapshot(lists)
    with pytest.raises(ValueError, match=r"adahessian_update_: step = (nan|0\.5|0); expected >= 1"):
        call(b, "adahessian_update_", lists, [step])
    assert_unchanged(lists, before)


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("op", [op for op in LIST_OPS if op in SCALAR_NAMES])
@pytest.mark.parametrize("kind", ["float64 tensor", "python float", "negative"])
def test_scalar_overflowing_float32(b, op, kind):
    lists, scalars = make_args(op)
    value = -1e300 if kind == "negative" else 1e300
    scalars[0] = torch.tensor(value, dtype=torch.float64) if kind != "python float" else value
    before = snapshot(lists)
    with raises(ValueError, f"{op}: {SCALAR_NAMES[op][0]} = {value:g} overflows torch.float32"):
        call(b, op, lists, scalars)
    assert_unchanged(lists, before)


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("op", ["sophia_update_", "adahessian_update_"])
def test_hyper_parameter_overflowing_float32(b, op):
    lists, scalars = make_args(op)
    before = snapshot(lists)
    fn = getattr(ops, op)
    hyper = dict(SOPHIA if op == "sophia_update_" else ADAHESSIAN, lr=1e300)
    step = {"step": 2.0} if op == "adahessian_update_" else {}
    with backend.use(b), raises(ValueError, f"{op}: lr = 1e+300 overflows torch.float32"):
        fn(*lists, **hyper, **step)
    assert_unchanged(lists, before)


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("op", list(LIST_OPS))
def test_none_inside_a_list(b, op):
    for which in range(LIST_OPS[op][0]):
        lists, scalars = make_args(op)
        lists[which][1] = None
        before = snapshot([[t for t in lst if t is not None] for lst in lists])
        with raises(TypeError, f"{op}: {LIST_NAMES[op][which]}[1] is a NoneType, not a tensor"):
            call(b, op, lists, scalars)
        assert_unchanged([[t for t in lst if t is not None] for lst in lists], before)


# ---------------------------------------------------------------------------
# aliasing in in-place ops: rejected where the result would depend on the backend

def _alias_cases():
    def same_noncontiguous_twice():  # before: the CPU kernel's copy-back made ys[0] differ
        nc = torch.randn(4, 6)[:, ::2]
        return "mt_axpby_", [[nc, nc], [torch.randn(4, 3), torch.randn(4, 3)]], "ys[0] and ys[1]"

    def hps_is_xs():  # before: the CPU kernel read hp after writing x
        lists, _ = make_args("mt_cg_step_")
        lists[3] = lists[0]
        return "mt_cg_step_", lists, "xs[0] and hps[0]"

    def cross_index():
        lists, _ = make_args("mt_axpby_", shapes=((3,), (3,)))
        lists[1][1] = lists[0][0]
        return "mt_axpby_", lists, "ys[0] and xs[1]"

    def partial_overlap():
        base = torch.randn(10)
        return "mt_axpby_", [[base[:6]], [base[4:]]], "ys[0] and xs[0]"

    def two_written_lists():
        lists, _ = make_args("mt_cg_step_")
        lists[1] = lists[0]
        return "mt_cg_step_", lists, "xs[0] and rs[0]"

    def state_is_param():
        lists, _ = make_args("sophia_update_")
        lists[2] = lists[0]
        return "sophia_update_", lists, "params[0] and exp_avgs[0]"

    def grad_is_exp_avg():
        lists, _ = make_args("adahessian_update_")
        lists[1] = lists[2]
        return "adahessian_update_", lists, "grads[0] and exp_avgs[0]"

    def direction_reads_itself():
        lists, _ = make_args("mt_cg_direction_")
        lists[1] = lists[0]
        return "mt_cg_direction_", lists, "ps[0] and rs[0]"

    return {f.__name__: f for f in (same_noncontiguous_twice, hps_is_xs, cross_index, partial_overlap,
                                    two_written_lists, state_is_param, grad_is_exp_avg,
                                    direction_reads_itself)}


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("case", list(_alias_cases()))
def test_aliasing_that_changes_the_result_is_rejected(b, case):
    op, lists, words = _alias_cases()[case]()
    scalars = make_args(op)[1]
    before = snapshot(lists)
    with raises(ValueError, f"{op}: {words} share memory"):
        call(b, op, lists, scalars)
    assert_unchanged(lists, before)


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "non-contiguous"])
def test_axpby_xs_may_be_ys(b, layout):
    def fresh():
        g = torch.Generator().manual_seed(5)
        t = [torch.randn(4, 6, generator=g), torch.randn(7, generator=g)]
        return [t[0][:, ::2], t[1]] if layout == "non-contiguous" else t
    got, want = fresh(), fresh()
    with backend.use(b):
        ops.mt_axpby_(got, got, 2.0, 0.5)
    expect = [t.clone() for t in want]
    with backend.use("reference"):
        ops.mt_axpby_(want, expect, 2.0, 0.5)  # the same math on separate tensors
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # read-only lists may share memory freely
    with backend.use(b):
        assert float(ops.mt_dot(got, got)) == float(ops.mt_norm_sq(got))


@pytest.mark.parametrize("b", BACKENDS)
def test_interleaved_views_count_as_sharing(b):
    # Byte ranges are compared (documented): t[::2] and t[1::2] touch disjoint elements but
    # overlapping ranges, and are rejected, as in C++.
    base = torch.randn(8)
    with backend.use(b), raises(ValueError, "mt_axpby_: ys[0] and xs[0] share memory"):
        ops.mt_axpby_([base[::2]], [base[1::2]], 1.0, 1.0)


# ---------------------------------------------------------------------------
# dispatcher registration and backend choice

@pytest.mark.parametrize("op", sorted(backend.ops()))
def test_dispatcher_has_exactly_the_claimed_keys(op):
    claimed = backend.dispatcher_keys(op)
    if not claimed:
        assert not hasattr(torch.ops.llmopt_ext, op), f"{op} is in the dispatcher but claims no key"
        return
    qualname = f"llmopt_ext::{op}"
    for key in ("CPU", "CUDA", "Meta", "Autograd", "CompositeImplicitAutograd", "CompositeExplicitAutograd"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
        assert has == (key in claimed), f"{qualname}: kernel for {key}: {has}, claimed: {claimed}"


def test_claimed_keys_follow_the_build():
    keys = backend.dispatcher_keys("mt_dot")
    assert ("CPU" in keys) == _extension.loaded()
    assert ("CUDA" in keys) == _extension.built_with_cuda()
    assert backend.dispatcher_keys("lora_linear") == ()  # Python: composed ATen / Triton


@pytest.mark.parametrize("op", sorted(backend.ops()))
def test_every_available_implementation_resolves(op):
    for b in backend.ops()[op]:
        if backend.unavailable_reason(b) is None:
            assert callable(backend.implementation(op, b))
    with backend.use("reference"):
        assert backend.resolve(op, torch.device("cpu")) is backend.implementation(op, "reference")


def test_forced_unavailable_backend_raises(monkeypatch):
    xs = [torch.ones(3)]
    with backend.use("triton"), raises(RuntimeError, "backend 'triton' is forced but mt_dot has no triton"):
        ops.mt_dot(xs, xs)
    with backend.use("cuda"), raises(RuntimeError, "backend 'cuda' is forced but cannot run mt_dot on cpu"):
        ops.mt_dot(xs, xs)
    monkeypatch.setattr(_extension, "C", None)  # as if _C had not loaded
    for op, call_it in (("mt_dot", lambda: ops.mt_dot(xs, xs)),
                        ("adahessian_update_", lambda: call("cpu", "adahessian_update_", *make_args(
                            "adahessian_update_")))):
        with backend.use("cpu"), raises(RuntimeError, f"backend 'cpu' is forced for {op} but unavailable"):
            call_it()
    assert float(ops.mt_dot(xs, xs)) == 3.0  # not forced: the reference runs
