"""Running generated CUDA kernels on torch tensors through the CUDA driver, with no compiler.

The GPU machines sqc runs on need neither TVM nor JAX nor nvcc: the kernels
arrive as a fatbin (built where they were generated, :mod:`sqc.codegen.nvcc`)
with a JSON description of each kernel (symbol, parameters, block size, grid),
and this module loads the fatbin with ``cuModuleLoadData`` and launches with
``cuLaunchKernel`` on torch's current stream, through ``ctypes`` and
``libcuda.so.1`` alone. Launches go on torch's stream, so they order with
torch's own work and can be captured in CUDA graphs.

:func:`to_chunk_words` derives the chunk layout of the codes (see
:mod:`sqc.runtime.cuda.chunks`) from the canonical packed weight;
:class:`CudaLutKernels` holds one layer's chunk words and runs
``y = x @ W_hat.T + b`` in fp16 with fp32 accumulation.
"""
from __future__ import annotations

import ctypes
import json
import os
import threading
from typing import Any

import torch

from .chunks import KernelSpec, from_chunk_words, to_chunk_words
from .ops import lut_linear_cuda
from ..kernels import BUCKETS, bucket_of, register_kernels
from ..layout import PackedLinear, dtype_name, pack_codes
from ..status import KernelStatus

__all__ = ["CudaModule", "CudaLutKernels", "CudaUnavailable", "driver",
           "CudaBundle"]


class CudaUnavailable(RuntimeError):
    """Raised when a CUDA-compiled layer runs where no NVIDIA GPU/driver is usable."""


class _Driver:
    """The few CUDA driver calls sqc needs, through ctypes."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaUnavailable(f"the NVIDIA driver library libcuda.so.1 cannot be loaded ({e})") from None
        self._check(self.lib.cuInit(0), "cuInit")
        vp, u = ctypes.c_void_p, ctypes.c_uint
        self.lib.cuLaunchKernel.argtypes = [vp, u, u, u, u, u, u, u, vp, vp, vp]

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else "unknown error"
            raise RuntimeError(f"CUDA driver call {what} failed: error {rc} ({text})")

    def ensure_context(self, device: int) -> None:
        """Make the device's primary context (the one torch uses) current on this thread."""
        cur = ctypes.c_void_p()
        self._check(self.lib.cuCtxGetCurrent(ctypes.byref(cur)), "cuCtxGetCurrent")
        if cur.value:
            return
        dev = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        ctx = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self._check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def load(self, image: bytes) -> ctypes.c_void_p:
        mod = ctypes.c_void_p()
        buf = ctypes.create_string_buffer(image, len(image))
        self._check(self.lib.cuModuleLoadData(ctypes.byref(mod), buf), "cuModuleLoadData")
        return mod

    def function(self, mod: ctypes.c_void_p, name: str) -> ctypes.c_void_p:
        fn = ctypes.c_void_p()
        self._check(self.lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), f"cuModuleGetFunction({name})")
        return fn

    def launch_array(self, fn, grid, block: int, params, stream: int, name: str) -> None:
        rc = self.lib.cuLaunchKernel(fn, grid[0], grid[1], grid[2], block, 1, 1, 0, stream, params, None)
        if rc:
            self._check(rc, f"cuLaunchKernel({name})")

    def launch(self, fn, grid, block, args: list, stream: int, name: str) -> None:
        holders = []
        for a in args:
            holders.append(ctypes.c_int32(a) if isinstance(a, int) else ctypes.c_void_p(a.data_ptr()))
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        self.launch_array(fn, grid, block, params, stream, name)


def _raw_stream(device: int) -> int:
    """The handle of torch's current stream on ``device`` (an int; no ``torch.cuda.Stream`` object is made)."""
    return torch._C._cuda_getCurrentRawStream(device)


_DRIVER: _Driver | None = None
_DRIVER_LOCK = threading.Lock()


