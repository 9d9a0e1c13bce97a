"""The core on GPU arrays (CuPy, torch CUDA, JAX GPU): same numbers as NumPy, and no host
synchronisation inside a step. Every test skips cleanly on a machine without a GPU.

Detectors of a host sync:
* torch's sync debug mode set to "error" (raises on cudaStreamSynchronize, .item(), blocking
  host-to-device copies such as ``torch.tensor(1.0, device="cuda")``); for CuPy
  ``cupyx.allow_synchronize(False)``; for JAX a jitted step under ``jax.transfer_guard("disallow")``;
* a queue test (torch, CuPy): enqueue ~0.3 s of GPU work without waiting, then call the
  step. A step that syncs cannot return before that work is done; one that does not returns in
  the time it takes to launch its kernels. The margin is large (host time < half the queue).
"""
import time

import numpy as np
import pytest

import refopt

CONFIGS = [
    (refopt.SAVEUS, {"weight_decay": 0.1, "decouple_weight_decay": True, "clip_gradients": True}),
    (refopt.SAVEUS, {"weight_decay": 0.05, "profile": "documented"}),
    (refopt.DOPE, {"lr": 1e-2}),
    (refopt.DOPE, {"lr": 1e-2, "eps_floor": 1e-5, "profile": "documented"}),
]
IDS = ["saveus-decoupled-clip", "saveus-documented", "dope", "dope-floor-documented"]
SHAPES = [(64, 32, 3), (257,), ()]


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    return torch


def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("0 devices")
    except Exception as exc:  # noqa: BLE001 - CUDA runtime missing or no device
        pytest.skip(f"no CUDA device for CuPy ({exc})")
    return cupy


def _jax():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    try:
        jax.devices("gpu")
    except RuntimeError:
        pytest.skip("no GPU backend for JAX")
    return jax


def _run(opt, to, back, shape, dtype, steps=3, step=None):
    """``steps`` updates on the backend and on NumPy; returns (backend result, NumPy result)."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal(shape).astype(dtype)
    gs = [rng.standard_normal(shape).astype(dtype) for _ in range(steps)]
    step = step or opt.step
    pb, sb = to(p), opt.init(to(p))
    pn, sn = p, opt.init(p)
    for g in gs:
        pb, sb = step(pb, to(g), sb)
        pn, sn = opt.step(pn, g, sn)
    return back(pb), pn


def _assert_close(got, want, rel):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.nanmax(np.abs(want), initial=0.0)), 1e-300)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert float(np.nanmax(np.abs(got - want), initial=0.0)) <= rel * scale


def _queue_test(busy, step, wait):
    """(host seconds of ``step()`` behind a queue of GPU work, seconds the queue takes).
    ``wait(x)`` blocks until the device has finished ``x`` (and everything queued before it)."""
    wait(step())  # warm: kernel compilation, allocator pools
    t0 = time.perf_counter()
    wait(busy())
    queue = time.perf_counter() - t0
    queued = busy()
    t0 = time.perf_counter()
    out = step()
    host = time.perf_counter() - t0
    wait((queued, out))
    return host, queue


def _busy(matmul, x, seconds=0.3):
    """A function that enqueues about ``seconds`` of matmuls on ``x`` (calibrated once) and
    returns the last product without waiting for it."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            y = matmul(x, x)
        float(y[0, 0])  # wait
        if time.perf_counter() - t0 >= seconds or n > 4096:
            break
        n *= 2

    def busy():
        for _ in range(n):
            y = matmul(x, x)
        return y

    return busy


class Lib:
    """One GPU library: how to move arrays, guard a step against syncs, wait, and fill the queue."""

    def __init__(self, name):
        self.name = name
        if name == "torch":
            torch = _torch()
            self.to = lambda a: torch.from_numpy(np.array(a)).cuda()
            self.back = lambda x: x.cpu().numpy()
            self.wait = lambda _: torch.cuda.synchronize()
            self.matmul = torch.matmul
        elif name == "cupy":
            cupy = _cupy()
            self.to, self.back, self.matmul = cupy.asarray, cupy.asnumpy, cupy.matmul
            self.wait = lambda _: cupy.cuda.get_current_stream().synchronize()
        else:
            jax = self.jax = _jax()
            gpu = jax.devices("gpu")[0]
            self.to = lambda a: jax.device_put(np.asarray(a), gpu)
            self.back, self.wait = np.asarray, jax.block_until_ready
            self.matmul = jax.numpy.matmul

    def guarded(self, opt):
        """``opt.step`` made to raise on a host sync (torch, CuPy) or a host transfer (JAX, jitted)."""
        if self.name == "torch":
            import torch

            def step(p, g, s):
                torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
                try:
                    return opt.step(p, g, s)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            return step
        if self.name == "cupy":
            import cupyx

            def step(p, g, s):
                with cupyx.allow_synchronize(False):  # CuPy's own synchronising calls raise
                    return opt.step(p, g, s)
            return step
        jitted = self.jax.jit(opt.step)

        def step(p, g, s):
            with self.jax.transfer_guard("disallow"):  # no implicit host<->device traffic
                return jitted(p, g, s)
        return step


