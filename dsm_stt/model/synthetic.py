"""Synthetic checkpoints: random-weight models and checkpoint directories in the official layout.

Owns the basis of ``--random-weights`` (any known architecture built with random weights and a
placeholder tokenizer, with no download), a tiny architecture for tests, and
``write_checkpoint``, which saves a model in the exact file layout of the published repos
(``config.json``, ``model.safetensors`` in bf16 with official key names and [1,1,D] norm gains,
the Mimi file with ``embedding_sum``/``cluster_usage`` codebooks, a SentencePiece model).

Random weights carry no meaning: they exercise shapes, speed and plumbing, never accuracy.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import SttModel
from .config import (
    PRESETS,
    LMConfig,
    MimiConfig,
    ModelConfig,
    SttConfig,
    ffn_hidden_dim,
    mimi_config_json,
)
from .tokenizer import PlaceholderTokenizer, SentencePieceTokenizer


def tiny_config(
    context: int = 32,
    vad: bool = True,
    delay_tokens: int = 6,
    prefix_seconds: float = 0.0,
    text_card: int = 64,
) -> ModelConfig:
    """A few-hundred-kB architecture with the real frame size (1920 samples) for tests."""
    lm = LMConfig(
        dim=64,
        num_heads=4,
        num_layers=2,
        hidden_dim=ffn_hidden_dim(64, 4.125),
        context=context,
        text_card=text_card,
        card=64,
        n_q=8,
        extra_heads_num_heads=4 if vad else 0,
    )
    mimi = MimiConfig(
        dimension=32,
        n_filters=4,
        num_heads=2,
        num_layers=2,
        dim_feedforward=64,
        context=10,
        quantizer_dim=16,
        quantizer_n_q=8,
        quantizer_bins=64,
        num_codebooks=8,
    )
    stt = SttConfig(
        audio_delay_seconds=delay_tokens / 12.5,
        audio_silence_prefix_seconds=prefix_seconds,
        asr_delay_in_tokens=delay_tokens,
    )
    return ModelConfig(
        lm=lm,
        mimi=mimi.validate(),
        stt=stt,
        mimi_config_name="mimi.json",
        tokenizer_name="tokenizer_tiny.model",
    )


def architecture(name: str) -> ModelConfig:
    """Config of a known repo id, or ``tiny``."""
    if name == "tiny":
        return tiny_config()
    if name in PRESETS:
        return PRESETS[name]
    raise ValueError(f"unknown architecture {name!r}: use one of tiny, {', '.join(PRESETS)}")


def random_lm(
    cfg: LMConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> torch.nn.Module:
    from .lm import LM

    torch.manual_seed(seed)
    with torch.device(device):
        return LM(cfg).to(dtype).eval()


def random_mimi(
    cfg: MimiConfig, device: torch.device | str = "cpu", seed: int = 1
) -> torch.nn.Module:
    """A Mimi encoder with random weights and random (well-spread) codebooks."""
    from .mimi import MimiEncoder

    torch.manual_seed(seed)
    with torch.device(device):
        model = MimiEncoder(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("_codebook.embedding"):
                buf.normal_(0.0, 1.0)
    return model.eval()


def random_model(
    name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0
) -> SttModel:
    """Any known architecture (repo id or ``tiny``) with random weights, no download."""
    return random_model_for(architecture(name), name, dtype, device, seed)


def random_model_for(
    cfg: ModelConfig,
    name: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> SttModel:
    """The architecture ``cfg`` with random weights and a placeholder tokenizer."""
    return SttModel(
        f"{name} (random weights)",
        cfg,
        random_lm(cfg.lm, dtype, device, seed),
        random_mimi(cfg.mimi, device, seed + 1),
        PlaceholderTokenizer(cfg.lm.text_card),
    )


# --------------------------------------------------------------------------------------------
# writing the official layout


def config_json(cfg: ModelConfig) -> dict:
    """A ``config.json`` in the published format for ``cfg``."""
    lm = cfg.lm
    hidden_scale = 4.125
    if ffn_hidden_dim(lm.dim, hidden_scale) != lm.hidden_dim:
        raise ValueError("config_json: hidden_dim is not expressible with hidden_scale 4.125")
    data = {
        "card": lm.card,
        "n_q": lm.n_q,
        "dep_q": 0,
        "delays": [0] * (lm.n_q + 1),
        "dim": lm.dim,
        "text_card": lm.text_card,
        "existing_text_padding_id": lm.text_padding_id,
        "num_heads": lm.num_heads,
        "num_layers": lm.num_layers,
        "hidden_scale": hidden_scale,
        "causal": True,
        "layer_scale": None,
        "context": lm.context,
        "max_period": lm.max_period,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": 1024,
        "depformer_num_heads": 16,
        "depformer_num_layers": 6,
        "depformer_dim_feedforward": None,
        "depformer_multi_linear": True,
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "conditioners": {},
        "cross_attention": False,
        "lm_gen_config": {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
        "stt_config": {
            "audio_delay_seconds": cfg.stt.audio_delay_seconds,
            "audio_silence_prefix_seconds": cfg.stt.audio_silence_prefix_seconds,
        },
        "model_type": "stt",
        "mimi_name": cfg.mimi_name,
        "tokenizer_name": cfg.tokenizer_name,
    }
    if cfg.stt.asr_delay_in_tokens != SttConfig.delay_tokens_for(cfg.stt.audio_delay_seconds):
        data["stt_config"]["asr_delay_in_tokens"] = cfg.stt.asr_delay_in_tokens
    if cfg.moshi_name != "model.safetensors":
        data["moshi_name"] = cfg.moshi_name
    if lm.extra_heads_num_heads:
        data["extra_heads_num_heads"] = lm.extra_heads_num_heads
        data["extra_heads_dim"] = lm.extra_heads_dim
    if cfg.mimi_config_name:
        data["mimi_config_name"] = cfg.mimi_config_name
    return data


def official_lm_tensors(lm: torch.nn.Module) -> dict[str, Tensor]:
    """Our LM's weights under the official names: bf16, RMSNorm gains as [1, 1, D]."""
    out = {}
    for key, value in lm.state_dict().items():
        value = value.detach().to(torch.bfloat16).contiguous()
        if key.endswith(".alpha"):
            value = value.reshape(1, 1, -1)
        out[key] = value
    return out


