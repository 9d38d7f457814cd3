from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsm_stt.model.checkpoint import (
    CheckpointError,
    NotCachedError,
    check_available,
    load_lm,
    load_mimi,
    load_model,
    resolve,
)
from dsm_stt.model.config import LMConfig, MimiConfig, ModelConfig, preset
from dsm_stt.model.synthetic import (
    official_lm_tensors,
    official_mimi_tensors,
    random_lm,
    random_mimi,
    write_checkpoint,
)

CANDLE_FILES = {
    "config.json",
    "model.safetensors",
    "mimi-pytorch-e351c8d8@125.safetensors",
    "tokenizer_en_fr_audio_8000.model",
}


def test_tiny_directory_loads_and_matches_weights(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint)
    assert model.config.lm.num_layers == 2
    assert model.config.mimi.dimension == 32
    lm_file = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert lm_file["out_norm.alpha"].shape == (1, 1, 64)  # official layout
    assert lm_file["text_emb.weight"].dtype == torch.bfloat16
    for key, value in model.lm.state_dict().items():
        torch.testing.assert_close(value, lm_file[key].float().reshape(value.shape))
    assert model.tokenizer.vocab_size == model.config.lm.text_card


def test_candle_file_names_load_by_path(tmp_path: Path) -> None:
    """The exact file names of kyutai/stt-1b-en_fr-candle, a small LM with the real codec."""
    lm_cfg = LMConfig(
        dim=64,
        num_heads=4,
        num_layers=2,
        hidden_dim=176,
        context=16,
        text_card=64,
        card=2048,
        n_q=32,
        extra_heads_num_heads=4,
    )
    cfg = ModelConfig(
        lm=lm_cfg, mimi=MimiConfig(), tokenizer_name="tokenizer_en_fr_audio_8000.model"
    )
    mimi = random_mimi(MimiConfig(), seed=3)
    write_checkpoint(tmp_path / "stt", cfg, random_lm(lm_cfg), mimi)
    assert {p.name for p in (tmp_path / "stt").iterdir()} == CANDLE_FILES
    loaded = load_model(tmp_path / "stt")
    assert loaded.config.lm == lm_cfg
    assert loaded.config.mimi == MimiConfig()
    pcm = torch.randn(1, 1, 1920 * 3) * 0.1
    assert torch.equal(loaded.mimi.encode(pcm), mimi.encode(pcm))


def test_directory_without_config_uses_its_preset(tmp_path: Path) -> None:
    """Without config.json the preset is chosen (by directory name or tensor shapes); weights of
    another architecture are then refused with a message naming key and shapes."""
    cfg = preset("kyutai/stt-1b-en_fr-candle")
    d = tmp_path / "stt-1b-en_fr-candle"
    d.mkdir()
    for name in (cfg.moshi_name, cfg.mimi_name, cfg.tokenizer_name):
        (d / name).write_bytes(b"")
    assert resolve(d).config == cfg
    other = tmp_path / "some-dir"
    shutil.copytree(d, other)
    # a header with the 1B's layer count, text vocabulary and VAD heads picks that preset
    fake = {f"transformer.layers.{i}.norm1.alpha": torch.ones(1) for i in range(16)}
    fake["text_linear.weight"] = torch.zeros(8000, 1)
    fake.update({f"extra_heads.{i}.weight": torch.zeros(6, 1) for i in range(4)})
    save_file(fake, str(other / "model.safetensors"))
    assert resolve(other).config == cfg
    with pytest.raises(CheckpointError, match=r"text_emb\.weight"):
        load_lm(other / "model.safetensors", cfg.lm)


@pytest.mark.slow
def test_full_size_1b_without_config_loads_through_preset(tmp_path: Path) -> None:
    cfg = preset("kyutai/stt-1b-en_fr-candle")
    d = tmp_path / "stt-1b-en_fr-candle"
    write_checkpoint(
        d, cfg, random_lm(cfg.lm, dtype=torch.bfloat16), random_mimi(cfg.mimi), with_config=False
    )
    model = load_model(d, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.lm.parameters()) == 989_253_632


