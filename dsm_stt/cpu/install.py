"""``install(lm, mimi, plan)``: swaps the accelerated CPU pieces a plan names into a model.

Owns the one place where the model meets this package: the LM's projections quantized (int8
or w8a8), its transformer replaced by the fused one, its float32 text head and Mimi's float32
products by the compiled ones, Mimi's codebook search by a compiled one, and the KV cache type the engine should
allocate. Each swap replaces a module with another
that computes the same function (within the agreement bounds of its precision) and keeps the
checkpoint's parameter names; nothing is patched into the model's own classes. A plan with
nothing to install (``Plan.exact``) leaves the model as it is: the exact float path.
"""

from __future__ import annotations

import torch

from ..model.lm import LM
from ..model.mimi import MimiEncoder
from ..model.transformer import KVCache
from .plan import Plan


def install(lm: LM, mimi: MimiEncoder, plan: Plan) -> type[KVCache]:
    """Apply ``plan`` to ``lm`` and ``mimi`` (already on their device and in their dtype), in
    place; returns the KV cache type to allocate for ``lm``. Installing the same plan twice
    changes nothing the second time."""
    if plan.quantize == "int8":
        from .quantize import quantize_lm_int8

        quantize_lm_int8(lm)
    elif plan.quantize == "w8a8":
        from .quantize import quantize_lm_w8a8

        quantize_lm_w8a8(lm, plan.w8a8_bits or 8, plan.w8a8_kernel)
    elif plan.quantize == "w4a8":
        from .quantize import quantize_lm_w4a8

        quantize_lm_w4a8(lm)
    if plan.fused_layers:
        from .fused import FusedTransformer

        if not isinstance(lm.transformer, FusedTransformer):
            lm.transformer = FusedTransformer(lm.transformer)
    if plan.float_kernels and plan.dtype == torch.float32:
        from .float_linear import PackedLinear

        if not isinstance(lm.text_linear, PackedLinear):
            lm.text_linear = PackedLinear(lm.text_linear.weight)
    install_mimi(mimi, plan)
    if plan.kv_cache == "int8":
        from .kvcache import Int8KVCache

        return Int8KVCache
    return KVCache


def install_mimi(mimi: MimiEncoder, plan: Plan) -> None:
    """The Mimi half of ``install``: its compiled float32 products, layer step and codebook
    search (``plan.float_kernels``) or the bit-exact compiled search (``compiled_codebooks``)."""
    if plan.float_kernels:
        from .float_linear import pack_mimi
        from .mimi_step import FusedMimiTransformer

        pack_mimi(mimi)
        holder = mimi.encoder_transformer
        if not isinstance(holder.transformer, FusedMimiTransformer):
            holder.transformer = FusedMimiTransformer(holder.transformer)
    if plan.compiled_codebooks or plan.float_kernels:
        from .codebook import CompiledResidualVQ, KernelResidualVQ

        search = KernelResidualVQ if plan.float_kernels else CompiledResidualVQ
        quantizer = mimi.quantizer
        for half in ("rvq_first", "rvq_rest"):
            rvq = getattr(quantizer, half)
            if not isinstance(rvq, search):
                setattr(quantizer, half, search(rvq))
