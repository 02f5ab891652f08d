"""The fused CPU ops (GEGLU; GroupNorm + SiLU) compute torch's functions, forward and backward, where they apply."""
import copy
import os
import logging

import pytest
import torch
import torch.nn.functional as F

import ldm.modules.cpu_kernels as ck
from _helpers import needs_compiler
from ldm.modules.attention import GEGLU
from ldm.modules.diffusionmodules.util import GroupNorm32
from ldm.modules.kernel_backend import CpuKernels, FusedGeluGate, FusedGroupNormSiLU, use_cpu_kernels


def _reference(h: torch.Tensor) -> torch.Tensor:
    a, g = h.chunk(2, dim=-1)
    return a * F.gelu(g)


@needs_compiler
# half-widths off the vector width (the scalar tail), one row, 3-d input, gates far into both tails of the GELU
@pytest.mark.parametrize("shape,scale", [((2, 50, 512), 1.0), ((7, 262), 3.0), ((1, 6), 1.0), ((3, 5, 40), 8.0)])
def test_kernel_matches_torch_forward_and_backward(shape, scale):
    torch.manual_seed(0)
    h = (torch.randn(shape) * scale).requires_grad_()
    grad = torch.randn(*shape[:-1], shape[-1] // 2)
    out = ck._FusedGeglu.apply(h * 1)  # a non-leaf input, as inside a model
    out.backward(grad)
    dh = h.grad.clone()
    h.grad = None
    ref = _reference(h * 1)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(dh, h.grad, atol=2e-6, rtol=2e-5)


@needs_compiler
def test_kernel_is_at_least_as_accurate_as_torch_against_float64():
    g = torch.linspace(-12, 12, 4001)
    h = torch.cat([torch.ones_like(g), g])[None]  # a = 1: the output is GELU(g)
    exact = g.double() * 0.5 * (1 + torch.erf(g.double() / 2 ** 0.5))
    ours = (ck._FusedGeglu.apply(h)[0].double() - exact).abs().max()
    theirs = (F.gelu(g).double() - exact).abs().max()
    assert ours <= max(theirs.item(), 5e-7)


@needs_compiler
def test_non_contiguous_input_and_gradient():
    torch.manual_seed(1)
    base = torch.randn(64, 24, requires_grad=True)
    h = base.t()  # (24, 64) with a strided last dim
    grad = torch.randn(32, 24).t()
    ck._FusedGeglu.apply(h).backward(grad)
    dh = base.grad.clone()
    base.grad = None
    _reference(base.t()).backward(grad)
    torch.testing.assert_close(dh, base.grad, atol=2e-6, rtol=2e-5)


@needs_compiler
def test_geglu_module_uses_the_kernel_on_float32_cpu_only(monkeypatch):
    used = []
    real = ck._FusedGeglu.apply
    monkeypatch.setattr(ck._FusedGeglu, "apply", lambda h: used.append(h.dtype) or real(h))
    torch.manual_seed(0)
    layer = GEGLU(16, 24)
    use_cpu_kernels(layer, CpuKernels())
    x = torch.randn(2, 5, 16)
    fused = layer(x)
    layer.double()(x.double())  # float64: torch's ops
    use_cpu_kernels(layer, CpuKernels.off())
    torch.testing.assert_close(layer.float()(x), fused, atol=1e-6, rtol=1e-5)
    assert used == [torch.float32]


def test_geglu_falls_back_with_one_warning_when_the_kernel_cannot_be_built(monkeypatch, caplog):
    def broken():
        raise RuntimeError("could not build the CPU kernels (no compiler)")
    calls = []
    monkeypatch.setattr(ck, "load_kernel", lambda: (calls.append(1), broken()))
    monkeypatch.setattr(ck, "_ext", None)  # as in a process whose build failed
    monkeypatch.setattr(ck, "_warned_fallback", set())
    h = torch.randn(3, 8)
    gate = FusedGeluGate()
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        outs = [gate(h) for _ in range(2)]
    torch.testing.assert_close(outs[0], _reference(h))
    assert [r.getMessage() for r in caplog.records] == [
        "fused CPU ops: could not build the CPU kernels (no compiler); using torch's ops"]
    monkeypatch.setattr(ck, "_build_error", RuntimeError("no compiler"))  # once the failure is known and said,
    n = len(calls)
    gate(h)
    assert len(calls) == n  # an op call does not try (and raise, and catch) again


def test_compiled_code_keeps_torch_ops(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not ck.kernel_applies(torch.randn(2, 8))


def _gn_reference(norm, x, silu):
    y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(y) if silu else y


@needs_compiler
# channels-last and contiguous; channels and positions off the vector width (scalar tails); one channel per group;
# 1-d and 3-d spatial shapes (contiguous); a mean far from zero (the variance from sums of squares, in double)
@pytest.mark.parametrize("shape,groups,layout,offset", [
    ((2, 64, 8, 8), 32, "cl", 0.0), ((2, 64, 8, 8), 32, "contiguous", 0.0), ((3, 40, 5, 7), 8, "cl", 0.0),
    ((1, 24, 3, 5), 24, "contiguous", 0.0), ((2, 32, 300), 4, "contiguous", 0.0),
    ((1, 16, 3, 4, 5), 4, "contiguous", 0.0),
    ((2, 96, 16, 16), 32, "cl", 50.0), ((2, 20, 17, 3), 4, "cl", 0.0)])
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_silu_matches_torch_forward_and_backward(shape, groups, layout, offset, silu):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, shape[1], eps=1e-6)
    with torch.no_grad():  # weights away from their initialisation (ones, zeros)
        norm.weight.add_(torch.randn_like(norm.weight) * 0.5)
        norm.bias.add_(torch.randn_like(norm.bias) * 0.5)
    x = torch.randn(shape) * 2 + offset
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn(shape)
    assert ck._channels_last(x) is (layout == "cl")
    out = ck._FusedGroupNormSiLU.apply(x, norm.weight, norm.bias, groups, norm.eps, silu, layout == "cl")
    assert out.stride() == x.stride()
    out.backward(grad)
    # against float64 (torch's own float32 channels-last kernel is 1e-3 off it at the offset mean)
    norm64, x64 = copy.deepcopy(norm).double(), x.detach().double().requires_grad_()
    ref = _gn_reference(norm64, x64, silu)
    ref.backward(grad.double())
    tol = dict(atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(out, ref.float(), **tol)
    exact_grads = [x64.grad, norm64.weight.grad, norm64.bias.grad]
    for mine, exact in zip([x.grad, norm.weight.grad, norm.bias.grad], exact_grads):
        torch.testing.assert_close(mine, exact.float(), **tol)


@needs_compiler
def test_unet_transformer_and_autoencoder_blocks_use_the_fused_norm(monkeypatch):
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.model import ResnetBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock
    calls = []
    real = ck._FusedGroupNormSiLU.apply
    monkeypatch.setattr(ck._FusedGroupNormSiLU, "apply", lambda *a: calls.append(a[-2:]) or real(*a))
    torch.manual_seed(0)
    res = ResBlock(32, 16, 0.0, out_channels=64, down=True)
    st = SpatialTransformer(32, 4, 8, context_dim=16)
    ae = ResnetBlock(in_channels=32, out_channels=32, temb_channels=0, dropout=0.0)
    for m in (res, st, ae):
        use_cpu_kernels(m, CpuKernels())
        for p in m.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    x, emb, ctx = torch.randn(2, 32, 8, 8), torch.randn(2, 16), torch.randn(2, 5, 16)
    xcl = x.contiguous(memory_format=torch.channels_last)

    def run():
        return [res(xcl, emb), st(xcl, ctx), ae(x)]
    outs = run()
    # (silu, channels-last): the ResBlock's in and out layers, the transformer's input norm, the autoencoder's two
    assert calls == [(True, True), (True, True), (False, True), (True, False), (True, False)]
    for m in (res, st, ae):
        use_cpu_kernels(m, CpuKernels.off())
    for fused, plain in zip(outs, run()):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
    assert len(calls) == 5


def test_the_fused_norm_keeps_other_dtypes_and_layouts_on_torch(monkeypatch):
    monkeypatch.setattr(ck, "_FusedGroupNormSiLU", None)  # any use of the kernel would fail
    norm = GroupNorm32(4, 8)
    fused = FusedGroupNormSiLU.sharing(norm, silu=True)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(fused.double()(x.double()), F.silu(norm.double()(x.double())))
    fused.float(), norm.float()
    torch.testing.assert_close(fused(x[:, :, ::2]), F.silu(norm(x[:, :, ::2])))  # strided
    no_silu = FusedGroupNormSiLU.sharing(norm, silu=False)
    torch.testing.assert_close(no_silu(x.double()), norm(x.double()))


def test_hooked_modules_keep_torch_ops_and_their_hooks():
    """The swap leaves a norm or a SiLU with hooks as it is (the hook sees every call, on torch's op); a hook on the
    Sequential around them sees the call either way."""
    layers = torch.nn.Sequential(GroupNorm32(4, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 1))
    plain = copy.deepcopy(layers)
    x = torch.randn(2, 8, 4, 4)
    seen = []
    for module in (layers[0], layers[1]):
        handle = module.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
        assert use_cpu_kernels(layers, CpuKernels())["norm"] == 0
        torch.testing.assert_close(layers(x), plain(x))
        handle.remove()
    assert seen == ["GroupNorm32", "SiLU"]
    handle = layers.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    assert use_cpu_kernels(layers, CpuKernels())["norm"] == 1
    torch.testing.assert_close(layers(x), plain(x), atol=1e-5, rtol=1e-4)
    handle.remove()
    assert seen[-1] == "Sequential" and type(layers[0]) is FusedGroupNormSiLU


# -- the build: a stale lock, a wheel in a fresh venv --------------------------------------------------------------
def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stale_build_lock_is_reported_instead_of_waited_on(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's lock file, on which torch waits forever: the next process says which
    file, and why it is stale, and falls back."""
    import os
    import time

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    # torch < 2.14 waits while the lock file exists; 2.14 holds an OS-level lock (cpp_extension.FileLock) instead
    file_lock = getattr(cpp_extension, "FileLock", None)
    monkeypatch.delattr(cpp_extension, "FileLock", raising=False)
    monkeypatch.setattr(ck, "_ext", None)
    monkeypatch.setattr(ck, "_build_error", None)
    build = ck.build_directory(f"ldm_cpu_kernels_{ck._cpu_tag()}")
    build.mkdir(parents=True)
    (build / "lock").touch()
    (build / ck.OWNER_FILE).write_text(str(_dead_pid()))
    started = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        ck.load_kernel()
    assert time.monotonic() - started < 5  # reported, not waited on
    assert str(build / "lock") in str(e.value) and "has exited" in str(e.value)

    # a lock with no recorded builder, older than any build takes, is stale too; a fresh one or a live builder's not
    (build / ck.OWNER_FILE).unlink()
    assert ck.stale_lock(build) is None
    old = time.time() - 2 * ck.STALE_LOCK_SECONDS
    os.utime(build / "lock", (old, old))
    assert "minutes old" in ck.stale_lock(build)
    (build / ck.OWNER_FILE).write_text(str(os.getppid()))  # a live process
    assert ck.stale_lock(build) is None
    if file_lock is not None:  # where torch's lock dies with its holder, a leftover file blocks nothing
        (build / ck.OWNER_FILE).write_text(str(_dead_pid()))
        assert ck.stale_lock(build) is not None
        monkeypatch.setattr(cpp_extension, "FileLock", file_lock, raising=False)
        assert ck.stale_lock(build) is None


@pytest.mark.slow
@needs_compiler
def test_a_wheel_installed_in_a_fresh_venv_builds_the_kernels(tmp_path):
    """The wheel carries the kernels' sources and headers; installed outside the repository, it builds them."""
    import subprocess
    import sys
    import sysconfig
    import venv
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.rsplit("/", 1)[-1] for n in names if "/csrc/" in n}
    assert {p.name for p in ck.CSRC.iterdir() if p.suffix in (".cpp", ".h")} <= shipped, shipped
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # torch and the other dependencies from this environment; the package itself only from the wheel
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    out = subprocess.run([str(python), "-m", "ldm.modules.cpu_kernels"], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
                              "HOME": str(tmp_path)}, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CPU kernels ready" in out.stdout and str(tmp_path / "ext") in out.stdout
    where = subprocess.run([str(python), "-c", "import ldm; print(ldm.__file__)"], cwd=tmp_path, check=True,
                           capture_output=True, text=True).stdout
    assert str(repo) not in where and site in where  # the installed package, not the repository's