def _tiny_tensors(tiny_checkpoint: Path) -> tuple[ModelConfig, dict]:
    cfg = resolve(tiny_checkpoint).config
    return cfg, load_file(str(tiny_checkpoint / "model.safetensors"))


def test_state_dict_errors_name_the_first_offending_key(tiny_checkpoint: Path) -> None:
    cfg, tensors = _tiny_tensors(tiny_checkpoint)
    missing = dict(tensors)
    del missing["transformer.layers.1.gating.linear_in.weight"]
    with pytest.raises(
        CheckpointError,
        match=r"missing weight 'transformer\.layers\.1\.gating"
        r"\.linear_in\.weight' \(expected shape \[352, 64\]\)",
    ):
        load_lm(missing, cfg.lm)
    extra = dict(tensors, **{"depformer.layers.0.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected weight 'depformer\.layers\.0\.weight'"):
        load_lm(extra, cfg.lm)
    wrong = dict(tensors, **{"text_linear.weight": torch.zeros(60, 64)})
    with pytest.raises(
        CheckpointError,
        match=r"'text_linear\.weight' has shape \[60, 64\], "
        r"expected \[64, 64\]",
    ):
        load_lm(wrong, cfg.lm)
    flat = dict(tensors, **{"out_norm.alpha": tensors["out_norm.alpha"].reshape(-1)})
    assert load_lm(flat, cfg.lm) is not None  # [D] gains are accepted as well as [1, 1, D]


def test_mimi_codebooks_are_normalised(tiny_checkpoint: Path) -> None:
    cfg = resolve(tiny_checkpoint).config
    tensors = load_file(str(tiny_checkpoint / cfg.mimi_name))
    key = "quantizer.rvq_first.vq.layers.0._codebook"
    tensors[f"{key}.cluster_usage"] = torch.full_like(tensors[f"{key}.cluster_usage"], 2.0)
    mimi = load_mimi(tensors, cfg.mimi)
    torch.testing.assert_close(
        mimi.state_dict()[f"{key}.embedding"], tensors[f"{key}.embedding_sum"] / 2
    )
    del tensors[f"{key}.cluster_usage"]
    with pytest.raises(CheckpointError, match="cluster_usage"):
        load_mimi(tensors, cfg.mimi)


def test_missing_and_truncated_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint file 'model.safetensors'"):
        load_model(d)
    with pytest.raises(CheckpointError, match="weight file not found"):
        load_lm(d / "nope.safetensors", LMConfig())
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "no-such-dir")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        resolve(d)


