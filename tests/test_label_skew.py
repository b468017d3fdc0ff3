"""Logit-adjusted local loss: the prior offsets, the loss, and both engines agreeing on it."""

from __future__ import annotations

import math

import pytest
import torch
from test_batched import SGD, assert_close_updates, run
from torch.utils.data import TensorDataset

from peft_deer.federated import BatchedEngine, LocalTraining, SequentialEngine
from peft_deer.federated.label_skew import adjusted_cross_entropy, label_counts, logit_offsets

pytestmark = pytest.mark.usefixtures("one_thread")


def test_offsets_are_tau_times_the_smoothed_log_prior():
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])  # 3 of class 0, 7 of class 1, none of class 2
    ds = TensorDataset(torch.zeros(10, 1), y)
    assert label_counts(ds, 3).tolist() == [3.0, 7.0, 0.0]
    off = logit_offsets(ds, 3, tau=2.0)
    expected = [2 * math.log(4 / 13), 2 * math.log(8 / 13), 2 * math.log(1 / 13)]
    assert off.tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(off).all()  # an unseen class gets a finite offset


def test_adjusted_loss_is_cross_entropy_of_shifted_logits_and_plain_without_offsets():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 1, 1, 0])
    off = torch.tensor([-0.1, -2.0, 0.3])
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert adjusted_cross_entropy(logits, labels, None) == plain
    shifted = torch.nn.functional.cross_entropy(logits + off, labels)
    torch.testing.assert_close(adjusted_cross_entropy(logits, labels, off), shifted)
    assert not torch.isclose(shifted, plain)


def test_a_one_class_client_barely_pushes_its_class_logit():
    # a client holding only class 1: plain CE keeps pushing class 1 up; the adjusted loss is already low
    logits = torch.zeros(8, 2, requires_grad=True)
    ds = TensorDataset(torch.zeros(50, 1), torch.ones(50, dtype=torch.long))
    labels = torch.ones(8, dtype=torch.long)
    plain_grad = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, labels), logits)[0]
    adj_grad = torch.autograd.grad(adjusted_cross_entropy(logits, labels, logit_offsets(ds, 2, 1.0)), logits)[0]
    assert adj_grad.abs().sum() < 0.1 * plain_grad.abs().sum()


@pytest.mark.parametrize("method", ["deer", "lora"])
def test_batched_equals_sequential_with_logit_adjustment(method):
    adjusted = LocalTraining(
        local_epochs=2, batch_size=4, lr=0.1, momentum=0.9, weight_decay=1e-2, logit_adjustment=1.0
    )
    seq, seq_state = run(method, SequentialEngine, adjusted)
    bat, bat_state = run(method, BatchedEngine, adjusted)
    assert_close_updates(seq, bat)
    for key in seq_state:
        torch.testing.assert_close(bat_state[key], seq_state[key], rtol=1e-4, atol=1e-6)
    plain, _ = run(method, SequentialEngine, SGD)  # the adjustment changes the training
    assert any(
        not torch.allclose(u.delta[k], v.delta[k]) for u, v in zip(plain[0], seq[0], strict=True) for k in u.delta
    )


def test_logit_adjustment_must_be_finite_and_non_negative():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--logit-adjustment"):
            LocalTraining(logit_adjustment=bad)


def test_flag_is_parsed_checked_and_refused_with_record_dp(capsys):
    from peft_deer.settings import parse_args

    assert parse_args(["--logit-adjustment", "1.0"]).local.logit_adjustment == 1.0
    assert parse_args([]).local.logit_adjustment == 0.0
    for argv, message in [
        (["--logit-adjustment", "nan"], "must be a finite number >= 0"),
        (["--logit-adjustment", "-0.5"], "must be a finite number >= 0"),
        (["--logit-adjustment", "1", "--dp", "record", "--record-epsilon", "8"], "DP-SGD does not protect"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
