"""int8 quantization of the LM's transformer projections (weight-only, or weights and activations).

Owns two linear forms and the functions that swap every projection of every LM layer (fused
QKV, attention output, gated FFN in and out) for one of them, in place:

- ``Int8Linear`` / ``quantize_lm_int8``: int8 weights with one scale per output channel,
  activations kept in the model's dtype (weight-only; any device).
- ``W4A8Linear`` / ``quantize_lm_w4a8`` (opt-in, ``--quantize w4a8``): int4 weights (-7..7)
  with one scale per output row and 64 inputs, activations as in w8a8, on this package's
  AVX2 kernel only: half the weight bytes of int8 (plus an eighth for the scales), so about
  1.6x int8's speed for one row, at a larger error (``bench/agreement.py``).
- ``W8A8Linear`` / ``quantize_lm_w8a8``: the same int8 weights, and each activation row
  quantized to 8 (or 7) bits on the fly, so the product runs on the CPU's integer dot-product
  units (PyTorch's fbgemm or oneDNN kernels, or this package's AMX / AVX512-VNNI kernels; CPU
  only). Each row is scaled to ``max |x| = 1``
  before a fixed quantization grid, so a row's result never depends on the values of the other
  rows of the batch.

The embeddings, norms and output heads stay in the model's dtype: they are a small share of the
bytes read per step and the heads decide the tokens.

Why: one LM step at small batch reads every weight once, so it is bound by memory bandwidth;
int8 halves the bytes of bf16. At larger batch the products become compute-bound: weight-only
int8 then loses to bf16 matrix units, while w8a8 runs on the integer units (AMX tiles with
oneDNN). Both move the logits a little (``bench/agreement.py``): ``plan.py`` picks w8a8 for
``auto`` on CPUs where it was measured fastest, and ``--exact`` keeps the float path. Quantization is symmetric per output row: ``w ≈ scale[n] * q[n, k]`` with
``scale = max|w[n]| / 127``.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

from ..model.lm import LM
from .features import CpuFeatures, detect
from .kernels.ops import (
    amx_linear,
    amx_pack,
    amx_problem,
    avx2_int4_linear,
    avx2_linear,
    avx2_problem,
    int4_pack,
    vnni_linear,
    vnni_problem,
)


class Int8Linear(nn.Module):
    """``y = x @ (scales[:, None] * weight).T`` with ``weight`` int8 [N, K]."""

    def __init__(self, weight: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, weight: Tensor) -> Int8Linear:
        """Quantize a float weight [N, K]; the scales take the weight's dtype."""
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales.to(weight.dtype))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, scales)
        return y.view(*x.shape[:-1], self.out_features)


W8A8_KERNELS = ("fbgemm", "onednn", "amx", "vnni", "avx2")
OWN_KERNELS = ("amx", "vnni", "avx2")  # this package's compiled kernels, fastest first
_OWN_PROBLEMS = {"amx": amx_problem, "vnni": vnni_problem, "avx2": avx2_problem}