def driver() -> _Driver:
    global _DRIVER
    with _DRIVER_LOCK:
        if _DRIVER is None:
            if not torch.cuda.is_available():
                raise CudaUnavailable("torch sees no CUDA device (torch.cuda.is_available() is False)")
            _DRIVER = _Driver()
        return _DRIVER


class CudaModule:
    """A fatbin and its kernel descriptions; loaded into a device's context on first use."""

    def __init__(self, fatbin: bytes, specs: dict[str, Any], arch: tuple[str, ...] = ()) -> None:
        self.fatbin = fatbin
        self.specs = specs  # symbol -> KernelSpec
        self.arch = arch  # what the fatbin was built for (named in load errors)
        self._driver: _Driver | None = None
        self._mods: dict[int, Any] = {}
        self._fns: dict[int, dict[str, Any]] = {}

    def _load(self, device: int) -> dict[str, Any]:
        if not self.fatbin:
            raise CudaUnavailable("these CUDA kernels have no fatbin (nvcc was missing where they were compiled): "
                                  "compile again on a machine with nvcc on PATH (or SQC_NVCC set)")
        d = self._driver = driver()
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # makes torch create its (primary) context
            d.ensure_context(device)
            try:
                self._mods[device] = d.load(self.fatbin)
            except RuntimeError as e:
                major, minor = torch.cuda.get_device_capability(device)
                raise CudaUnavailable(
                    f"the kernels were built for {', '.join(self.arch) or 'another GPU'} and do not load on this "
                    f"sm_{major}{minor} GPU ({e}): compile with target='cuda -arch=sm_{major}{minor}'") from None
        return self._fns.setdefault(device, {})

    def function(self, name: str, device: int):
        fns = self._fns.get(device)
        if fns is None:
            fns = self._load(device)
        fn = fns.get(name)
        if fn is None:
            fn = fns[name] = self._driver.function(self._mods[device], name)
        return fn

    def launch_prepared(self, name: str, spec: KernelSpec, n: int, params, device: int) -> None:
        """Launch ``name`` for batch ``n`` with a prepared parameter array on torch's current stream of ``device``."""
        fns = self._fns.get(device)
        fn = fns.get(name) if fns is not None else None
        if fn is None:
            fn = self.function(name, device)
        self._driver.launch_array(fn, spec.grid(n), spec.threads, params, _raw_stream(device), name)

    def __deepcopy__(self, memo) -> "CudaModule":
        return self  # the fatbin and the functions loaded from it are shared by every copy of a model

    def launch(self, name: str, n: int, tensors: dict[str, Any], device: int) -> None:
        """Launch ``name`` with the tensors named by its parameters (tuning and checks; layers launch prepared)."""
        spec = self.specs[name]
        args = [int(n) if p == "n" else tensors[p] for p in spec.params]
        fn = self.function(name, device)
        stream = torch.cuda.current_stream(device).cuda_stream
        self._driver.launch(fn, spec.grid(n), spec.threads, args, stream, name)