LIBS = ["torch", "cupy", "jax"]


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("cls,hp", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype,rel", [(np.float64, 1e-12), (np.float32, 1e-5)], ids=["f64", "f32"])
def test_gpu_matches_numpy_without_sync(lib, cls, hp, dtype, rel):
    L, opt = Lib(lib), cls(**hp)
    for shape in SHAPES:
        got, want = _run(opt, L.to, L.back, shape, dtype, step=L.guarded(opt))
        _assert_close(got, want, rel)


# JAX is left out: a jitted step cannot sync (the guarded test above), and JAX's eager dispatch
# may run small ops in order with earlier work (its CPU client does), which is no host read.
@pytest.mark.parametrize("lib", ["torch", "cupy"])
@pytest.mark.parametrize("cls,hp", CONFIGS[::2], ids=IDS[::2])
def test_eager_step_does_not_wait_for_the_queue(lib, cls, hp):
    L, opt = Lib(lib), cls(**hp)
    rng = np.random.default_rng(0)
    x = L.to(rng.standard_normal((4096, 4096), dtype=np.float32))
    p, g = L.to(rng.standard_normal((1024, 256), dtype=np.float32)), L.to(np.full((1024, 256), 0.5, np.float32))
    s = opt.init(p)
    host, queue = _queue_test(_busy(L.matmul, x), lambda: opt.step(p, g, s), L.wait)
    assert host < 0.5 * queue, f"step took {host:.3f} s behind a {queue:.3f} s queue: it synchronised"


def test_optax_on_gpu_matches_numpy_core():
    jax = _jax()
    import refopt.optax as ro

    gpu = jax.devices("gpu")[0]
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((64, 32)), "b": rng.standard_normal(32)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    tx, opt = ro.dope(1e-2), refopt.DOPE(lr=1e-2)
    p = jax.device_put(params, gpu)
    updates, _ = jax.jit(tx.update)(jax.device_put(grads, gpu), tx.init(p), p)
    for k, v in params.items():
        want, _ = opt.step(v, grads[k], opt.init(v))
        assert list(updates[k].devices())[0].platform == "gpu"
        _assert_close(np.asarray(p[k] + updates[k]), want, 1e-12)


# ---- refopt.torch's fused path on CUDA: the Triton kernels of refopt.fused ----------------------

def _torch_triton():
    torch = _torch()
    pytest.importorskip("triton")
    from refopt.fused import gpu

    if gpu.interpreting():
        pytest.skip("triton is interpreting in this process")
    return torch


def _torch_fused(torch, cls, hp, shape, dtype, lr_on_device, guard_from=1, steps=3):
    """refopt.torch with fused=True on a CUDA parameter, ``steps`` steps from the _run data;
    from step ``guard_from`` on (after the first, which compiles) any host sync raises."""
    import refopt.torch as rt
    from refopt.fused import gpu

    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(shape).astype(dtype)
    gs = [rng.standard_normal(shape).astype(dtype) for _ in range(steps)]
    hp = dict(hp)
    lr = hp.pop("lr", cls.facts.hparam("lr").default)
    param = torch.nn.Parameter(torch.from_numpy(p0).cuda())
    opt = getattr(rt, cls.facts.name)([param], lr=torch.tensor(lr, dtype=torch.float64, device="cuda")
                                      if lr_on_device else lr, fused=True, **hp)
    launches = []
    real = gpu.TritonKernel.__call__
    gpu.TritonKernel.__call__ = lambda *a, **k: launches.append(1) or real(*a, **k)
    try:
        for k, g in enumerate(gs):
            param.grad = torch.from_numpy(g).cuda()
            torch.cuda.set_sync_debug_mode("error" if k >= guard_from else "default")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        gpu.TritonKernel.__call__ = real
    assert len(launches) == steps, "the step did not go through the Triton kernels"
    return param.detach().cpu().numpy(), p0, gs


@pytest.mark.parametrize("lr_on_device", [False, True], ids=["float-lr", "device-lr"])
@pytest.mark.parametrize("cls,hp", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype,rel", [(np.float64, 1e-12), (np.float32, 1e-5)], ids=["f64", "f32"])
def test_torch_triton_path_matches_numpy_without_sync(cls, hp, dtype, rel, lr_on_device):
    torch = _torch_triton()
    for shape in SHAPES:
        got, p0, gs = _torch_fused(torch, cls, hp, shape, dtype, lr_on_device)
        opt = cls(**hp)
        want, st = p0, opt.init(p0)
        for g in gs:
            want, st = opt.step(want, g, st)
        _assert_close(got, want, rel)


@pytest.mark.parametrize("cls,hp", CONFIGS[::2], ids=IDS[::2])
def test_torch_triton_step_does_not_wait_for_the_queue(cls, hp):
    torch = _torch_triton()
    import refopt.torch as rt

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((4096, 4096), dtype=np.float32)).cuda()
    param = torch.nn.Parameter(torch.from_numpy(rng.standard_normal((1024, 256), dtype=np.float32)).cuda())
    param.grad = torch.full_like(param, 0.5)
    opt = getattr(rt, cls.facts.name)([param], fused=True, **hp)
    host, queue = _queue_test(_busy(torch.matmul, x), opt.step, lambda _: torch.cuda.synchronize())
    assert host < 0.5 * queue, f"step took {host:.3f} s behind a {queue:.3f} s queue: it synchronised"
