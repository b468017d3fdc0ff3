"""Frozen-prefix cache: training on cached block outputs gives the deltas of training on the images."""

from __future__ import annotations

import pytest
import torch
from helpers import random_client_tasks, tiny_vit
from peft import get_peft_model
from torch.utils.data import TensorDataset

from peft_deer import DeerLoraConfig
from peft_deer.backbones.prefix_cache import (
    cache_key,
    check_prefix_is_deterministic,
    compute_prefix_features,
    load_or_compute,
    num_blocks,
    parse_lora_layers,
    skip_prefix,
)
from peft_deer.federated import (
    ClientTask,
    LocalTraining,
    SequentialEngine,
    adapter_layout,
    get_adapter_state,
    iter_phases,
)
from peft_deer.federated.batched import BatchedEngine


def last_block_model(method: str = "deer", layers: int = 3):
    """A tiny ViT with `layers` blocks and LoRA only in the last one (q, v) plus the head."""
    base = tiny_vit(0, layers=layers)
    adapted = parse_lora_layers("last:1", num_blocks(base))
    config = DeerLoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=adapted,
        layers_pattern="layers",
        modules_to_save=["classifier"],
        method=method,
    )
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():  # a non-zero B, so phase A has a signal
        if "lora_B" in name:
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model, adapted[0]


def test_lora_layers_parse_and_reject_bad_specs():
    assert parse_lora_layers("all", 12) is None
    assert parse_lora_layers("last:4", 12) == [8, 9, 10, 11]
    for bad, message in (("last:0", r"\[1, 12\]"), ("last:13", r"\[1, 12\]"), ("first:2", "'all' or 'last:K'")):
        with pytest.raises(ValueError, match=message):
            parse_lora_layers(bad, 12)


def test_only_the_last_block_is_adapted():
    model, first = last_block_model()
    lora_blocks = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_" in n}
    assert first == 2 and lora_blocks == {"2"}


@pytest.mark.parametrize("engine_cls", [SequentialEngine, BatchedEngine])
@pytest.mark.parametrize("method", ["deer", "lora"])
def test_cached_training_gives_the_same_deltas(engine_cls, method):
    model, first = last_block_model(method)
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    tasks = random_client_tasks((6, 9), torch.Generator().manual_seed(1))
    training = LocalTraining(local_epochs=2, batch_size=4, lr=0.05)
    check_prefix_is_deterministic(model, first, tasks[0].dataset[0][0][None])
    for phase in list(iter_phases(method, 1)):
        plain = engine_cls(training).train_clients(model, layout, state, phase, tasks)
        cached_tasks = [
            ClientTask(t.client_id, compute_prefix_features(model, t.dataset, first, 4, torch.float32),
                       t.seed)
            for t in tasks
        ]  # fmt: skip
        with skip_prefix(model, first):
            cached = engine_cls(training).train_clients(model, layout, state, phase, cached_tasks)
        for p, c in zip(plain, cached, strict=True):
            assert p.delta.keys() == c.delta.keys()
            assert any(v.abs().max() > 0 for v in p.delta.values())
            for k in p.delta:
                torch.testing.assert_close(c.delta[k], p.delta[k], rtol=1e-4, atol=1e-6)
    # The swap is undone: the model takes images again.
    assert model(pixel_values=tasks[0].dataset[0][0][None]).logits.shape == (1, 2)


def test_half_precision_cache_is_close_and_half_the_size():
    model, first = last_block_model()
    data = random_client_tasks((16,), torch.Generator().manual_seed(2))[0].dataset
    full = compute_prefix_features(model, data, first, 8, torch.float32)
    half = compute_prefix_features(model, data, first, 8, torch.float16)
    assert half.tensors[0].element_size() * 2 == full.tensors[0].element_size()
    torch.testing.assert_close(half.tensors[0].float(), full.tensors[0], rtol=2e-3, atol=2e-3)
    assert torch.equal(half.tensors[1], full.tensors[1])


def test_a_random_prefix_is_refused():
    base = tiny_vit(0, layers=3, dropout=0.3)
    model = get_peft_model(
        base, DeerLoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[2], layers_pattern="layers")
    )
    with pytest.raises(ValueError, match="random in training mode"):
        check_prefix_is_deterministic(model, 2, torch.randn(2, 1, 28, 28))


def test_disk_cache_is_reused_and_a_corrupt_file_recomputed(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return TensorDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0]))

    key = cache_key(model="tiny", size=28, split="train")
    first = load_or_compute(tmp_path, key, compute)
    again = load_or_compute(tmp_path, key, compute)
    assert len(calls) == 1 and torch.equal(first.tensors[0], again.tensors[0])
    (tmp_path / f"{key}.pt").write_bytes(b"not a tensor file")
    said = []
    load_or_compute(tmp_path, key, compute, say=said.append)
    assert len(calls) == 2 and "unreadable" in said[0]
    assert cache_key(model="tiny", size=28, split="train") != cache_key(model="tiny", size=56, split="train")
