"""add_weighted_adapter's pruning merges (TIES, DARE, magnitude pruning, and their SVD forms)
equal peft's on tiny Llama and GPT-2, fp32.

DARE's random masks are matched under the same seed, not passed in: lorakit draws them from
torch's global generator in peft's order (the new adapter's layers created first, then per layer
each adapter's A, then each B, or each delta for the `_svd` forms). That holds when the source
adapters use init_lora_weights=True (peft's default), since peft initialises the new adapter's
layers with the first source adapter's init and each init draws its own amount of numbers.
"""

from __future__ import annotations

import pytest
import torch
from peft_oracle import add_twin_adapter, copy_adapter, twin_models

from conftest import make_tiny_gpt2, make_tiny_llama
from lorakit.errors import ConfigError
from lorakit.lora.combine import COMBINATIONS, merge_tasks

ATOL = 1e-5
CASES = {
    "llama": (make_tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": (make_tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}
PRUNED = [c for c in COMBINATIONS if c not in ("linear", "cat", "svd")]
WEIGHTS = [0.7, -0.4, 1.1]


def three_adapters(case: str):
    """Twin lorakit / peft models holding adapters default, other, third with random A and B."""
    make, targets = CASES[case]
    config = dict(targets, r=4, lora_alpha=8)  # init_lora_weights=True: B starts at zero
    ours, theirs = twin_models(make(), **config)
    add_twin_adapter(ours, theirs, "other", **config)
    add_twin_adapter(ours, theirs, "third", **config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    for name in ("default", "other", "third"):
        copy_adapter(theirs, ours, name)
    return ours, theirs


def mix_tensors(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        k.removeprefix(prefix): v.detach().clone()
        for k, v in model.named_parameters()
        if ".mix." in k or k.endswith(".mix")
    }


def combine_both(ours, theirs, combination: str, seed: int = 7, **kwargs):
    torch.manual_seed(seed)
    theirs.add_weighted_adapter(
        ["default", "other", "third"], WEIGHTS, "mix", combination, **kwargs
    )
    torch.manual_seed(seed)
    ours.add_weighted_adapter(["default", "other", "third"], WEIGHTS, "mix", combination, **kwargs)
    return mix_tensors(ours.get_base_model()), mix_tensors(theirs, "base_model.model.")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("combination", PRUNED)
def test_pruning_merges_equal_peft(case, combination):
    ours, theirs = three_adapters(case)
    sign = {"majority_sign_method": "frequency"} if "ties" in combination else {}
    got, want = combine_both(ours, theirs, combination, density=0.5, **sign)
    assert set(got) == set(want) and got
    for key, value in want.items():
        assert torch.allclose(got[key], value, atol=ATOL), key
    # half the values were pruned: the result differs from the same merge keeping all values
    _, whole = combine_both(*three_adapters(case), combination, density=1.0, **sign)
    assert any(not torch.allclose(whole[k], want[k], atol=1e-3) for k in want)
    inputs = torch.randint(0, 128, (2, 6))
    ours.set_adapter("mix"), theirs.set_adapter("mix")
    with torch.no_grad():
        assert torch.allclose(ours(inputs).logits, theirs(inputs).logits, atol=1e-4)


@pytest.mark.parametrize("combination", ["ties", "ties_svd"])
def test_total_sign_method_equals_peft(combination):
    ours, theirs = three_adapters("llama")
    got, want = combine_both(ours, theirs, combination, density=0.7)
    for key, value in want.items():
        assert torch.allclose(got[key], value, atol=ATOL), key


@pytest.mark.parametrize("combination", ["dare_linear", "dare_ties_svd"])
def test_dare_masks_follow_the_seed(combination):
    ours, theirs = three_adapters("llama")
    first = combine_both(ours, theirs, combination, seed=7, density=0.5)[0]
    ours.delete_adapter("mix")
    torch.manual_seed(8)
    ours.add_weighted_adapter(
        ["default", "other", "third"], WEIGHTS, "mix", combination, density=0.5
    )
    second = mix_tensors(ours.get_base_model())
    assert any(not torch.allclose(first[k], second[k]) for k in first)


def test_merge_tasks_by_hand():
    # magnitude: density 0.5 of 4 entries keeps the 2 largest in magnitude
    pruned = merge_tasks([torch.tensor([0.1, -3.0, 2.0, 0.5])], [2.0], "magnitude_prune", 0.5)
    assert torch.equal(pruned, torch.tensor([0.0, -6.0, 4.0, 0.0]))
    # ties, total: sums [0, -3, 5] elect [+, -, +]; the average runs over agreeing entries
    t = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-1.0, -1.0, 2.0])]
    assert torch.equal(merge_tasks(t, [1.0, 1.0], "ties", 1.0), torch.tensor([1.0, -1.5, 2.5]))
    # total vs frequency: 5 - 1 - 1 > 0 elects +, but two of three entries are negative
    t = [torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    assert torch.equal(merge_tasks(t, [1.0] * 3, "ties", 1.0, "total"), torch.tensor([5.0]))
    assert torch.equal(merge_tasks(t, [1.0] * 3, "ties", 1.0, "frequency"), torch.tensor([-1.0]))
    # dare: what survives is divided by density, so its mean stays the original value
    torch.manual_seed(0)
    dropped = merge_tasks([torch.ones(20000)], [1.0], "dare_linear", 0.25)
    assert set(dropped.unique().tolist()) == {0.0, 4.0}
    assert abs(dropped.mean().item() - 1.0) < 0.05


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(combination_type="tie"), "did you mean `ties`"),
        (dict(combination_type="ties"), "needs density"),
        (dict(combination_type="magnitude_prune", density=1.5), "0 <= density <= 1"),
        (dict(combination_type="dare_linear", density=0.0), "0 < density <= 1"),
        (dict(combination_type="dare_ties", density="half"), "expected a number"),
        (dict(combination_type="ties", density=0.5, majority_sign_method="most"), "frequency"),
        (dict(combination_type="linear", density=0.5, majority_sign_method="mean"), "total"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    ours, _ = three_adapters("llama")
    with pytest.raises(ConfigError, match=message):
        ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", **kwargs)
    assert "mix" not in ours.peft_config


def test_unequal_ranks_need_cat_or_svd():
    ours, _ = three_adapters("llama")
    ours.add_adapter("wide", type(ours.peft_config["default"])(target_modules=["q_proj"], r=8))
    with pytest.raises(ConfigError, match="needs equal ranks"):
        ours.add_weighted_adapter(["default", "wide"], [1, 1], "mix", "ties", density=0.5)
    ours.add_weighted_adapter(["default", "wide"], [1, 1], "mix", "ties_svd", density=0.5)
    assert ours.peft_config["mix"].r == 8
