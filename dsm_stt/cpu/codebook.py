"""Mimi's residual codebook search in one compiled call.

Owns ``CompiledResidualVQ``: a ``model.mimi.ResidualVQ`` whose ``search`` runs the same PyTorch
operations in the same order inside one C++ call (``kernels.ops.vq_encode``), so the codes are
the same bit for bit, without a return to Python between the 32 stages (about 1 ms a step at
one slot). ``install.install`` swaps it in for both of Mimi's quantizer halves; the input
projection and codebooks are shared, not copied, so the checkpoint's key names stay.
"""

from __future__ import annotations

from torch import Tensor

from ..model.mimi import ResidualVQ
from .kernels.ops import vq_encode


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
