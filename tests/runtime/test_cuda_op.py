"""``sqc::lut_linear_cuda`` without a GPU: the op boundary, the prepared launches, the fake implementations.

The kernels themselves run only on a GPU (``tests/codegen/test_cuda_kernels.py``). Here a CUDA layer is built
by hand (chunk words, kernel descriptions, no fatbin) and its CUDA module launches through a recording driver,
so what a layer call hands ``cuLaunchKernel`` (the parameter array, grid, block, stream) is checked on the CPU:
every pointer is the tensor the kernel's parameter names, the array is prepared once and rewritten in place,
and binding follows copies and reloads. The ops' fake implementations run under ``torch.compile`` on meta
tensors, and a traced CUDA layer's graph holds the op and the layer's tensors, nothing process-specific.
"""
from __future__ import annotations

import copy
import ctypes

import pytest
import torch

from sqc.runtime.cuda import kernels as cuda_kernels
from sqc.runtime.cuda.chunks import CudaKey, GemmKnobs, GemvKnobs, KernelSpec
from sqc.runtime.cuda.kernels import CudaLutKernels, CudaModule, CudaUnavailable
from sqc.runtime.kernels import kernels_of
from sqc.runtime.qlinear import SqcLinear
from sqc.runtime.status import KernelStatus

from tests.conftest import random_packed

R, K = 24, 80
#: the parameter order of the hand-made kernel descriptions (the generated ones come from TVM's source)
GEMV_PARAMS = ("x", "w", "lut", "crow", "col", "val", "sc", "bias", "y")
GEMM_PARAMS = ("x", "w", "lut", "crow", "col", "val", "sc", "bias", "y", "n")
NAMES = {"1": "gemv_k", "2-16": "gemm16_k", "17+": "gemm64_k"}


