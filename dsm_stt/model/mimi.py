"""The Mimi encoder: 24 kHz audio → ``num_codebooks`` discrete codes per 80 ms frame.

Owns the encoder path of Kyutai's Mimi codec (spec §1.3, §1.6, §3) and its explicit streaming
state: SEANet (causal convs, residual blocks, ELU) → encoder transformer at 25 Hz (two positions
per frame over a ring KV cache of ``context`` entries) → learnt stride-2 downsampling conv →
split residual vector quantizer (semantic codebook + acoustic residual stages).

The streaming form *is* the definition (spec §3.3): audio is always encoded one 1920-sample frame
at a time, and ``encode`` of a whole signal is the same frame-by-frame computation from a fresh
state. All per-slot state lives in ``MimiState`` (preallocated once, reset by mask); the modules
hold weights only. Parameter names equal the official checkpoint keys after
``checkpoint.convert_mimi_tensors`` (codebooks stored as ``_codebook.embedding``).

Deliberately absent: the decoder and the upsampling conv (STT never turns codes back into audio;
the quantizer's output projections are loaded but unused), training-time codebook statistics, and
any resampling of the input (callers deliver 24 kHz).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import SAMPLE_RATE, MimiConfig
from .transformer import KVCache, MimiLayer, Transformer


class MimiInputError(ValueError):
    """Audio given to the Mimi encoder has the wrong rate, shape, dtype or batch size."""


# --------------------------------------------------------------------------------------------
# state


@dataclass
class MimiState:
    """Streaming state of ``B`` slots; allocate with ``MimiEncoder.allocate_state``."""

    conv_buffers: list[Tensor]  # one [B, C_in, P] per SEANet conv, in order (P may be 0)
    kv: KVCache  # encoder transformer
    downsample_buffer: Tensor  # [B, D, P] left context of the downsampling conv
    first: Tensor  # [B] bool: the downsampling conv has not seen a frame yet

    @property
    def batch_size(self) -> int:
        return self.first.shape[0]

    def prefix(self, n: int) -> MimiState:
        """The first ``n`` slots, as views sharing this state's memory."""
        return MimiState(
            [b[:n] for b in self.conv_buffers],
            self.kv.prefix(n),
            self.downsample_buffer[:n],
            self.first[:n],
        )

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s stream into slot ``dst`` (``src`` keeps a copy)."""
        for buf in (*self.conv_buffers, self.downsample_buffer, self.first):
            buf[dst].copy_(buf[src])
        self.kv.move(src, dst)

    def reset(self, mask: Tensor) -> None:
        """Start a fresh stream in every slot where ``mask`` [B] (bool) is true."""
        for buf in (*self.conv_buffers, self.downsample_buffer):
            buf.masked_fill_(mask[:, None, None], 0.0)
        self.first.masked_fill_(mask, True)
        self.kv.reset(mask)


# --------------------------------------------------------------------------------------------
# convolutions


class _Conv(nn.Module):
    """Holds the ``conv`` of a causal conv; mirrors the checkpoint's ``conv.conv`` nesting."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv


class CausalConv1d(nn.Module):
    """Conv1d with causal left context ``P = (k - 1) * dilation + 1 - stride`` kept in a
    per-slot buffer, so that chunks of a stream give the same output as the whole stream."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.conv = _Conv(
            nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, bias=bias)
        )
        self.in_channels = in_channels
        self.stride = stride
        self.context = (kernel_size - 1) * dilation + 1 - stride

    def step(self, x: Tensor, buffer: Tensor, active: Tensor) -> Tensor:
        """``x`` [B, C_in, T] with T a multiple of the stride; updates ``buffer`` [B, C_in, P]
        in place for active slots only."""
        if self.context == 0:
            return self.conv.conv(x)
        x = torch.cat([buffer, x], dim=-1)
        buffer.copy_(torch.where(active[:, None, None], x[..., -self.context :], buffer))
        kernel = self.conv.conv.kernel_size[0]
        outputs = (x.shape[-1] - kernel) // self.stride + 1
        if self._as_product(outputs):
            return self._strided(x)
        return self.conv.conv(x)

    def _as_product(self, outputs: int) -> bool:
        """Whether a step with ``outputs`` output positions takes ``_strided``."""
        return self.stride > 1 and outputs <= 16 and self.conv.conv.dilation == (1,)

    def _strided(self, x: Tensor) -> Tensor:
        # A strided conv with few output steps as one matrix product of its windows: oneDNN's
        # direct convolution is up to 5x slower at these shapes (wide kernels, 2 to 16
        # outputs); with more outputs, gathering the windows costs more than it saves.
        conv = self.conv.conv
        out_channels, _, kernel = conv.weight.shape
        windows = x.unfold(-1, kernel, self.stride).transpose(1, 2)  # [B, T, C_in, k]
        B, T = windows.shape[:2]
        y = torch.mm(windows.reshape(B * T, -1), conv.weight.reshape(out_channels, -1).t())
        if conv.bias is not None:
            y = y + conv.bias
        return y.view(B, T, out_channels).transpose(1, 2)


class ResidualBlock(nn.Module):
    """SEANet residual unit: ``x + conv_1x1(elu(conv_k(elu(x))))`` (identity skip)."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int) -> None:
        super().__init__()
        hidden = dim // compress
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                CausalConv1d(dim, hidden, kernel_size, dilation=dilation),
                nn.ELU(),
                CausalConv1d(hidden, dim, 1),
            ]
        )


