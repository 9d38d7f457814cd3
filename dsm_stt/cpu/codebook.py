"""Mimi's residual codebook search in one compiled call.

Owns ``CompiledResidualVQ``: a ``model.mimi.ResidualVQ`` whose ``search`` runs the same PyTorch
operations in the same order inside one C++ call (``kernels.ops.vq_encode``), so the codes are
the same bit for bit, without a return to Python between the 32 stages (about 1 ms a step at
one slot); and ``KernelResidualVQ``, whose search computes the distances in this package's own
AVX2 code (``kernels.ops.vq_search``): the codebooks stream at close to the memory bandwidth
(32 stages at one slot: 3.1 against 9.8 ms on a 2-core AVX2 EPYC), the dot products summed in
another order, so the codes equal the float path's except where two distances lie within
float32 rounding (``bench/agreement.py`` counts them). ``install.install`` swaps one of them
in for both of Mimi's quantizer halves; the input projection and codebooks are shared, not
copied, so the checkpoint's key names stay.
"""

from __future__ import annotations

from torch import Tensor

from ..model.mimi import ResidualVQ
from .kernels.ops import vq_encode, vq_search


class CompiledResidualVQ(ResidualVQ):
    """``rvq`` with the compiled search (CPU tensors; other devices take the module path)."""

    def __init__(self, rvq: ResidualVQ) -> None:
        super(ResidualVQ, self).__init__()  # nn.Module's: the submodules are rvq's own
        self.input_proj = rvq.input_proj
        self.output_proj = rvq.output_proj
        self.vq = rvq.vq

    def search(self, residual: Tensor) -> Tensor:
        if residual.device.type != "cpu" or not len(self.vq.layers):
            return super().search(residual)
        books = [layer._codebook.embedding for layer in self.vq.layers]
        return vq_encode(residual, self._augmented_books(), books)


class KernelResidualVQ(CompiledResidualVQ):
    """``rvq`` with the AVX2 distance search (float32 CPU tensors; others take the module
    path). The squared norms of the codebooks are computed again when a codebook changes."""

    def search(self, residual: Tensor) -> Tensor:
        if residual.device.type != "cpu" or not len(self.vq.layers):
            return ResidualVQ.search(self, residual)
        books = [layer._codebook.embedding for layer in self.vq.layers]
        key = tuple((b.data_ptr(), b._version) for b in books)
        if getattr(self, "_norms_key", None) != key:
            self._books = [b.float().contiguous() for b in books]
            self._norms = [b.pow(2).sum(-1) for b in self._books]
            self._norms_key = key
        return vq_search(residual, self._books, self._norms)
