"""Tests of dsm_stt.cpu.plan and dsm_stt.cpu.install: what ``auto`` picks per CPU family, the
fallbacks when the compiled kernels cannot be had (and that nothing is built for a path that
does not run them), explicit values kept, and what installing a plan swaps into a model."""

from __future__ import annotations

import pytest
import torch
from engine_support import needs_kernels

from dsm_stt.config import EngineConfig
from dsm_stt.cpu.codebook import CompiledResidualVQ
from dsm_stt.cpu.features import CpuFeatures
from dsm_stt.cpu.fused import FusedTransformer
from dsm_stt.cpu.install import install
from dsm_stt.cpu.kernels.ops import avx2_problem
from dsm_stt.cpu.kvcache import Int8KVCache
from dsm_stt.cpu.plan import AUTO, choose, exact_plan
from dsm_stt.cpu.quantize import W4A8Linear, W8A8Linear, w8a8_kernels
from dsm_stt.model.synthetic import random_model
from dsm_stt.model.transformer import KVCache

X86 = {"avx2", "fma", "f16c"}
FAMILY_FLAGS = {
    "amx": X86 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_tile"},
    "avx512_vnni": X86 | {"avx512f", "avx512bw", "avx512_vnni"},
    "avx512": X86 | {"avx512f", "avx512bw"},
    "avx2": X86,
}
needs_torch_w8a8 = pytest.mark.skipif(
    not w8a8_kernels(own=False), reason="this PyTorch build has no fbgemm / oneDNN int8 kernel"
)
# PyTorch's w8a8 kernel of this build at one slot: fbgemm on x86-64, oneDNN on aarch64
TORCH_KERNEL = (w8a8_kernels(own=False) or ("none",))[0]


def cpu(family: str) -> CpuFeatures:
    if family == "aarch64":
        return CpuFeatures("aarch64", frozenset({"asimd"}))
    return CpuFeatures("x86_64", frozenset(FAMILY_FLAGS[family]))


class Kernels:
    """A stand-in for ``plan.kernels_problem``: the build's answer (``problem``) and each int8
    product's (``refused``), with what a plan asked, in order."""

    def __init__(self, problem: str | None = None, refused: dict[str, str] | None = None) -> None:
        self.problem, self.refused, self.asked = problem, refused or {}, []

    def __call__(self, product: str | None = None) -> str | None:
        self.asked.append(product)
        return self.problem or (self.refused.get(product) if product else None)


def plan(family: str, kernels: Kernels | None = None, **settings):
    config = EngineConfig(**({"batch_size": 1, "device": "cpu"} | settings))
    return choose(config, cpu(family), kernels or Kernels())


@needs_torch_w8a8
@pytest.mark.parametrize(
    ("family", "kernel", "dtype", "mimi"),
    [
        ("amx", "amx", torch.bfloat16, False),
        ("avx512_vnni", "vnni", torch.bfloat16, False),
        # no native bf16 on these families: float32 beside the int8 products, Mimi compiled
        ("avx512", "avx2", torch.float32, True),
        ("avx2", "avx2", torch.float32, True),
    ],
)
def test_auto_on_x86_is_w8a8_with_an_int8_ring(
    family: str, kernel: str, dtype: torch.dtype, mimi: bool
) -> None:
    got = plan(family)
    assert (got.quantize, got.kv_cache, got.dtype) == ("w8a8", "int8", dtype)
    assert (got.w8a8_kernel, got.w8a8_bits, got.fused_layers) == (kernel, 8, True)
    assert got.compiled_codebooks and got.needs_kernels and got.family == family
    assert got.float_kernels == mimi
    assert AUTO[family].measured in got.reason and "auto (dtype, quantize, kv_cache)" in got.reason
    name = str(dtype).removeprefix("torch.")
    assert got.describe().startswith(f"cpu ({family}), {name}, w8a8 on {kernel}")
    assert ("Mimi on the compiled float32 kernels" in got.describe()) == mimi


@needs_torch_w8a8
@pytest.mark.parametrize("family", ["amx", "avx2"])
def test_without_the_kernels_auto_falls_back_to_plain_pytorch(family: str) -> None:
    kernels = Kernels("no C++ compiler (c++) on the PATH")
    got = plan(family, kernels)
    assert got.kv_cache == "float" and got.w8a8_kernel in ("fbgemm", "onednn")
    assert not (got.fused_layers or got.compiled_codebooks or got.needs_kernels)
    assert "without the compiled kernels (no C++ compiler (c++) on the PATH)" in got.reason
    assert kernels.asked == [None]
    with pytest.raises(ValueError, match="kv cache int8: no C\\+\\+ compiler"):
        plan(family, kernels, kv_cache="int8")  # asked for explicitly: refused, with why