class W8A8Linear(nn.Module):
    """``y ≈ x @ w.T`` with int8 weights (per output row) and int8 activations (per input row).

    Each row of ``x`` is divided by its largest magnitude ``m``, quantized on the fixed grid
    ``[-1, 1]`` (``2 ** bits - 1`` levels, zero point in the middle), multiplied with the int8
    weights in integer arithmetic, and the result multiplied back by ``m``. ``bits=7`` keeps the
    pairwise products of CPUs without VNNI (``vpmaddubsw``) from saturating; the default is
    what ``activation_bits`` says ``kernel`` computes exactly on this CPU.

    Five CPU kernels compute the integer product: ``fbgemm`` (PyTorch's quantized linear,
    which also quantizes the input), ``onednn`` (oneDNN's int8 GEMM, which uses AMX tiles from
    a few rows on: about 2.5x fbgemm's speed at 32 rows, a little slower at one), ``amx``
    (``kernels.amx_linear``, this package's own AMX kernel, compiled on first use: the weights
    stream once per call at close to the memory bandwidth, 1.4-1.7x oneDNN's speed at 1 to 64
    rows) and ``vnni`` (``kernels.vnni_linear``, the same packed weights on AVX512-VNNI, for
    CPUs without AMX; ``amx`` also hands it single rows, which it streams faster) and ``avx2``
    (``kernels.avx2_linear``, the same packed weights on AVX2 for CPUs without AVX-512, 8-bit
    activations through ``vpsignb`` / ``vpmaddubsw``, which never saturate with both operands
    within +-127: one row streams the weights at close to the memory bandwidth, about twice
    fbgemm's speed). All get the same int8 weights and the same activation grid; ``amx``,
    ``vnni`` and ``avx2`` give identical results.
    """

    def __init__(self, weight: Tensor, bits: int | None = None, kernel: str = "fbgemm") -> None:
        super().__init__()
        bits = activation_bits(kernel) if bits is None else bits
        if bits not in (7, 8):
            raise ValueError(f"activation bits must be 7 or 8, got {bits}")
        if kernel not in W8A8_KERNELS:
            raise ValueError(
                f"w8a8 kernel must be one of {', '.join(W8A8_KERNELS)}, got {kernel!r}"
            )
        if weight.device.type != "cpu":
            raise ValueError("w8a8 runs on CPU only (PyTorch's fbgemm and oneDNN int8 kernels)")
        self.out_features, self.in_features = weight.shape
        self.bits = bits
        self.kernel = kernel
        self.levels = 2 ** (bits - 1) - 1  # the grid's steps on each side of zero
        self.x_scale = 1.0 / self.levels
        self.x_zero_point = self.levels + 1
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        zero_points = torch.zeros(w.shape[0], dtype=torch.long)
        if kernel in OWN_KERNELS:
            problem = _OWN_PROBLEMS[kernel]()
            if problem is not None:
                raise RuntimeError(f"w8a8 kernel {kernel}: {problem}")
            # the AMX tiles' packing serves both, and the column sums are the VNNI product's
            # offset (which also takes the one-row products of ``amx``)
            self.packed = amx_pack(q)
            self.column_sums = q.sum(dim=1, dtype=torch.int32)
        elif kernel == "onednn":
            self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        else:
            with warnings.catch_warnings():
                # quantized tensors are only the packing routine's input; they are not kept
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(q, scales.double(), zero_points, 0)
                self.packed = torch.ops.quantized.linear_prepack(qw, None)
        # float32 whatever ``.to(dtype)`` the model gets later (the kernel requires it), so a
        # plain attribute; the integer zero points are a buffer for ``.device`` queries
        self.scales = scales
        self.register_buffer("zero_points", zero_points)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        # this package's kernels quantize each row and scale it back inside the kernel
        own = {"amx": amx_linear, "vnni": vnni_linear, "avx2": avx2_linear}.get(self.kernel)
        if own is not None:
            y = own(
                flat, self.packed, self.scales, self.out_features, self.levels, self.column_sums
            )
        else:
            y = self._torch_product(flat)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _torch_product(self, flat: Tensor) -> Tensor:
        """float32 [M, K] → float32 [M, N] through PyTorch's fbgemm or oneDNN kernel."""
        m = flat.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)
        if self.kernel == "onednn":
            qx = flat.div(m).mul_(self.levels).round_().add_(self.x_zero_point).to(torch.uint8)
            y = torch.ops.onednn.qlinear_pointwise(
                qx,
                self.x_scale,
                self.x_zero_point,
                self.packed,
                self.scales,
                self.zero_points,
                None,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            )
        else:
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                flat / m, self.x_scale, self.x_zero_point, self.packed
            )
        return y.mul_(m)