class SEANetEncoder(nn.Module):
    """Waveform [B, 1, T] → latent [B, dimension, T / hop_length]; layers in checkpoint order."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        mult = 1
        layers: list[nn.Module] = [CausalConv1d(cfg.channels, cfg.n_filters, cfg.kernel_size)]
        for ratio in reversed(cfg.ratios):
            width = mult * cfg.n_filters
            for j in range(cfg.n_residual_layers):
                layers.append(
                    ResidualBlock(
                        width, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress
                    )
                )
            layers += [nn.ELU(), CausalConv1d(width, 2 * width, 2 * ratio, stride=ratio)]
            mult *= 2
        layers += [
            nn.ELU(),
            CausalConv1d(mult * cfg.n_filters, cfg.dimension, cfg.last_kernel_size),
        ]
        self.model = nn.ModuleList(layers)

    def convs(self) -> list[CausalConv1d]:
        """Every causal conv in forward order (the order of ``MimiState.conv_buffers``)."""
        return [m for m in self.model.modules() if isinstance(m, CausalConv1d)]

    def step(self, x: Tensor, buffers: list[Tensor], active: Tensor) -> Tensor:
        # Every tensor here but the block inputs (kept for the skip) is a fresh result of this
        # step, so the activations and sums overwrite their inputs: the same operations, with
        # no new buffers of up to B x 64 x 1920 floats each.
        it = iter(buffers)
        for layer in self.model:
            if isinstance(layer, CausalConv1d):
                x = layer.step(x, next(it), active)
            elif isinstance(layer, ResidualBlock):
                y = x
                for sub in layer.block:
                    if isinstance(sub, CausalConv1d):
                        y = sub.step(y, next(it), active)
                    else:
                        y = F.elu(y, sub.alpha, inplace=y is not x)
                x = y.add_(x)
            else:
                x = F.elu(x, layer.alpha, inplace=True)
        return x


class Downsample(nn.Module):
    """Learnt causal conv, kernel ``2 * stride``, from 25 Hz to 12.5 Hz. Its left context starts
    as copies of the stream's first latent frame ("replicate" padding, as the Python reference;
    moshi-server zero-fills it instead, which only changes the first code frame)."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = CausalConv1d(dim, dim, 2 * stride, stride=stride, bias=False)

    def step(self, x: Tensor, buffer: Tensor, first: Tensor, active: Tensor) -> Tensor:
        init = first & active
        buffer.copy_(torch.where(init[:, None, None], x[..., :1].expand_as(buffer), buffer))
        first.copy_(first & ~active)
        return self.conv.step(x, buffer, active)


# --------------------------------------------------------------------------------------------
# quantizer


class _Codebook(nn.Module):
    def __init__(self, bins: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embedding", torch.randn(bins, dim))  # [bins, dim]


class _VQLayer(nn.Module):
    def __init__(self, bins: int, dim: int) -> None:
        super().__init__()
        self._codebook = _Codebook(bins, dim)


class _VQStack(nn.Module):
    def __init__(self, n_q: int, bins: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_VQLayer(bins, dim) for _ in range(n_q)])


