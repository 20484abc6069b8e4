"""A sweep's report (lorakit.jobs.sweep_report): the best variant per metric and the automatic
reading of the numbers (plateaus, overfitting, the cheapest variant close to the best, the noise,
LoRA against full fine-tuning). The files a real sweep writes: test_sweep.py."""

from __future__ import annotations

from types import SimpleNamespace

from lorakit.jobs.sweep_report import (
    best_per_metric,
    forgetting,
    full_vs_lora,
    overfitting,
    reading,
)


def test_reading_finds_plateau_and_overfitting():
    records = [
        {
            "name": f"r={r}",
            "status": "finished",
            "overrides": {"lora.r": r},
            "method": "lora",
            "best_eval_loss": loss,
            "final_train_loss": 0.1,
            "curve": {"train": [[1, 1.0]], "eval": evals},
        }
        for r, loss, evals in [
            (1, 2.0, [[10, 2.1], [20, 2.0]]),
            (8, 1.0, [[10, 1.2], [20, 1.0]]),
            (64, 0.995, [[10, 0.995], [20, 1.3]]),
        ]
    ]
    text = reading(SimpleNamespace(axes=["lora.r"]), records, baseline=None)
    assert any("stops improving above r=8" in line for line in text)
    assert any(line.startswith("r=64 overfits from step 10") for line in text)


def test_reading_names_the_cheapest_variant_close_to_the_best_and_the_noise():
    records = [
        {
            "name": name,
            "status": "finished",
            "overrides": {"variant": name},
            "method": "lora",
            "trainable_params": params,
            "exact_match": score,
            "exact_match_questions": 100,
        }
        for name, params, score in [
            ("q", 100, 0.20),
            ("attention", 400, 0.50),
            ("attention+mlp", 1000, 0.52),
        ]
    ]
    text = reading(SimpleNamespace(axes=["variant"]), records, baseline=None)
    assert (
        "attention comes within 5 points of the best exact match (50.0% against "
        "attention+mlp's 52.0%) with 40% of its trainable parameters" in text
    )
    # 100 answers: standard error sqrt(0.5 * 0.5 / 100) = 5 points
    assert any("standard error is up to 5 points" in line and "~10 points" in line for line in text)
    records[1]["exact_match"] = 0.40
    text = reading(SimpleNamespace(axes=["variant"]), records, baseline=None)
    assert any(line.startswith("attention+mlp has the best exact match (52.0%)") for line in text)


def test_best_per_metric_names_the_winner_of_each_metric_that_differs():
    records = [
        {"name": "a", "best_eval_loss": 0.5, "exact_match": 0.2, "tokens_per_s": 50.0},
        {"name": "b", "best_eval_loss": 0.4, "exact_match": 0.3, "tokens_per_s": 70.4},
    ]
    for record in records:
        record["trainable_params"] = 100  # the same for both: no "fewest" line
    assert best_per_metric(records) == [
        "lowest eval loss: b (0.4)",
        "highest exact match: b (30.0%)",
        "fastest: b (70 tokens/s)",  # 70.4 printed as a whole number
    ]


def test_overfitting_needs_eval_loss_to_rise_past_its_minimum_by_two_percent():
    def record(evals):
        return {"name": "r=8", "final_train_loss": 0.1, "curve": {"eval": evals}}

    # minimum 1.0 at step 10, 1.1 at the end: 10% above it, more than OVERFIT_RISE (2%)
    assert overfitting(record([[0, 3.0], [10, 1.0], [20, 1.1]])) == (
        "r=8 overfits from step 10: eval loss 1 there, 1.1 at the end (train loss 0.1)"
    )
    assert overfitting(record([[0, 3.0], [10, 1.0], [20, 1.01]])) is None  # 1% above: noise
    # the eval before training (step 0) is not a minimum to overfit from
    assert overfitting(record([[0, 0.5], [10, 1.0], [20, 1.1]])) is not None
    assert overfitting(record([[0, 0.5], [10, 1.0]])) is None  # one eval after training


def test_full_vs_lora_gives_each_lora_its_share_of_the_full_gain():
    def full(lr: float, score: float) -> dict:
        return {
            "name": f"full-{lr}",
            "method": "full",
            "exact_match": score,
            "overrides": {"train.lr": lr},
        }

    finished = [
        full(1e-5, 0.2),
        full(1e-4, 0.5),
        full(3e-4, 0.4),
        {"name": "r=8", "method": "lora", "exact_match": 0.3},
    ]
    # base 10%, full at its best (lr 1e-4, inside the grid) 50%: a gain of 40 points; r=8
    # gains 20 of them, 50%
    assert full_vs_lora(finished, {"exact_match": 0.1}) == [
        "full fine-tuning: exact match 10.0% → 50.0% (full-0.0001)",
        "r=8 reaches 50% of full fine-tuning's exact-match gain",
    ]
    assert full_vs_lora(finished, {"exact_match": 0.5}) == [
        "full fine-tuning did not improve exact match over the base model (50.0%)"
    ]
    # full fine-tuning's best at the edge of its grid, or at a single lr: no share
    edge = full_vs_lora([full(1e-5, 0.6), *finished], {"exact_match": 0.1})
    assert "edge of its grid (lr=1e-05)" in edge[1] and len(edge) == 2
    single = full_vs_lora([full(1e-4, 0.5), finished[-1]], {"exact_match": 0.1})
    assert "a single learning rate" in single[1] and len(single) == 2
    assert full_vs_lora(finished, None) == []  # no base model scored: nothing to compare


def test_forgetting_lists_each_variants_general_loss_and_facts_kept_against_the_base():
    finished = [
        {"name": "full", "general_loss": 1.5, "facts_kept": 0.5},
        {"name": "r=16", "general_loss": 0.9, "facts_kept": 1.0},
    ]
    base = {"general_loss": 0.7, "facts_kept": 1.0}
    (line,) = forgetting(finished, base)
    assert line.endswith("base 0.7 (100%); r=16 0.9 (100%), full 1.5 (50%)")
    assert forgetting(finished, None) == [] and forgetting([], base) == []