class W4A8Linear(nn.Module):
    """``y ≈ x @ w.T`` with int4 weights and int8 activations, on this package's AVX2 kernel
    (``kernels.avx2_int4_linear``). Each output row's weights are split into groups of 64
    inputs, each quantized to ``round(w / s)`` in -7..7 with ``s = max|w| / 7`` of its group;
    each activation row as ``W8A8Linear`` with 8 bits does (``levels`` 127). The kernel sums
    each group exactly in int32, scales it in float32 and adds the groups in order. Same
    attributes as ``W8A8Linear`` where the fused layer step reads them (``packed``, ``scales``
    (per group here), ``out_features``, ``column_sums`` (none), ``levels``, ``kernel``)."""

    GROUP = 64
    kernel = "avx2_int4"
    bits = 8

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError("w4a8 runs on CPU only (this package's AVX2 kernel)")
        problem = avx2_problem()
        if problem is not None:
            raise RuntimeError(f"w4a8 kernel: {problem}")
        self.out_features, self.in_features = weight.shape
        self.levels = 127
        q, group_scales = self.quantize(weight)
        self.packed, self.scales = int4_pack(q, group_scales)
        self.column_sums = torch.empty(0, dtype=torch.int32)
        self.register_buffer("zero_points", torch.zeros(0, dtype=torch.long))  # for .device

    @classmethod
    def quantize(cls, weight: Tensor) -> tuple[Tensor, Tensor]:
        """int4 values int8 [N, K] and their scales float32 [N, ceil(K / 64)]."""
        w = weight.detach().float()
        N, K = w.shape
        groups = -(-K // cls.GROUP)
        padded = w.new_zeros(N, groups * cls.GROUP)
        padded[:, :K] = w
        g = padded.view(N, groups, cls.GROUP)
        scales = g.abs().amax(dim=-1).clamp_min(1e-12) / 7.0
        q = torch.round(g / scales[..., None]).clamp_(-7, 7).view(N, -1)[:, :K]
        return q.to(torch.int8).contiguous(), scales

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        y = avx2_int4_linear(flat, self.packed, self.scales, self.out_features, self.levels)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def activation_bits(kernel: str, features: CpuFeatures | None = None) -> int:
    """The activation grid ``kernel`` computes without saturating on this CPU: 8 bits where
    the integer products accumulate u8 x s8 pairs in 32 bits (``vpdpbusd``: this package's
    ``amx`` and ``vnni`` kernels always, and its ``avx2`` kernel adds sign-adjusted pairs that
    cannot saturate; fbgemm and oneDNN on AVX512-VNNI, where they use it), else 7. Without VNNI both libraries use ``vpmaddubsw``, which adds two u8 x s8 products
    into a saturating int16: 2 x 255 x 127 = 64770 overflows 32767, while 7-bit activations
    (at most 2 x 127 x 127 = 32258) never do."""
    features = detect() if features is None else features
    if kernel in OWN_KERNELS or features.vnni:
        return 8
    if kernel == "onednn" and features.has("avx_vnni"):
        return 8
    return 7


def int8_supported(device_type: str) -> bool:
    """Whether this PyTorch build has the weight-only int8 kernel for ``device_type``
    (CPU and MPS builds do; CUDA has none, and bf16 is the better choice there anyway)."""
    key = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}.get(device_type)
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return key is not None and has_kernel("aten::_weight_int8pack_mm", key)


def w8a8_kernels(own: bool = True) -> tuple[str, ...]:
    """The ``W8A8Linear`` kernels that run here; ``own=False`` leaves this package's compiled
    kernels out, so nothing gets built."""
    return tuple(
        k for k in W8A8_KERNELS if (own or k not in OWN_KERNELS) and w8a8_kernel_problem(k) is None
    )


@functools.cache
def w8a8_kernel_problem(kernel: str) -> str | None:
    """None when ``kernel`` runs here (tried once, on a tiny product; this package's kernels
    are built for it), else why not."""
    if kernel in OWN_KERNELS:
        problem = _OWN_PROBLEMS[kernel]()
        if problem is not None:
            return problem
    try:
        W8A8Linear(torch.ones(2, 8), kernel=kernel)(torch.ones(1, 8))
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        return f"the {kernel} kernel does not run in this PyTorch build ({str(exc)[:200]})"
    return None