def _hub_cache(root: Path, repo: str, source: Path) -> None:
    """Lay ``source``'s files out as huggingface_hub's cache does for ``repo``."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snap / f.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)


def _run(cache: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    base |= {"HF_HUB_CACHE": str(cache), "HF_HOME": str(cache), **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=120
    )


def _run_offline(cache: Path, code: str) -> subprocess.CompletedProcess[str]:
    return _run(cache, code, HF_HUB_OFFLINE="1")


# the look-up timed in the child, without the interpreter's start and torch's import
_TIMED_LOAD = (
    "import time\n"
    "from dsm_stt.model.checkpoint import CheckpointError, load_model\n"
    "t = time.perf_counter()\n"
    "try:\n"
    "    load_model('kyutai/stt-1b-en_fr-candle')\n"
    "except CheckpointError as exc:\n"
    "    print(f'{time.perf_counter() - t:.3f}')\n"
    "    print(exc)\n"
)


def test_repo_id_from_cache_offline_and_clear_error_without_cache(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    _hub_cache(cache, "someone/tiny-stt", tiny_checkpoint)
    code = (
        "from dsm_stt.model.checkpoint import load_model, resolve_path\n"
        "m = load_model('someone/tiny-stt')\n"
        "print(m.name, m.config.lm.num_layers)\n"
        "print(resolve_path('hf://someone/tiny-stt/config.json').name)\n"
    )
    done = _run_offline(cache, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["someone/tiny-stt", "2", "config.json"]

    empty = tmp_path / "empty"
    empty.mkdir()
    done = _run_offline(empty, _TIMED_LOAD)
    assert done.returncode == 0, done.stderr
    seconds, message = done.stdout.strip().split("\n")
    assert float(seconds) < 1.0
    assert "kyutai/stt-1b-en_fr-candle" in message and "HF_HUB_OFFLINE is set" in message
    assert "`hf download kyutai/stt-1b-en_fr-candle`" in message
    assert f"Hugging Face cache ({empty})" in message
    assert "--model DIR" in message


def test_unreachable_hub_is_one_message_within_a_second(tmp_path: Path) -> None:
    """Without HF_HUB_OFFLINE and without network, huggingface_hub alone retries for up to a
    minute; one short request tells, and the message says what to do."""
    # a loopback port nothing listens on: the connection is refused at once, like a machine
    # whose DNS has nothing to say
    done = _run(tmp_path, _TIMED_LOAD, HF_ENDPOINT="http://127.0.0.1:9")
    assert done.returncode == 0, done.stderr
    seconds, message = done.stdout.strip().split("\n")
    assert float(seconds) < 1.0
    assert "the hub (http://127.0.0.1:9) cannot be reached" in message
    assert "`hf download kyutai/stt-1b-en_fr-candle`" in message


def test_cached_repo_needs_no_request(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a request was made for a cached file")

    _hub_cache(tmp_path, "someone/tiny-stt", tiny_checkpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_available("someone/tiny-stt")
    files = resolve("someone/tiny-stt")
    assert files.lm_path.parent.name == "0" * 40
    assert load_model("someone/tiny-stt").config.lm.num_layers == 2


def test_check_available_offline(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotCachedError, match="HF_HUB_OFFLINE is set") as info:
        check_available("kyutai/stt-2.6b-en")
    assert "`hf download kyutai/stt-2.6b-en`" in str(info.value)
    # one file of a TOML (hf://owner/repo/file): the command fetches that file
    with pytest.raises(NotCachedError) as info:
        check_available("hf://kyutai/stt-2.6b-en/model.safetensors")
    assert "`hf download kyutai/stt-2.6b-en model.safetensors`" in str(info.value)
    # a known repo whose weights are cached without its config.json: its preset, offline
    snap = tmp_path / "models--kyutai--stt-2.6b-en" / "snapshots" / ("1" * 40)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("1" * 40)
    cfg = preset("kyutai/stt-2.6b-en")
    for name in (cfg.moshi_name, cfg.mimi_name, cfg.tokenizer_name):
        (snap / name).write_bytes(b"")
    check_available("kyutai/stt-2.6b-en")
    assert resolve("kyutai/stt-2.6b-en").config == cfg
    (snap / cfg.tokenizer_name).unlink()
    with pytest.raises(NotCachedError, match=cfg.tokenizer_name):
        check_available("kyutai/stt-2.6b-en")
    # a local directory: its missing files, without the hub
    with pytest.raises(CheckpointError, match="model directory not found"):
        check_available(str(tmp_path / "nope") + "/")


def test_official_tensor_helpers_round_trip(tiny_checkpoint: Path) -> None:
    cfg = resolve(tiny_checkpoint).config
    model = load_model(tiny_checkpoint)
    assert set(official_lm_tensors(model.lm)) == set(
        load_file(str(tiny_checkpoint / "model.safetensors"))
    )
    mimi_keys = set(official_mimi_tensors(model.mimi))
    assert "quantizer.rvq_rest.vq.layers.0._codebook.embedding_sum" in mimi_keys
    assert (
        json.loads((tiny_checkpoint / "config.json").read_text())["mimi_config_name"]
        == cfg.mimi_config_name
    )
