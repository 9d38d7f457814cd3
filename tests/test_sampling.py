"""Tests of the engine's sampling (``engine.sample_tokens``, ``--temperature`` / ``--seed``): the
tokens drawn are distributed as ``softmax(logits / T)``, checked with a chi-square test, and the
same seed draws the same tokens.

The goodness-of-fit tests use fixed seeds, so they are deterministic; the bound they pass
(p > 1e-3) is one that a correct sampler misses for one seed in a thousand, and each test also
checks that the same counts *reject* a wrong sampler's distribution (the temperature applied
twice, or not at all) with p < 1e-9, so a test that could not tell them apart fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from engine_support import make_engine

from dsm_stt.config import EngineConfig
from dsm_stt.engine.engine import sample_tokens
from dsm_stt.model.synthetic import random_model

FIT = 1e-3  # a correct sampler's counts must give a p-value above this
REJECT = 1e-9  # a wrong distribution's p-value must be below this

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0])


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of ``counts`` against ``probs``; categories expected
    fewer than 5 times are pooled into one (the test's usual validity rule)."""
    counts, probs = counts.double(), probs.double()
    expected = probs * counts.sum()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = counts.numel() - 1
    # the chi-square survival function: the regularized upper incomplete gamma Q(k/2, x/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


def _draw(logits: torch.Tensor, temperature: float, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = logits.expand(n, logits.numel())
    return sample_tokens(rows, temperature, generator)


def test_the_chi_square_helper_on_known_values() -> None:
    # statistic 4.0 with 1 degree of freedom: p = 0.0455 (tables); exact counts: p = 1
    p = chi_square_p(torch.tensor([60, 40]), torch.tensor([0.5, 0.5]))
    assert p == pytest.approx(math.erfc(math.sqrt(2.0)), rel=1e-9)  # Q(1/2, 2) = erfc(sqrt 2)
    assert p == pytest.approx(0.0455, abs=1e-4)
    # 9 degrees of freedom at the 0.001 critical value 27.877 (tables)
    counts = torch.tensor(
        [100.0 + math.sqrt(27.877 * 100 / 2), 100.0 - math.sqrt(27.877 * 100 / 2)] + [100.0] * 8
    )
    assert chi_square_p(counts, torch.full((10,), 0.1)) == pytest.approx(1e-3, rel=1e-3)
    assert chi_square_p(torch.tensor([50, 50]), torch.tensor([0.5, 0.5])) == pytest.approx(1.0)


@pytest.mark.parametrize("temperature", [0.5, 0.8, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_samples_follow_the_softmax_at_the_temperature(
    temperature: float, dtype: torch.dtype
) -> None:
    logits = LOGITS.to(dtype)
    tokens = _draw(logits, temperature, 50_000, seed=7)
    assert tokens.dtype == torch.long and int(tokens.min()) >= 0
    counts = torch.bincount(tokens, minlength=LOGITS.numel())
    assert int(counts.sum()) == 50_000
    exact = logits.float()
    assert chi_square_p(counts, torch.softmax(exact / temperature, -1)) > FIT
    # the same counts reject what a wrong sampler would draw (the temperature applied twice,
    # or ignored; at T = 1 both are right, so a temperature 10 % off): the test can fail
    wrong = [temperature**2, 1.0] if temperature != 1.0 else [1.1, 0.9]
    for t in wrong:
        assert chi_square_p(counts, torch.softmax(exact / t, -1)) < REJECT


def test_samples_are_seeded_and_reproducible() -> None:
    a = _draw(LOGITS, 1.0, 1000, seed=3)
    assert torch.equal(a, _draw(LOGITS, 1.0, 1000, seed=3))
    assert not torch.equal(a, _draw(LOGITS, 1.0, 1000, seed=4))
    assert len(set(a.tolist())) == LOGITS.numel()  # every token is drawn, not one


def test_masked_tokens_are_never_drawn_and_extreme_logits_stay_valid() -> None:
    logits = torch.tensor([0.0, float("-inf"), 1e4, -1e4, 0.0])
    tokens = _draw(logits, 1.0, 10_000, seed=0)
    assert set(tokens.tolist()) == {2}  # 1e4 dominates; -inf and -1e4 never come
    flat = torch.tensor([0.0, float("-inf"), 0.0])
    counts = torch.bincount(_draw(flat, 3.0, 10_000, seed=1), minlength=3)
    assert counts[1] == 0
    assert chi_square_p(counts[[0, 2]], torch.tensor([0.5, 0.5])) > FIT


def test_temperature_zero_is_the_argmax_and_needs_no_generator() -> None:
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_tokens(logits, 0.0), logits.argmax(-1))
    # a temperature near 0 is the argmax too: the Gumbel noise is finite (no NaN rows)
    near = sample_tokens(logits, 1e-6, torch.Generator().manual_seed(0))
    assert torch.equal(near, logits.argmax(-1))


def test_the_tiny_model_samples_from_its_softmax() -> None:
    """The engine end to end: every slot is reset at every step, so each step draws its
    tokens from the start position's logits (the same in every slot and step); the tokens of
    200 steps x 32 slots follow softmax(logits / T), and not softmax(logits / T^2)."""
    T, slots, steps = 0.5, 32, 200
    engine = make_engine(random_model("tiny", seed=0), slots, temperature=T, seed=11)
    seen: list[torch.Tensor] = []
    sample = engine._sample

    def spy(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.clone())
        return sample(logits)

    engine._sample = spy  # type: ignore[method-assign]
    every = np.ones(slots, bool)
    tokens: list[int] = []
    for _ in range(steps):
        tokens += engine.step(np.zeros((slots, 1920), np.float32), every, every).tokens
    logits = seen[0][0]
    assert all(torch.equal(step, logits.expand_as(step)) for step in seen)
    counts = torch.bincount(torch.tensor(tokens), minlength=logits.numel())
    assert chi_square_p(counts, torch.softmax(logits / T, -1)) > FIT
    assert chi_square_p(counts, torch.softmax(logits / T**2, -1)) < REJECT
    # and the same seed gives the same tokens again
    again = make_engine(random_model("tiny", seed=0), slots, temperature=T, seed=11)
    first = [again.step(np.zeros((slots, 1920), np.float32), every, every).tokens]
    assert first[0] == tokens[:slots]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -0.5])
def test_non_finite_or_negative_temperatures_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"temperature must be >= 0 and finite, got"):
        EngineConfig(temperature=value)


@pytest.mark.parametrize("value", [-1, 2**63, 1.5, True])
def test_bad_seeds_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="seed must be"):
        EngineConfig(seed=value)  # type: ignore[arg-type]
