"""Chunked cross-entropy against torch.nn.functional.cross_entropy (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops import causal_lm_loss, linear_cross_entropy, supervised_targets


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_reference(chunk_size, with_bias):
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,))

    got = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=chunk_size)
    got.backward(torch.tensor(0.7, dtype=torch.float32))
    grads = [hidden.grad, weight.grad] + ([bias.grad] if with_bias else [])
    hidden.grad = weight.grad = None
    if bias is not None:
        bias.grad = None

    logits = F.linear(hidden, weight, bias)
    want = F.cross_entropy(logits.float(), targets, reduction="sum")
    (want * 0.7).backward()
    want_grads = [hidden.grad, weight.grad] + ([bias.grad] if with_bias else [])

    # fp64 inputs, fp32 softmax: agreement to fp32 rounding.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_fp32_and_frozen_weight():
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(30, 8)  # frozen: no grad requested or computed
    targets = torch.randint(0, 30, (20,))
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=7)
    got.backward()
    g = hidden.grad.clone()
    hidden.grad = None
    want = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, hidden.grad)
    assert weight.grad is None


def test_supervised_targets_shift_and_packing_boundary():
    labels = torch.tensor([[-100, 5, 6, 7, 8]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])  # two packed samples
    mask, targets = supervised_targets(labels, position_ids)
    # position 2 would predict token 7, the first token of sample 2: excluded
    assert mask.tolist() == [[True, True, False, True, False]]
    assert targets.tolist() == [5, 6, 8]


def test_causal_lm_loss_matches_hf_loss(tiny_llama):
    ids = torch.randint(0, 128, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100
    loss_sum, n = causal_lm_loss(tiny_llama, {"input_ids": ids, "labels": labels}, chunk_size=3)
    want = tiny_llama(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss_sum / n, want, rtol=1e-5, atol=1e-6)
    assert n == int((labels[:, 1:] != -100).sum())


def test_causal_lm_loss_gpt2_gradients(tiny_gpt2):
    ids = torch.randint(0, 128, (2, 10))
    labels = ids.clone()
    loss_sum, n = causal_lm_loss(tiny_gpt2, {"input_ids": ids, "labels": labels}, chunk_size=4)
    (loss_sum / n).backward()
    got = {k: p.grad.clone() for k, p in tiny_gpt2.named_parameters()}
    tiny_gpt2.zero_grad(set_to_none=True)
    tiny_gpt2(input_ids=ids, labels=labels).loss.backward()
    for k, p in tiny_gpt2.named_parameters():  # tied wte gets both embedding and head grads
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
