"""Builders for Kyutai's reference modules (package ``moshi==0.2.13``, tests only).

The reference Mimi and LM are built with the hyper-parameters of our configs, given random
weights that make parity checks meaningful, and saved in the published file layout: the
reference modules keep attention weights as ``in_projs.0`` / ``out_projs.0`` and rename the
file's ``in_proj_weight`` / ``out_proj.weight`` with a load hook (spec §1.5, §1.6).
Callers skip when ``moshi`` is not installed (``pytest.importorskip("moshi")``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsm_stt.model.config import LMConfig, MimiConfig


def reference_mimi(cfg: MimiConfig) -> torch.nn.Module:
    from moshi.models.compression import MimiModel
    from moshi.modules.seanet import SEANetDecoder, SEANetEncoder
    from moshi.modules.transformer import ProjectedTransformer
    from moshi.quantization.vq import SplitResidualVectorQuantizer

    seanet = dict(
        channels=1,
        dimension=cfg.dimension,
        causal=True,
        n_filters=cfg.n_filters,
        n_residual_layers=cfg.n_residual_layers,
        activation="ELU",
        compress=cfg.compress,
        dilation_base=cfg.dilation_base,
        disable_norm_outer_blocks=0,
        kernel_size=cfg.kernel_size,
        residual_kernel_size=cfg.residual_kernel_size,
        last_kernel_size=cfg.last_kernel_size,
        norm="none",
        pad_mode="constant",
        ratios=list(cfg.ratios),
        true_skip=True,
    )
    transformer = dict(
        d_model=cfg.dimension,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        causal=True,
        layer_scale=cfg.layer_scale,
        context=cfg.context,
        conv_layout=True,
        max_period=cfg.max_period,
        gating="none",
        norm="layer_norm",
        positional_embedding="rope",
        dim_feedforward=cfg.dim_feedforward,
        input_dimension=cfg.dimension,
        output_dimensions=[cfg.dimension],
    )
    encoder = SEANetEncoder(**seanet)
    model = MimiModel(
        encoder,
        SEANetDecoder(**seanet),
        SplitResidualVectorQuantizer(
            dimension=cfg.quantizer_dim,
            n_q=cfg.quantizer_n_q,
            bins=cfg.quantizer_bins,
            input_dimension=cfg.dimension,
            output_dimension=cfg.dimension,
        ),
        channels=1,
        sample_rate=cfg.sample_rate,
        frame_rate=cfg.frame_rate,
        encoder_frame_rate=cfg.sample_rate / encoder.hop_length,
        causal=True,
        resample_method="conv",
        encoder_transformer=ProjectedTransformer(**transformer),
        decoder_transformer=ProjectedTransformer(**transformer),
    ).eval()
    model.set_num_codebooks(cfg.num_codebooks)
    return model


@torch.no_grad()
def randomize_reference_mimi(ref: torch.nn.Module, seed: int = 2) -> None:
    """Spread SEANet weights (gain 1.5) and give every codebook random, used entries."""
    for conv in ref.encoder.modules():
        if isinstance(conv, torch.nn.Conv1d):
            conv.weight.normal_(0.0, 1.5 / conv.weight[0].numel() ** 0.5)
    g = torch.Generator().manual_seed(seed)
    for stack in (ref.quantizer.rvq_first, ref.quantizer.rvq_rest):
        for layer in stack.vq.layers:
            book = layer._codebook
            book._initialized.fill_(1)
            usage = 0.5 + 2 * torch.rand(book.cluster_usage.shape, generator=g)
            book.cluster_usage.copy_(usage)
            book.embedding_sum.copy_(
                torch.randn(book.embedding_sum.shape, generator=g) * usage[:, None]
            )


def reference_lm(cfg: LMConfig):
    from moshi.models import lm as lm_mod

    ref = lm_mod.LMModel(
        delays=[0] * (cfg.n_q + 1),
        n_q=cfg.n_q,
        dep_q=0,
        card=cfg.card,
        text_card=cfg.text_card,
        dim=cfg.dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        hidden_scale=4.125,
        context=cfg.context,
        max_period=cfg.max_period,
        causal=True,
        layer_scale=None,
        gating="silu",
        norm="rms_norm_f32",
        positional_embedding="rope",
        existing_text_padding_id=cfg.text_padding_id,
        extra_heads_num_heads=cfg.extra_heads_num_heads,
        extra_heads_dim=cfg.extra_heads_dim,
        # present in the published config.json; no tensors when dep_q == 0
        depformer_dim=32,
        depformer_num_heads=2,
        depformer_num_layers=1,
        depformer_multi_linear=True,
        depformer_pos_emb="none",
        depformer_weights_per_step=True,
    )
    assert ref.transformer.layers[0].gating.linear_out.in_features == cfg.hidden_dim
    return ref.eval()


def official_tensors(ref: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A reference module's weights under the published file's names (optionally cast)."""
    out = {}
    for key, value in ref.state_dict().items():
        key = key.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
        key = key.replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    return out