def w8a8_available() -> bool:
    """Whether this PyTorch build has one of the CPU int8 kernels ``W8A8Linear`` needs
    (fbgemm or oneDNN; this package's own kernels are not tried)."""
    return bool(w8a8_kernels(own=False))


def _swap_projections(lm: LM, make) -> LM:
    for layer in lm.transformer.layers:
        attn = layer.self_attn
        attn.set_in_proj(make(attn.in_proj_weight))
        attn.out_proj = make(attn.out_proj.weight)
        ffn = layer.gating
        ffn.linear_in = make(ffn.linear_in.weight)
        ffn.linear_out = make(ffn.linear_out.weight)
    return lm


def quantize_lm_int8(lm: LM) -> LM:
    """Replace the LM layers' projections by ``Int8Linear`` (in place; returns ``lm``).
    An LM that is already int8-quantized is returned as it is; a device whose PyTorch build
    has no int8 kernel is refused."""
    if any(isinstance(m, Int8Linear) for m in lm.modules()):
        return lm
    if is_quantized(lm):
        raise ValueError("the LM is already quantized (w8a8)")
    device = lm.device.type
    if not int8_supported(device):
        raise ValueError(
            f"quantize int8: this PyTorch build has no int8 kernel for {device} "
            "(use none on this device)"
        )
    return _swap_projections(lm, Int8Linear.from_float)


def quantize_lm_w8a8(lm: LM, bits: int | None = None, kernel: str | None = None) -> LM:
    """Replace the LM layers' projections by ``W8A8Linear`` with ``bits``-bit activations
    computed by ``kernel`` (default: the first of ``w8a8_kernels()``), in place; returns
    ``lm``. The LM must be on the CPU; one that is already w8a8 with these settings is returned
    as it is (with others, refused: the float weights are gone). ``activation_bits`` says
    which ``bits`` a kernel computes exactly on this CPU."""
    done = [m for m in lm.modules() if isinstance(m, W8A8Linear)]
    if done:
        have = (done[0].bits, done[0].kernel)
        # no bits or kernel asked for: any will do
        if have == (bits or have[0], kernel or have[1]):
            return lm
        raise ValueError(
            f"the LM is already quantized (w8a8, {have[0]}-bit activations, {have[1]} kernel)"
        )
    if is_quantized(lm):
        raise ValueError("the LM is already quantized (int8)")
    if lm.device.type != "cpu":
        raise ValueError(f"quantize w8a8 runs on CPU only, not {lm.device.type}")
    if kernel is None:
        available = w8a8_kernels(own=False)
        if not available:
            raise ValueError(
                "quantize w8a8: this PyTorch build has no fbgemm or oneDNN int8 kernels"
            )
        kernel = available[0]
    if kernel not in W8A8_KERNELS:
        raise ValueError(f"w8a8 kernel must be one of {', '.join(W8A8_KERNELS)}, got {kernel!r}")
    problem = w8a8_kernel_problem(kernel)
    if problem is not None:
        raise ValueError(f"quantize w8a8: {problem}")
    bits = activation_bits(kernel) if bits is None else bits
    _swap_projections(lm, lambda w: W8A8Linear(w, bits, kernel))
    return lm


def quantize_lm_w4a8(lm: LM) -> LM:
    """Replace the LM layers' projections by ``W4A8Linear`` (in place; returns ``lm``; one
    already w4a8 is returned as it is). CPU with AVX2 and the compiled kernels only."""
    if any(isinstance(m, W4A8Linear) for m in lm.modules()):
        return lm
    if is_quantized(lm):
        raise ValueError("the LM is already quantized (int8 or w8a8)")
    if lm.device.type != "cpu":
        raise ValueError(f"quantize w4a8 runs on CPU only, not {lm.device.type}")
    problem = avx2_problem()
    if problem is not None:
        raise ValueError(f"quantize w4a8: {problem}")
    return _swap_projections(lm, W4A8Linear)


def is_quantized(lm: LM) -> bool:
    return any(isinstance(m, (Int8Linear, W8A8Linear, W4A8Linear)) for m in lm.modules())