class CudaLutKernels:
    """One layer's CUDA kernels: a gemv for batch 1, a gemm per batch bucket, run by ``sqc::lut_linear_cuda``.

    Holds the chunk words, the code under each sparse entry and the fp16 bias; the tables and CSR arrays stay
    on the module. ``names`` maps each batch bucket to a kernel symbol of ``module``.

    :meth:`bind` (after attach, a load, a move: :class:`~sqc.runtime.qlinear.SqcLinear` calls it) registers the
    kernels under their code words and prepares each bucket's ``cuLaunchKernel`` parameter array once: one
    ctypes cell per parameter, the layer's tensors written in at bind time, x, y and the batch rewritten in
    place per call. A call then creates no Python object beyond the output tensor: it reads the raw stream
    handle, writes three cells and launches. fp32 / bf16 activations pass through fp16 buffers the layer keeps
    for batch 1 (the decode step's shape); larger batches convert into fresh ones. The cells are the layer's
    own, so one layer must not be called from two threads at once (the compiled step and the server's engine
    call each layer from one thread).
    """

    op = lut_linear_cuda

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None, module: CudaModule, names: dict[str, str],
                 layer: str, target: str) -> None:
        self.bits = packed.bits
        self.out_features = packed.out_features
        self.in_features = packed.in_features
        self.module = module
        self.names = dict(names)
        self.layer = layer
        self.target = target
        self._launches: dict[str, tuple] = {}
        self.rebind(packed, bias)

    def __getstate__(self) -> dict:
        # the parameter arrays point into this layer's tensors: a copy prepares its own (its layer rebinds it)
        skip = ("_cells", "_x16", "_y16")
        return {k: ({} if k == "_launches" else v) for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        register_kernels(self, self.words)

    def rebind(self, packed: PackedLinear, bias: torch.Tensor | None = None) -> None:
        """Take new codes and bias (``load_state_dict``): chunk words, sparse codes, fp16 bias."""
        dev = packed.lut.device  # the layer's own device (CPU at compile and load, the GPU when built there)
        codes = packed.unpack(torch.uint8).to(dev)  # unpacked on the CPU; laid out where the layer is
        self.words = to_chunk_words(codes, packed.bits)
        register_kernels(self, self.words)
        rows, cols = packed.sparse_coo()
        self.scode = codes[rows.to(dev), cols.to(dev)].to(torch.uint8).contiguous()
        b = bias.detach() if bias is not None else torch.zeros(packed.out_features, device=dev)
        self.bias16 = b.to(device=dev, dtype=torch.float16).contiguous()
        self._launches = {}

    def apply(self, fn) -> None:
        """Follow the module's ``.to()`` / ``.cuda()``: move the words, sparse codes and bias (dtypes kept)."""
        self.words = fn(self.words)
        self.scode = fn(self.scode)
        b = fn(self.bias16)
        self.bias16 = b.to(torch.float16) if b.dtype != torch.float16 else b
        self._launches = {}

    def bind(self, lut, crow, col, val, bias) -> tuple:
        """Register under the code words, prepare every bucket's launch, and return the op's arguments after x."""
        if bias is not None:
            self.bias16 = bias.detach().to(device=self.words.device, dtype=torch.float16).contiguous()
        register_kernels(self, self.words)
        x, y, n = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_int32()
        per_call = {"x": x, "y": y, "n": n}
        fixed = {"w": self.words, "lut": lut, "crow": crow, "col": col, "val": val, "sc": self.scode,
                 "bias": self.bias16}
        launches = {}
        for bucket, sym in self.names.items():
            spec = self.module.specs[sym]
            cells = []
            for p in spec.params:
                if p in per_call:
                    cells.append(per_call[p])
                elif p in fixed:
                    cells.append(ctypes.c_void_p(fixed[p].data_ptr()))
                else:
                    raise ValueError(f"layer '{self.layer}': kernel {sym} takes a parameter {p!r} sqc does not know")
            array = (ctypes.c_void_p * len(cells))(*[ctypes.addressof(c) for c in cells])
            launches[bucket] = (sym, spec, array, cells)
        self._cells = (x, y, n)
        self._launches = launches
        self._device = self.words.get_device()  # what a call's x must be on (-1: the CPU)
        # batch 1 in fp32 / bf16 converts through these (made here, not in a call, so a CUDA graph captured
        # later reads and writes memory that outlives it)
        self._x16 = torch.empty((1, self.in_features), dtype=torch.float16, device=self.words.device)
        self._y16 = torch.empty((1, self.out_features), dtype=torch.float16, device=self.words.device)
        return (self.words, lut, crow, col, val, self.scode, self.bias16)

    def canonical_codes(self) -> torch.Tensor:
        return pack_codes(from_chunk_words(self.words, self.bits, self.in_features), self.bits)

    def nbytes(self) -> int:
        return self.words.numel() * 4 + self.scode.numel()

    def not_on_a_gpu(self, x: torch.Tensor) -> None:
        """The error for a call on CPU tensors (the op's CPU implementation)."""
        raise CudaUnavailable(
            f"layer '{self.layer}' was compiled for '{self.target}' and runs on an NVIDIA GPU: move the model "
            f"and its inputs there (model.to('cuda'), x.to('cuda')), or compile with target='llvm' to run on "
            f"this CPU (x is on {x.device}, the layer's codes on {self.words.device})")

    def run(self, x: torch.Tensor, words, lut, crow, col, val, scode, bias) -> torch.Tensor:
        """``y = x @ W_hat.T + bias`` in x's dtype (the op's CUDA implementation; the tensors are the bound ones)."""
        dev = x.get_device()
        if dev != self._device:
            raise RuntimeError(f"layer '{self.layer}': weights are on {self.words.device} but x is on {x.device}; "
                               "call model.to(x.device)")
        K, R = self.in_features, self.out_features
        if x.shape[-1] != K or not x.is_floating_point():
            raise ValueError(f"layer '{self.layer}' expects floating-point inputs with {K} features in the last "
                             f"dim (like nn.Linear), got {x.dtype} {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        n = x2.shape[0]
        if n == 0:
            return x.new_empty((*lead, R))
        half = x2.dtype is torch.float16
        if n == 1 and not half:  # the decode step's call: through the layer's own fp16 buffers
            x16, y16 = self._x16, self._y16
            x16.copy_(x2)
            self._launch("1", x16, y16, 1, dev)
            return y16.to(x.dtype).view(*lead, R)
        if not half or not x2.is_contiguous() or x2.data_ptr() % 16:
            # fp16, contiguous and aligned (the gemm reads x in 4-byte pairs): a fresh tensor
            x2 = torch.empty(x2.shape, dtype=torch.float16, device=x2.device).copy_(x2)
        y = torch.empty((n, R), dtype=torch.float16, device=x.device)
        self._launch(bucket_of(n), x2, y, n, dev)
        return (y if half else y.to(x.dtype)).view(*lead, R)

    def _launch(self, bucket: str, x: torch.Tensor, y: torch.Tensor, n: int, device: int) -> None:
        prepared = self._launches.get(bucket)
        if prepared is None:
            raise RuntimeError(f"layer '{self.layer}': no prepared launch for batch bucket {bucket} (kernels for "
                               f"{sorted(self.names)}; bound: {sorted(self._launches) or 'none'}); call the layer "
                               "itself, which binds its kernels")
        sym, spec, array, _ = prepared
        cx, cy, cn = self._cells
        cx.value, cy.value, cn.value = x.data_ptr(), y.data_ptr(), n
        try:
            self.module.launch_prepared(sym, spec, n, array, device)
        except RuntimeError as e:
            raise RuntimeError(f"layer '{self.layer}': {e}") from e

    def __call__(self, x: torch.Tensor, lut, crow, col, val, bias) -> torch.Tensor:
        if not self._launches:
            self.bind(lut, crow, col, val, bias)
        return lut_linear_cuda(x, self.words, lut, crow, col, val, self.scode, self.bias16)


# -- the CUDA part of a compiled model: kernels, which layer runs which, tuning -------------------------------

#: the batch each bucket's kernel is timed at on the GPU (16, not the CPU's 8: the gemm's batch tile is 16)
BUCKET_TUNE_BATCH = {"1": 1, "2-16": 16, "17+": 64}
#: the relative error (against the layer's fp32 product on the same fp16 x) a candidate must stay under to be
#: timed by :meth:`CudaBundle.tune`: fp16 outputs of fp32 sums land near 1e-3
TUNE_TOLERANCE = 1e-2
CUDA_FORMAT = 1


def layer_key(m) -> dict[str, Any]:
    """What a layer's CUDA kernels are specialised on (matches :class:`sqc.runtime.cuda.chunks.CudaKey`)."""
    return {"rows": m.out_features, "in_features": m.in_features, "bits": m.bits, "sparse": m.col.numel() > 0,
            "lut_dtype": dtype_name(m.lut), "col_dtype": dtype_name(m.col), "val_dtype": dtype_name(m.val)}


class CudaBundle:
    """A model's CUDA kernels (one fatbin) and its plan.

    The plan is JSON: ``arch``, ``kernels`` (symbol -> launch description) and
    ``slots``, one per (kernel key, batch bucket): the layers it serves, the
    candidate symbols (the first is the default), the chosen one, and once
    timed on a GPU the latency of every candidate. Saved in an artifact as
    ``cuda/kernels.cu`` (the source), ``cuda/kernels.fatbin`` and
    ``cuda/plan.json``; the plan is the tuning database the artifact carries.
    """

    def __init__(self, source: str, fatbin: bytes, plan: dict[str, Any]) -> None:
        self.source = source
        self.plan = plan
        specs = {s: KernelSpec.from_dict(d) for s, d in plan["kernels"].items()}
        self.module = CudaModule(fatbin, specs, tuple(plan["arch"]))

    @property
    def fatbin(self) -> bytes:
        return self.module.fatbin

    # -- files -------------------------------------------------------------------------------
    def write(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "kernels.cu"), "w") as f:
            f.write(self.source)
        with open(os.path.join(folder, "kernels.fatbin"), "wb") as f:
            f.write(self.fatbin)
        with open(os.path.join(folder, "plan.json"), "w") as f:
            json.dump(self.plan, f, indent=1)

    @staticmethod
    def read(folder: str) -> "CudaBundle":
        names = ("kernels.cu", "kernels.fatbin", "plan.json")
        missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
        if missing:
            raise FileNotFoundError(f"{folder}: CUDA artifact lacks {', '.join(missing)}; recompile and save again")
        with open(os.path.join(folder, "kernels.cu")) as f:
            source = f.read()
        with open(os.path.join(folder, "kernels.fatbin"), "rb") as f:
            fatbin = f.read()
        with open(os.path.join(folder, "plan.json")) as f:
            plan = json.load(f)
        if plan.get("format") != CUDA_FORMAT:
            raise ValueError(f"{folder}/plan.json has CUDA plan format {plan.get('format')}, this sqc reads {CUDA_FORMAT}")
        return CudaBundle(source, fatbin, plan)

    # -- attaching ---------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, target: str) -> None:
        """Give every quantized layer named in the plan its kernels (chosen symbols per bucket)."""
        from ..qlinear import SqcLinear

        mods = {n: m for n, m in model.named_modules() if isinstance(m, SqcLinear)}
        names: dict[str, dict[str, str]] = {}
        for slot in self.plan["slots"]:
            for layer in slot["layers"]:
                names.setdefault(layer, {})[slot["bucket"]] = slot["chosen"]
        kname = f"tvm-cuda-{'/'.join(self.plan['arch'])}"
        for layer, buckets in names.items():
            m = mods.get(layer)
            if m is None:
                raise ValueError(f"the CUDA plan names layer {layer!r}, which the model does not have")
            if set(buckets) != set(BUCKETS):
                raise ValueError(f"the CUDA plan gives layer {layer!r} kernels for {sorted(buckets)}, not every batch bucket")
            packed = m.packed
            m.set_kernel(CudaLutKernels(packed, m.bias, self.module, buckets, layer, target), KernelStatus.kernel(kname))
        for n, m in mods.items():
            if n not in names and m.status.generated:
                m.set_kernel(None, KernelStatus.reference("no CUDA kernel in the plan"))

    # -- reports -----------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """Tuning-report records (same fields as the CPU ones; latencies None until timed on a GPU)."""
        out = []
        for slot in self.plan["slots"]:
            key = slot["key"]
            spec = self.plan["kernels"][slot["chosen"]]
            times = slot.get("ms") or {}
            cands = [{"knobs": self.plan["kernels"][s]["knobs"], "ms": times.get(s)} for s in slot["candidates"]]
            best = times.get(slot["chosen"])
            out.append({
                "key": {"op": spec["op"], "out_features": key["rows"], "in_features": key["in_features"],
                        "bits": key["bits"], "sparse": key["sparse"], "lut_dtype": key["lut_dtype"],
                        "col_dtype": key["col_dtype"], "val_dtype": key["val_dtype"]},
                "bucket": slot["bucket"], "tuned_at_batch": BUCKET_TUNE_BATCH[slot["bucket"]],
                "knobs": spec["knobs"], "candidates": cands, "tuned": bool(times), "from_db": False,
                "best_ms": best, "default_ms": times.get(slot["candidates"][0]),
                "bytes": slot.get("bytes"), "gbps": slot.get("gbps"), "copy_gbps": self.plan.get("copy_gbps"),
                "bw_ratio": slot.get("bw_ratio"), "layers": list(slot["layers"]),
                "kernel": f"tvm-cuda {slot['chosen']}", "device": self.plan.get("device"),
            })
        return out

    # -- tuning on the GPU ---------------------------------------------------------------------
    def tune(self, model: torch.nn.Module, repeats: int = 100) -> None:
        """Time every candidate of every slot on this GPU (CUDA events, median of ``repeats``) and keep the fastest.

        The model must already be on the GPU. Updates the plan (the artifact's
        tuning database) and re-attaches the chosen kernels.
        """
        from ..qlinear import SqcLinear

        dev = torch.device("cuda", torch.cuda.current_device())
        mods = {n: m for n, m in model.named_modules() if isinstance(m, SqcLinear)}
        copy = copy_bandwidth_gbps(dev)
        self.plan["copy_gbps"] = copy
        self.plan["device"] = torch.cuda.get_device_name(dev)
        for slot in self.plan["slots"]:
            m = mods[slot["layers"][0]]
            k = m._kernels
            n = BUCKET_TUNE_BATCH[slot["bucket"]]
            x = torch.randn(n, m.in_features, device=dev, dtype=torch.float16)
            y = torch.empty(n, m.out_features, device=dev, dtype=torch.float16)
            tensors = {"x": x, "w": k.words, "lut": m.lut, "crow": m.crow, "col": m.col, "val": m.val,
                       "sc": k.scode, "bias": k.bias16, "y": y}
            # a candidate is timed only once it computes the layer (a fast wrong kernel must not win)
            want = x.float() @ m.packed.dequantize(torch.float32).T + k.bias16.float()
            times, wrong = {}, {}
            for sym in slot["candidates"]:
                y.fill_(float("nan"))
                self.module.launch(sym, n, tensors, dev.index)
                err = float((y.float() - want).norm() / want.norm())
                if not err <= TUNE_TOLERANCE:  # NaN (an unwritten output) fails too
                    wrong[sym] = err
                    continue
                times[sym] = event_median_ms(lambda: self.module.launch(sym, n, tensors, dev.index), repeats)
            if wrong:
                slot["wrong"] = wrong
            if not times:
                raise RuntimeError(f"no CUDA kernel for {slot['layers'][0]} (bucket {slot['bucket']}) matches the "
                                   f"layer on this GPU (relative errors {wrong}); tuning stops here")
            chosen = min(times, key=times.get)
            nbytes = k.nbytes() + sum(t.nbytes for t in (m.lut, m.crow, m.col, m.val))
            nbytes += 2 * n * (m.in_features + m.out_features)
            slot.update(ms=times, chosen=chosen, bytes=nbytes, gbps=nbytes / (times[chosen] * 1e-3) / 1e9)
            slot["bw_ratio"] = slot["gbps"] / copy
            for layer in slot["layers"]:
                mods[layer]._kernels.names[slot["bucket"]] = chosen
                mods[layer]._bind()  # the prepared launches name the chosen kernel


def event_median_ms(fn, repeats: int = 100, warmup: int = 10) -> float:
    """Median ms of ``fn`` on the GPU, each call bracketed by CUDA events."""
    import statistics

    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbps(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, GB/s counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    ms = event_median_ms(lambda: b.copy_(a), 20, 3)
    return 2 * nbytes / (ms * 1e-3) / 1e9