@needs_torch_w8a8
def test_a_product_the_machine_refuses_gives_way_to_the_next() -> None:
    """A build can succeed where the OS refuses the AMX tiles (or the compiler lacks them):
    the plan then takes the VNNI product, and without that PyTorch's, keeping the int8 ring."""
    tiles = Kernels(refused={"amx": "the OS refuses the AMX tiles"})
    got = plan("amx", tiles)
    assert (got.w8a8_kernel, got.fused_layers, got.kv_cache) == ("vnni", True, "int8")
    assert "not the amx kernel (the OS refuses the AMX tiles)" in got.reason
    assert tiles.asked == [None, "amx", "vnni"]
    tiles_nor_vnni = Kernels(refused={"amx": "no tiles", "vnni": "no vnni"})
    got = plan("amx", tiles_nor_vnni)
    assert (got.w8a8_kernel, got.w8a8_bits, got.fused_layers) == ("avx2", 8, True)
    assert tiles_nor_vnni.asked == [None, "amx", "vnni", "avx2"]
    neither = Kernels(refused={"amx": "no tiles", "vnni": "no vnni", "avx2": "no avx2"})
    got = plan("amx", neither)
    assert got.w8a8_kernel in ("fbgemm", "onednn") and not got.fused_layers
    assert got.kv_cache == "int8" and got.compiled_codebooks  # the build itself is fine
    assert got.w8a8_bits == 8  # fbgemm and oneDNN use VNNI on this CPU


@needs_torch_w8a8
def test_fused_layers_only_in_the_dtypes_they_compute() -> None:
    assert plan("amx", dtype="bfloat16").fused_layers
    assert plan("amx", dtype="float32").fused_layers
    half = plan("amx", dtype="float16")  # from a moshi-server TOML: the module path
    assert half.w8a8_kernel == "amx" and not half.fused_layers


@needs_torch_w8a8
def test_onednn_from_eight_slots_with_amx_tiles_when_the_own_kernels_are_missing() -> None:
    if "onednn" not in w8a8_kernels(own=False):
        pytest.skip("no oneDNN int8 kernel in this PyTorch build")
    off = Kernels("off")
    assert plan("amx", off, batch_size=8).w8a8_kernel == "onednn"
    assert plan("amx", off, batch_size=1).w8a8_kernel == w8a8_kernels(own=False)[0]
    assert plan("avx2", off, batch_size=8).w8a8_kernel == w8a8_kernels(own=False)[0]


@pytest.mark.parametrize("family", ["amx", "avx2", "aarch64"])
def test_paths_that_run_no_kernel_never_ask_for_them(family: str) -> None:
    kernels = Kernels()
    exact = plan(family, kernels, dtype="float32", quantize="none", kv_cache="float")
    assert exact.exact and not exact.needs_kernels and kernels.asked == []
    assert exact.reason == "the float path, as asked"
    if family == "aarch64":  # auto there is the float path (untested family)
        auto = plan(family, kernels)
        assert auto.exact and kernels.asked == [] and "untested" in auto.reason


@needs_torch_w8a8
def test_explicit_values_are_kept_and_the_rest_is_auto() -> None:
    kernels = Kernels()
    got = plan("avx2", kernels, quantize="w8a8", kv_cache="float")
    assert (got.quantize, got.kv_cache, got.w8a8_kernel, got.w8a8_bits) == (
        "w8a8",
        "float",
        "avx2",
        8,
    )
    assert not got.fused_layers  # the fused step needs the int8 ring
    assert kernels.asked == [None, "avx2"]
    assert "auto (dtype)" in got.reason
    off = Kernels("off")  # without the kernels: PyTorch's product, 7-bit without VNNI
    got = plan("avx2", off, quantize="w8a8", kv_cache="float")
    assert (got.w8a8_kernel, got.w8a8_bits) == (TORCH_KERNEL, 7)
    got = plan("amx", kernels, quantize="int8", dtype="float32", kv_cache="float")
    assert (got.quantize, got.dtype, got.w8a8_kernel) == ("int8", torch.float32, None)
    assert got.reason == "as asked"


