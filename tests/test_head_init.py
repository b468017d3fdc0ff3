"""`--head-init zero`: the trained classifier head starts at exactly 0, in the model and in the server's
initial global adapter, and local training still moves it (and, through it, the LoRA factor)."""

from __future__ import annotations

import pytest
import torch

from peft_deer.federated import iter_phases
from peft_deer.run import build_experiment, simulated_release
from peft_deer.settings import parse_args


def tiny_run_args(medmnist_dir, tmp_path, head_init: str):
    return parse_args(
        ["--model", "tiny-vit", "--data-dir", str(medmnist_dir), "--train-subset", "120", "--num-clients", "2",
         "--partition", "iid", "--rounds", "1", "--head-init", head_init, "--output-dir", str(tmp_path / "run")]
    )  # fmt: skip


@pytest.mark.parametrize("head_init", ["zero", "default"])
def test_zero_head_starts_at_zero_and_trains(head_init, medmnist_dir, tmp_path, one_thread):
    exp = build_experiment(tiny_run_args(medmnist_dir, tmp_path, head_init), torch.device("cpu"), say=lambda *a: None)
    head = exp.layout.head_keys
    assert {k.rsplit(".", 1)[-1] for k in head} == {"weight", "bias"}
    params = dict(exp.model.named_parameters())
    start = exp.server.global_state
    zero = {k: torch.count_nonzero(params[k]).item() == 0 and torch.count_nonzero(start[k]).item() == 0 for k in head}
    if head_init == "zero":
        assert all(zero.values())
    else:  # the model's own init: a random weight (transformers starts the bias at 0)
        assert not any(v for k, v in zero.items() if k.endswith("weight"))
    # LoRA A keeps its seeded random init either way; B starts at 0 as always.
    assert all(torch.count_nonzero(start[f.a_key]) > 0 for f in exp.layout.lora)

    phase = next(iter(iter_phases("deer", 1)))  # phase B: B and the head train
    simulated_release(exp)(phase, exp.server.participants(phase))
    after = exp.server.global_state
    for k in head:
        assert not torch.equal(after[k], start[k]), k
    # A zero head passes no gradient to B on the first step only: B moves once the head has.
    assert any(torch.count_nonzero(after[f.b_key]) > 0 for f in exp.layout.lora)