def official_mimi_tensors(mimi: torch.nn.Module) -> dict[str, Tensor]:
    """Our encoder's weights under the official names (float32); codebooks as
    ``embedding_sum`` with unit ``cluster_usage``. Decoder tensors are not produced."""
    out = {}
    for key, value in mimi.state_dict().items():
        value = value.detach().float().contiguous()
        if key.endswith("._codebook.embedding"):
            prefix = key[: -len(".embedding")]
            out[f"{prefix}.embedding_sum"] = value
            out[f"{prefix}.cluster_usage"] = torch.ones(value.shape[0])
            out[f"{prefix}._initialized"] = torch.ones(1)
        else:
            out[key] = value
    return out


def train_tokenizer(path: Path, vocab_size: int, seed: int = 0) -> None:
    """Train a small SentencePiece model on generated text (ids 0..3 structural as upstream:
    0 unk, 1 <s>, 2 </s>, 3 pad)."""
    import io

    import sentencepiece

    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    # pieces never cross words: a vocabulary needs a few times as many words
    n = max(400, 3 * vocab_size)
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)]
    sentences = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(max(2000, n))]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=3,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        hard_vocab_limit=True,
        minloglevel=2,
        num_threads=1,
    )
    path.write_bytes(model.getvalue())


def write_checkpoint(
    directory: str | Path,
    cfg: ModelConfig,
    lm: torch.nn.Module,
    mimi: torch.nn.Module,
    with_config: bool = True,
    lm_tensors: dict[str, Tensor] | None = None,
    mimi_tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Save a checkpoint directory in the published layout; returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if with_config:
        (directory / "config.json").write_text(json.dumps(config_json(cfg), indent=2))
    if cfg.mimi_config_name:
        (directory / cfg.mimi_config_name).write_text(json.dumps(mimi_config_json(cfg.mimi)))
    save_file(lm_tensors or official_lm_tensors(lm), str(directory / cfg.moshi_name))
    save_file(mimi_tensors or official_mimi_tensors(mimi), str(directory / cfg.mimi_name))
    train_tokenizer(directory / cfg.tokenizer_name, cfg.lm.text_card)
    return directory


def load_tokenizer(path: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(path)