def test_the_exact_plan_is_float32_on_the_configs_device() -> None:
    got = exact_plan(EngineConfig(batch_size=2, device="cpu"))
    assert (got.device, got.dtype, got.quantize, got.kv_cache) == (
        "cpu",
        torch.float32,
        "none",
        "float",
    )
    assert got.exact


def test_installing_nothing_leaves_the_model_as_it_is() -> None:
    model = random_model("tiny", seed=0)
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    transformer, quantizer = model.lm.transformer, model.mimi.quantizer.rvq_rest
    cache_type = install(model.lm, model.mimi, exact_plan(EngineConfig(device="cpu")))
    assert cache_type is KVCache
    assert model.lm.transformer is transformer and model.mimi.quantizer.rvq_rest is quantizer
    after = model.lm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@needs_kernels
@needs_torch_w8a8
def test_installing_the_auto_plan_swaps_each_piece_once() -> None:
    model = random_model("tiny", seed=0)
    mimi_keys = set(model.mimi.state_dict())
    got = choose(EngineConfig(batch_size=1, device="cpu", dtype="bfloat16"))
    lm = model.lm.to(got.dtype)
    cache_type = install(lm, model.mimi, got)
    assert cache_type is (Int8KVCache if got.kv_cache == "int8" else KVCache)
    assert isinstance(lm.transformer.layers[0].gating.linear_in, W8A8Linear)
    assert isinstance(lm.transformer, FusedTransformer) == got.fused_layers
    assert isinstance(model.mimi.quantizer.rvq_first, CompiledResidualVQ) == got.compiled_codebooks
    assert set(model.mimi.state_dict()) == mimi_keys  # the checkpoint's names stay
    if got.float_kernels:  # the compiled float32 Mimi and (float32 LMs) text head
        from dsm_stt.cpu.float_linear import PackedLinear, is_packed

        assert is_packed(model.mimi)
        assert isinstance(lm.text_linear, PackedLinear) == (got.dtype == torch.float32)
    transformer = lm.transformer
    assert install(lm, model.mimi, got) is cache_type  # a second time changes nothing
    assert lm.transformer is transformer


def test_w4a8_is_asked_for_and_runs_on_the_avx2_product_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--quantize w4a8``: never ``auto``; on any x86-64 family with AVX2 the int4 product
    with the fused layer step; refused, with the reason, where it cannot run."""
    for family in ("amx", "avx512_vnni", "avx512", "avx2"):
        chosen = plan(family, quantize="w4a8")
        assert (chosen.quantize, chosen.w8a8_kernel, chosen.w8a8_bits) == ("w4a8", "avx2_int4", 8)
        assert chosen.fused_layers and chosen.needs_kernels
        assert "w4a8 on avx2 (int4 weights in groups of 64" in chosen.describe()
        assert plan(family).quantize != "w4a8"  # auto never picks it
    with pytest.raises(ValueError, match="quantize w4a8 runs on this package's AVX2 kernel"):
        plan("aarch64", quantize="w4a8")
    with pytest.raises(ValueError, match="quantize w4a8: no compiler"):
        plan("avx2", Kernels(problem="no compiler"), quantize="w4a8")
    with pytest.raises(ValueError, match="quantize w4a8: not the avx2 kernel \\(refused\\)"):
        plan("avx2", Kernels(refused={"avx2": "refused"}), quantize="w4a8")
    monkeypatch.setattr(EngineConfig, "torch_device", lambda self: torch.device("cuda"))
    with pytest.raises(ValueError, match="quantize w4a8 runs on CPU only, not cuda"):
        choose(EngineConfig(device="cuda", quantize="w4a8"))


@pytest.mark.skipif(avx2_problem() is not None, reason=f"no avx2 product: {avx2_problem()}")
def test_installing_w4a8_swaps_every_projection() -> None:
    model = random_model("tiny", seed=0)
    config = EngineConfig(batch_size=1, device="cpu", quantize="w4a8", kv_cache="int8")
    chosen = choose(config)
    cache_type = install(model.lm, model.mimi, chosen)
    assert cache_type is Int8KVCache
    assert isinstance(model.lm.transformer, FusedTransformer)
    for layer in model.lm.transformer.layers:
        projections = (layer.self_attn.in_proj, layer.self_attn.out_proj)
        projections += (layer.gating.linear_in, layer.gating.linear_out)
        assert all(isinstance(p, W4A8Linear) for p in projections)