class ResidualVQ(nn.Module):
    """1×1 input projection, then residual nearest-codebook-vector stages.

    ``output_proj`` (codes back to the latent) is unused by the encoder; it is held only so that
    the quantizer's weights load strictly under their official names.
    """

    def __init__(self, n_q: int, in_dim: int, dim: int, bins: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(in_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, in_dim, 1, bias=False)
        self.vq = _VQStack(n_q, bins, dim)

    def encode(self, latent: Tensor) -> Tensor:
        """``latent`` [B, D, 1] → codes [B, n_q]; ties go to the lowest index."""
        return self.search(self.input_proj(latent)[..., 0])

    def search(self, residual: Tensor) -> Tensor:
        """``residual`` [B, dim] → codes [B, n_q]: at each stage the nearest codebook entry,
        whose vector is taken off the residual for the next stage."""
        ones = residual.new_ones(residual.shape[0], 1)
        codes = []
        for layer, augmented in zip(self.vq.layers, self._augmented_books(), strict=True):
            code = _euclidean_distances(residual, ones, augmented).argmin(dim=-1)  # [B]
            residual = residual - F.embedding(code, layer._codebook.embedding)
            codes.append(code)
        return torch.stack(codes, dim=1)

    def _augmented_books(self) -> list[Tensor]:
        """``[book, 1, |book|²]`` per stage ([bins, dim + 2]), rebuilt only when a codebook
        changed (loading writes the buffers in place, which bumps their version)."""
        books = [layer._codebook.embedding for layer in self.vq.layers]
        key = tuple((b.data_ptr(), b._version, b.device, b.dtype) for b in books)
        if getattr(self, "_augmented_key", None) != key:
            self._augmented = [
                torch.cat([b, b.new_ones(b.shape[0], 1), b.pow(2).sum(-1, keepdim=True)], -1)
                for b in books
            ]
            self._augmented_key = key
        return self._augmented


def _euclidean_distances(x: Tensor, ones: Tensor, augmented: Tensor) -> Tensor:
    """Distances [B, bins] from ``x`` [B, dim] to every codebook entry, bit for bit what
    ``torch.cdist`` computes for these sizes (its matrix-product form, with ``[-2x, |x|², 1]``
    against ``[book, 1, |book|²]``), with the codebook half precomputed."""
    lhs = torch.cat([x.mul(-2), x.pow(2).sum(-1, keepdim=True), ones], dim=-1)
    return lhs[None].matmul(augmented[None].mT)[0].clamp_min_(1e-30).sqrt_()


class SplitResidualVQ(nn.Module):
    """One semantic codebook plus ``num_codebooks - 1`` acoustic residual stages, both fed the
    same latent (the acoustic stages do not see the semantic residual)."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.rvq_first = ResidualVQ(1, cfg.dimension, cfg.quantizer_dim, cfg.quantizer_bins)
        self.rvq_rest = ResidualVQ(
            cfg.num_codebooks - 1, cfg.dimension, cfg.quantizer_dim, cfg.quantizer_bins
        )

    def encode(self, latent: Tensor) -> Tensor:
        """``latent`` [B, D, 1] → codes [B, K]."""
        first = self.rvq_first.encode(latent)
        if not len(self.rvq_rest.vq.layers):
            return first
        return torch.cat([first, self.rvq_rest.encode(latent)], dim=1)


# --------------------------------------------------------------------------------------------
# the encoder


class _EncoderTransformer(nn.Module):
    """Holds the ``transformer``; mirrors the checkpoint's ``encoder_transformer.transformer``."""

    def __init__(self, transformer: Transformer) -> None:
        super().__init__()
        self.transformer = transformer


class MimiEncoder(nn.Module):
    """Mimi's encoder path. ``step`` encodes one frame for every slot in one batched call."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        dim = cfg.dimension
        self.encoder = SEANetEncoder(cfg)
        layers = [
            MimiLayer(
                dim,
                cfg.num_heads,
                cfg.dim_feedforward,
                cfg.context,
                cfg.max_period,
                cfg.layer_scale,
            )
            for _ in range(cfg.num_layers)
        ]
        self.encoder_transformer = _EncoderTransformer(
            Transformer(
                layers,
                num_heads=cfg.num_heads,
                head_dim=dim // cfg.num_heads,
                context=cfg.context,
                max_period=cfg.max_period,
            )
        )
        self.downsample = Downsample(dim, cfg.downsample_stride)
        self.quantizer = SplitResidualVQ(cfg)

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    @property
    def num_codebooks(self) -> int:
        return self.cfg.num_codebooks

    def allocate_state(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> MimiState:
        """Zeroed state for ``batch_size`` fresh streams (fp32, on the weights' device)."""
        if device is None:
            device = self.downsample.conv.conv.conv.weight.device
        buffers = [
            torch.zeros(batch_size, c.in_channels, c.context, device=device)
            for c in self.encoder.convs()
        ]
        ds = self.downsample.conv
        return MimiState(
            conv_buffers=buffers,
            kv=self.encoder_transformer.transformer.allocate_cache(batch_size, device),
            downsample_buffer=torch.zeros(batch_size, ds.in_channels, ds.context, device=device),
            first=torch.ones(batch_size, dtype=torch.bool, device=device),
        )

    @torch.no_grad()
    def step(self, pcm: Tensor, state: MimiState, active: Tensor) -> Tensor:
        """Encode one frame ``pcm`` [B, 1, frame_size] (float) → codes [B, K] (long).

        Slots with ``active`` [B] false compute garbage codes and leave their state untouched.
        """
        B = state.batch_size
        if not pcm.is_floating_point():
            raise MimiInputError(f"audio must be floating point, got dtype {pcm.dtype}")
        expected = (B, self.cfg.channels, self.frame_size)
        if pcm.dim() != 3 or pcm.shape[1:] != expected[1:]:
            raise MimiInputError(
                f"a Mimi step takes one frame of shape [B, {expected[1]}, "
                f"{expected[2]}], got {list(pcm.shape)}"
            )
        if active.dtype != torch.bool:
            raise MimiInputError(f"'active' must be a bool mask, got dtype {active.dtype}")
        if pcm.shape[0] != B or active.shape != (B,):
            raise MimiInputError(
                f"batch mismatch: state has {B} slots, got audio for "
                f"{pcm.shape[0]} and an active mask of shape {list(active.shape)}"
            )
        x = self.encoder.step(pcm.float(), state.conv_buffers, active)  # [B, D, 2]
        x = self.encoder_transformer.transformer.step(x.transpose(1, 2), state.kv, active)
        x = self.downsample.step(
            x.transpose(1, 2), state.downsample_buffer, state.first, active
        )  # [B, D, 1]
        return self.quantizer.encode(x)

    def encode_chunk(self, pcm: Tensor, state: MimiState, active: Tensor | None = None) -> Tensor:
        """Encode a chunk of whole frames [B, 1, n * frame_size] → codes [B, K, n]."""
        n, rest = divmod(pcm.shape[-1], self.frame_size)
        if rest:
            raise MimiInputError(
                f"chunk length must be a multiple of {self.frame_size} samples, got {pcm.shape[-1]}"
            )
        if active is None:
            active = torch.ones(state.batch_size, dtype=torch.bool, device=pcm.device)
        if n == 0:
            return torch.empty(
                state.batch_size, self.num_codebooks, 0, dtype=torch.long, device=pcm.device
            )
        frames = pcm.split(self.frame_size, dim=-1)
        return torch.stack([self.step(frame, state, active) for frame in frames], dim=-1)

    def encode(self, pcm: Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
        """Encode whole signals → codes [B, K, T] with ``T = ceil(N / frame_size)``.

        ``pcm`` is [B, 1, N], [B, N] or [N] float audio at ``cfg.sample_rate``. The tail is
        padded with zeros to a whole frame; the result equals streaming the same audio.
        """
        if sample_rate != self.cfg.sample_rate:
            raise MimiInputError(
                f"Mimi expects {self.cfg.sample_rate} Hz audio, got "
                f"{sample_rate} Hz (resample first)"
            )
        if not isinstance(pcm, Tensor) or not pcm.is_floating_point():
            raise MimiInputError(
                "audio must be a floating point tensor, got "
                f"{getattr(pcm, 'dtype', type(pcm).__name__)}"
            )
        if pcm.dim() == 1:
            pcm = pcm[None, None]
        elif pcm.dim() == 2:
            pcm = pcm[:, None]
        if pcm.dim() != 3 or pcm.shape[1] != self.cfg.channels:
            raise MimiInputError(
                f"audio must be [B, {self.cfg.channels}, N], [B, N] or [N], "
                f"got shape {list(pcm.shape)}"
            )
        pad = -pcm.shape[-1] % self.frame_size
        pcm = F.pad(pcm, (0, pad))
        state = self.allocate_state(pcm.shape[0], pcm.device)
        return self.encode_chunk(pcm, state)