class RecordingDriver:
    """Stands in for the CUDA driver: records each prepared launch (the parameter values, read through the array)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def launch_array(self, fn, grid, block, params, stream, name) -> None:
        spec = SPECS[name]
        values = [ctypes.c_void_p.from_address(params[i]).value if p != "n" else
                  ctypes.c_int32.from_address(params[i]).value for i, p in enumerate(spec.params)]
        self.calls.append({"fn": fn, "grid": grid, "block": block, "array": ctypes.addressof(params),
                           "stream": stream, "name": name, "values": dict(zip(spec.params, values))})


def _specs() -> dict[str, KernelSpec]:
    key = CudaKey(R, K, 3, True, "float16", "int16", "float32")
    return {"gemv_k": KernelSpec("gemv_k", "gemv", key, GemvKnobs(), 128, 3, 1, GEMV_PARAMS),
            "gemm16_k": KernelSpec("gemm16_k", "gemm", key, GemmKnobs(), 256, 2, 16, GEMM_PARAMS),
            "gemm64_k": KernelSpec("gemm64_k", "gemm", key, GemmKnobs(np=64), 256, 2, 64, GEMM_PARAMS)}


SPECS = _specs()


@pytest.fixture
def driver(monkeypatch):
    monkeypatch.setattr(cuda_kernels, "_raw_stream", lambda device: 0x5EED)
    return RecordingDriver()


def cuda_layer(driver, seed=0, name="mlp.up") -> SqcLinear:
    """An SqcLinear with CUDA kernels whose module launches through ``driver`` (device -1: CPU tensors)."""
    packed = random_packed(R, K, 3, frac=0.05, seed=seed)
    bias = torch.randn(R)
    layer = SqcLinear(packed, bias)
    module = CudaModule(b"", SPECS, ("sm_90",))
    module._driver = driver
    module._fns[-1] = {s: f"fn:{s}" for s in SPECS}
    layer.set_kernel(CudaLutKernels(packed, bias, module, NAMES, name, "cuda -arch=sm_90"),
                     KernelStatus.kernel("tvm-cuda-sm_90"))
    return layer


def expected(layer: SqcLinear) -> dict[str, int]:
    k = layer._kernels
    return {"w": k.words.data_ptr(), "lut": layer.lut.data_ptr(), "crow": layer.crow.data_ptr(),
            "col": layer.col.data_ptr(), "val": layer.val.data_ptr(), "sc": k.scode.data_ptr(),
            "bias": k.bias16.data_ptr()}


@pytest.mark.parametrize("n", [1, 5, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_a_call_launches_the_bucket_kernel_with_the_layer_tensors(driver, n, dtype):
    layer = cuda_layer(driver)
    k = layer._kernels
    x = torch.randn(n, K).to(dtype)
    y = k.run(x, *layer._args)  # what the op's CUDA implementation calls (CPU tensors: device -1 on both sides)
    call, = driver.calls
    sym = NAMES["1" if n == 1 else "2-16" if n <= 16 else "17+"]
    assert call["name"] == sym and call["fn"] == f"fn:{sym}" and call["stream"] == 0x5EED
    assert call["grid"] == SPECS[sym].grid(n) and call["block"] == SPECS[sym].threads
    values = call["values"]
    assert {p: values[p] for p in expected(layer)} == expected(layer)
    assert y.shape == (n, R) and y.dtype == dtype
    if n == 1 and dtype != torch.float16:  # batch 1 in fp32 / bf16 passes through the layer's fp16 buffers
        assert values["x"] == k._x16.data_ptr() and values["y"] == k._y16.data_ptr()
        assert torch.equal(k._x16, x.to(torch.float16))
    elif dtype == torch.float16:  # fp16 x is read where it is; the output is the one the kernel wrote
        assert values["x"] == x.data_ptr() and values["y"] == y.data_ptr()
    else:
        assert values["x"] not in (x.data_ptr(), 0) and values["y"] not in (y.data_ptr(), 0)
    if "n" in values:
        assert values["n"] == n


def test_the_parameter_array_is_prepared_once_and_rewritten_per_call(driver):
    layer = cuda_layer(driver)
    a, b = torch.randn(1, K, dtype=torch.float16), torch.randn(1, K, dtype=torch.float16)
    ya = layer._kernels.run(a, *layer._args)
    yb = layer._kernels.run(b, *layer._args)
    first, second = driver.calls
    assert first["array"] == second["array"]  # the same ctypes array, its x / y cells rewritten
    assert (first["values"]["x"], second["values"]["x"]) == (a.data_ptr(), b.data_ptr())
    assert (first["values"]["y"], second["values"]["y"]) == (ya.data_ptr(), yb.data_ptr())


def test_copies_and_reloads_get_their_own_prepared_launches(driver):
    layer = cuda_layer(driver)
    twin = copy.deepcopy(layer)
    assert twin._kernels.module is layer._kernels.module  # the loaded fatbin is shared, not copied
    assert kernels_of(twin._kernels.words, "t") is twin._kernels
    assert kernels_of(layer._kernels.words, "t") is layer._kernels
    x = torch.randn(3, K, dtype=torch.float16)
    twin._kernels.run(x, *twin._args)
    assert driver.calls[-1]["values"]["w"] == twin._kernels.words.data_ptr() != layer._kernels.words.data_ptr()
    # new codes from a state_dict: the launches point at the rebuilt words
    other = cuda_layer(driver, seed=1)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.codes, other.codes)
    layer._kernels.run(x, *layer._args)
    assert driver.calls[-1]["values"] == dict(driver.calls[-1]["values"], **expected(layer))


def test_a_call_on_the_cpu_is_a_clear_error(driver):
    layer = cuda_layer(driver, name="model.layers.0.mlp.up_proj")
    with pytest.raises(CudaUnavailable, match=r"layer 'model.layers.0.mlp.up_proj' was compiled for "
                                              r"'cuda -arch=sm_90'.*model.to\('cuda'\).*target='llvm'"):
        layer(torch.randn(2, K))
    assert not driver.calls


def test_cuda_layers_dispatch_to_their_op(driver):
    layer = cuda_layer(driver)
    seen: set[str] = set()

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "sqc":
                seen.add(func._opname)
                return torch.empty(args[0].shape[:-1] + (R,), dtype=args[0].dtype)
            return func(*args, **(kwargs or {}))

    with Record():
        layer(torch.randn(4, K))
    assert seen == {"lut_linear_cuda"}


def _meta_args(op: str, dtype):
    meta = dict(device="meta")
    x = torch.empty(3, 7, K, dtype=dtype, **meta)
    if op == "int8_linear_cpu":
        return (x, torch.empty(R, K, dtype=torch.int8, **meta), torch.empty(R, **meta), torch.empty(R, **meta))
    return (x, torch.empty(R, 12, dtype=torch.int32, **meta), torch.empty(R, 8, dtype=torch.float16, **meta),
            torch.empty(R + 1, dtype=torch.int32, **meta), torch.empty(30, dtype=torch.int16, **meta),
            torch.empty(30, **meta), torch.empty(30, dtype=torch.uint8, **meta), torch.empty(R, **meta))


@pytest.mark.parametrize("op", ["lut_linear_cuda", "lut_linear_cpu", "int8_linear_cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_implementations_under_torch_compile_on_meta_tensors(op, dtype):
    import sqc.runtime.cpu.ops  # noqa: F401  (registers the CPU ops)
    import sqc.runtime.cuda.ops  # noqa: F401

    fn = getattr(torch.ops.sqc, op).default
    torch._dynamo.reset()
    out = torch.compile(lambda *a: fn(*a).relu(), fullgraph=True, backend="aot_eager")(*_meta_args(op, dtype))
    assert out.device.type == "meta" and out.shape == (3, 7, R) and out.dtype == dtype
    if op != "int8_linear_cpu":
        with pytest.raises(ValueError, match=f"sqc::{op}: x must be floating point"):
            fn(*_meta_args(op, torch.int32))


def _graph(layer: SqcLinear, n: int = 1) -> torch.fx.GraphModule:
    """Dynamo's graph of one layer call (traced on fake tensors; never run)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: (torch.empty(n, R),)

    torch._dynamo.reset()
    torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(n, K))
    gm, = graphs
    return gm


def test_a_traced_cuda_layer_holds_its_op_and_tensors_and_no_handle(driver):
    """The kernel's identity is the code tensor, a graph input: two layers (made in either order) trace to one
    graph text, so Inductor's on-disk cache key does not depend on load order."""
    first = _graph(cuda_layer(driver, seed=3))
    cuda_layer(driver, seed=4)  # another layer in between changes nothing
    second = _graph(cuda_layer(driver, seed=5))
    assert first.code == second.code
    calls = [n for n in first.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [torch.ops.sqc.lut_linear_cuda.default]
    assert all(a.op == "placeholder" for a in calls[0].args) and len(calls[0].args) == 8  # x and 7 layer tensors


def test_an_unprepared_bucket_is_a_clear_error(driver):
    layer = cuda_layer(driver)
    k = layer._kernels
    k.names = {"1": "gemv_k"}
    layer._bind()
    with pytest.raises(RuntimeError, match=r"layer 'mlp.up': no prepared launch for batch bucket 2-16"):
        k.run(torch.randn(3, K, dtype=torch.float16), *layer._args)
