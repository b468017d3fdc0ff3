"""The DEER_LORA phase rule on every LoRA layer kind and every PEFT path that changes requires_grad.

Rule: only the trained factor of each LoRA layer (`lora_A`/`lora_embedding_A` in phase A,
`lora_B`/`lora_embedding_B` in phase B) and the adapter's `modules_to_save` require grad.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import random_client_tasks, tiny_vit
from peft import (
    ArrowConfig,
    BdLoraConfig,
    KasaConfig,
    LoraConfig,
    MontecloraConfig,
    PeftConfig,
    PeftModel,
    VeloraConfig,
    get_peft_model,
)
from torch import nn
from torch.utils.data import TensorDataset
from transformers.pytorch_utils import Conv1D

from peft_deer import DeerLoraConfig
from peft_deer.federated import (
    BatchedEngine,
    ClientTask,
    DPRandomness,
    FederatedServer,
    LocalTraining,
    SequentialEngine,
    adapter_layout,
    get_adapter_state,
    iter_phases,
    metric_norm,
)
from peft_deer.federated.client import train_client
from peft_deer.federated.mechanism import build_whiteners, sample_noise
from peft_deer.federated.record_dp import RecordDP
from peft_deer.federated.schedule import Phase
from peft_deer.tuner import config as config_module
from peft_deer.tuner.config import HONOURED_OPTIONS, REFUSED_OPTIONS

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False", "ignore:LoRA adapter added to ConvNd")

TOKENS, SEQ, DIM = 10, 4, 8
KINDS = {"Linear": "lin", "Embedding": "emb", "Conv1d": "conv1", "Conv2d": "conv2", "Conv1D": "c1d"}
FACTOR_NAMES = {"A": ("lora_A", "lora_embedding_A"), "B": ("lora_B", "lora_embedding_B")}


class TinyNet(nn.Module):
    """Token ids (n, SEQ) -> logits (n, 2) through one layer of each kind LoRA can target."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.emb = nn.Embedding(TOKENS, DIM)
        self.lin = nn.Linear(DIM, DIM)
        self.c1d = Conv1D(DIM, DIM)
        self.conv1 = nn.Conv1d(SEQ, SEQ, 3, padding=1, groups=groups)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(DIM, 2)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        h = self.c1d(self.lin(self.emb(pixel_values)))  # (n, SEQ, DIM)
        h = self.conv1(h)
        h = self.conv2(h.unsqueeze(1)).mean(1)
        return SimpleNamespace(logits=self.head(h.mean(1)))


def make(kind: str, phase: str = "B", method: str = "deer", seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    config = DeerLoraConfig(r=2, target_modules=[KINDS[kind]], modules_to_save=["head"], phase=phase, method=method)
    return get_peft_model(TinyNet(), config)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def expected(model, phases: dict[str, str]) -> set[str]:
    """Trained factor and head parameters of each adapter in `phases` (name -> factors)."""
    out = set()
    for n, _ in model.named_parameters():
        for adapter, factors in phases.items():
            names = [f".{layer}.{adapter}" for f in factors for layer in FACTOR_NAMES[f]]
            if any(n.endswith(s) or s + "." in n for s in names) or f".modules_to_save.{adapter}." in n:
                out.add(n)
    return out


def other(phase: str) -> str:
    return "A" if phase == "B" else "B"


@pytest.mark.parametrize("phase", ["A", "B"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_path_keeps_only_the_phase_factor_trainable(kind, phase, tmp_path):
    model = make(kind, phase)
    want = expected(model, {"default": phase})
    assert sum(".lora" in n for n in want) == 1 and len(want) == 3
    assert trainable(model) == want, "creation"

    model.set_deer_phase(other(phase))
    assert trainable(model) == expected(model, {"default": other(phase)}), "set_deer_phase"
    model.set_deer_phase(phase)
    assert trainable(model) == want, "set_deer_phase back"

    model.set_adapter("default")
    assert trainable(model) == want, "set_adapter"
    model.set_requires_grad("default")
    assert trainable(model) == want, "set_requires_grad"
    assert model.peft_config["default"].phase == phase
    model.base_model.enable_adapter_layers()
    assert trainable(model) == want, "enable_adapter_layers"

    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    assert trainable(model) == expected(model, {"default": phase, "other": phase}), "load_adapter"
    model.set_deer_phase(other(phase), "other")
    assert trainable(model) == expected(model, {"default": phase, "other": other(phase)}), "phase of another adapter"
    model.set_adapter("other")
    assert trainable(model) == expected(model, {"other": other(phase)}), "set_adapter other"
    model.set_requires_grad(["default", "other"])
    assert trainable(model) == expected(model, {"default": phase, "other": other(phase)}), "set_requires_grad both"

    loaded = PeftModel.from_pretrained(TinyNet(), tmp_path, is_trainable=True)
    assert trainable(loaded) == want, "from_pretrained"
    assert trainable(PeftModel.from_pretrained(TinyNet(), tmp_path)) == set(), "from_pretrained, inference"


@pytest.mark.parametrize("kind", list(KINDS))
def test_lora_method_trains_both_factors_everywhere(kind):
    model = make(kind, method="lora")
    both = expected(model, {"default": "AB"})
    assert sum(".lora" in n for n in both) == 2
    assert trainable(model) == both
    model.set_requires_grad("default")
    assert trainable(model) == both


def test_set_requires_grad_false_freezes_and_set_deer_phase_does_not_unfreeze():
    model = make("Linear", "B")
    model.set_requires_grad("default", requires_grad=False)
    assert not any(".lora_" in n for n in trainable(model))
    model.set_deer_phase("A")
    assert not any(".lora_" in n for n in trainable(model))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"use_dora": True, "method": "lora"}, "use_dora=True"),
    ],
)
def test_options_the_federated_core_never_aggregates_are_rejected_at_config_time(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeerLoraConfig(target_modules=["lin"], **kwargs)


def test_unsupported_layer_kinds_are_rejected_at_injection():
    with pytest.raises(ValueError, match="conv1.*groups=2"):
        get_peft_model(TinyNet(groups=2), DeerLoraConfig(r=2, target_modules=["conv1"]))
    mha = nn.Sequential()
    mha.attn = nn.MultiheadAttention(DIM, 2)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        get_peft_model(mha, DeerLoraConfig(r=2, target_modules=["attn"]))


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_embedding_starts_like_a_linear_so_phase_b_has_a_gradient(init):
    torch.manual_seed(0)
    model = get_peft_model(TinyNet(), DeerLoraConfig(r=2, target_modules=["emb"], init_lora_weights=init))
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    a_key, b_key = layout.lora[0].a_key, layout.lora[0].b_key
    assert float(state[a_key].abs().min()) > 0 and float(state[b_key].abs().max()) == 0  # dW = 0, A full rank
    data = TensorDataset(torch.randint(0, TOKENS, (8, SEQ)), torch.randint(0, 2, (8,)))
    update = train_client(model, layout, state, Phase(0, 0, ("B",)), ClientTask(0, data, 7), LocalTraining(lr=0.1))
    assert float(update.delta[b_key].abs().max()) > 0


@pytest.mark.parametrize("phase", ["A", "B"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_one_local_step_changes_only_the_trained_factor_and_head(kind, phase):
    model = make(kind, phase)
    layout = adapter_layout(model)
    assert len(layout.lora) == 1 and len(layout.head_keys) == 2
    generator = torch.Generator().manual_seed(1)
    global_state = {k: torch.randn(v.shape, generator=generator) for k, v in get_adapter_state(model, layout).items()}
    data = TensorDataset(torch.randint(0, TOKENS, (8, SEQ), generator=generator), torch.randint(0, 2, (8,)))
    step = Phase(0, 0, (phase,))
    update = train_client(
        model, layout, global_state, step, ClientTask(0, data, 7), LocalTraining(batch_size=8, lr=0.1, momentum=0.0)
    )
    trained = set(layout.trained_keys(phase))
    assert set(update.delta) == trained
    assert all(float(update.delta[k].abs().min()) > 0 for k in layout.head_keys)
    assert float(next(update.delta[k] for k in trained if k not in layout.head_keys).abs().max()) > 0
    after = get_adapter_state(model, layout)
    for key, value in after.items():
        if key not in trained:
            assert torch.equal(value, global_state[key]), f"{key} changed in phase {phase}"


@pytest.mark.parametrize("phase", ["A", "B"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_regulated_metric_norm_is_the_product_space_norm_on_every_kind(kind, phase):
    model = make(kind, phase)
    layout = adapter_layout(model)
    generator = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in get_adapter_state(model, layout).items()}
    factors, key = layout.lora[0], layout.trained_keys(phase)[0]
    delta = {key: torch.randn(state[key].shape, generator=generator)}
    whiteners = build_whiteners(layout, state, [key], "regulated", ridge=0.0)
    a, b = state[factors.a_key].flatten(1), state[factors.b_key].flatten(1)
    d = delta[key].flatten(1)
    product = factors.scaling * (d @ a if phase == "B" else b @ d)
    torch.testing.assert_close(metric_norm(delta, whiteners), float(product.norm()), rtol=1e-4, atol=0)
    noise = sample_noise(whiteners, {key: state[key].shape}, 1.0, DPRandomness.from_seed(2).stream("noise"))
    assert noise[key].shape == state[key].shape
    w = whiteners[key]  # per-sample gradients (record-level DP) carry a leading batch dimension
    torch.testing.assert_close(
        w.whiten(torch.stack([delta[key], noise[key]])), torch.stack([w.whiten(delta[key]), w.whiten(noise[key])])
    )
    torch.testing.assert_close(w.whiten(noise[key]), w.whiten(w.color(w.whiten(noise[key]))), rtol=1e-4, atol=1e-5)


def test_record_level_dp_refuses_an_embedding_target_clearly():
    model = make("Embedding", "B")
    layout = adapter_layout(model)
    data = TensorDataset(torch.randint(0, TOKENS, (8, SEQ)), torch.randint(0, 2, (8,)))
    training = LocalTraining(record_dp=RecordDP(noise_multipliers=(1.0,)))
    with pytest.raises(ValueError, match="record-level DP.*Embedding"):
        train_client(
            model, layout, get_adapter_state(model, layout), Phase(0, 0, ("B",)), ClientTask(0, data, 7), training
        )


def test_issue_example_embedding_and_linear_in_phase_b_train_only_their_b_factors():
    model = get_peft_model(TinyNet(), DeerLoraConfig(r=2, target_modules=["emb", "lin"], phase="B"))
    assert trainable(model) == {
        "base_model.model.emb.lora_embedding_B.default",
        "base_model.model.lin.lora_B.default.weight",
    }
    assert {f.module for f in adapter_layout(model).lora} == {"base_model.model.emb", "base_model.model.lin"}


@pytest.mark.parametrize("phase", ["A", "B"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_second_adapter_added_or_loaded_under_another_name_follows_its_own_phase(kind, phase, tmp_path):
    model = make(kind, phase)
    config = DeerLoraConfig(r=2, target_modules=[KINDS[kind]], modules_to_save=["head"], phase=other(phase))
    model.add_adapter("added", config)
    assert trainable(model) == expected(model, {"default": phase}), "add_adapter keeps the new adapter inactive"
    model.set_adapter("added")
    assert trainable(model) == expected(model, {"added": other(phase)}), "set_adapter to the added adapter"

    make(kind, phase).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(TinyNet(), tmp_path, adapter_name="other", is_trainable=True)
    assert trainable(loaded) == expected(loaded, {"other": phase}), "from_pretrained under another name"


@pytest.mark.parametrize("option", ["use_dora", "lora_bias"])
def test_a_refused_option_set_after_the_config_check_is_still_refused_at_injection(option):
    config = DeerLoraConfig(r=2, target_modules=["lin"])
    setattr(config, option, True)  # bypasses __post_init__, as a hand-edited config object would
    with pytest.raises(ValueError, match="DEER_LORA target lin .*(variant|LoRA bias)"):
        get_peft_model(TinyNet(), config)


# One value of every option DEER_LORA refuses (REFUSED_OPTIONS), as a user would pass it.
REFUSED_EXAMPLES = [
    ("use_dora", True),
    ("lora_bias", True),
    ("bias", "all"),
    ("bias", "lora_only"),
    ("trainable_token_indices", [0, 3]),
    ("trainable_token_indices", {"emb": [0, 3]}),
    ("target_parameters", ["lin.weight"]),
    *(("init_lora_weights", i) for i in ["pissa", "pissa_niter_4", "olora", "loftq", "eva", "corda", "lora_ga"]),
    ("init_lora_weights", "mica"),
    ("velora_config", VeloraConfig(num_groups=2)),
    ("alora_invocation_tokens", [1, 2]),
    ("monteclora_config", MontecloraConfig()),
    ("use_bdlora", BdLoraConfig(target_modules_bd_a=["lin"])),
    ("arrow_config", ArrowConfig(top_k=1)),
    ("kasa_config", KasaConfig()),
    ("use_qalora", True),
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("ensure_weight_tying", True),
]


@pytest.mark.parametrize("name,value", REFUSED_EXAMPLES, ids=[f"{n}={v!r}"[:40] for n, v in REFUSED_EXAMPLES])
def test_every_option_the_federated_core_cannot_honour_is_refused_with_one_line(name, value):
    with pytest.raises(ValueError, match=f"^{name}=.* is not supported by DEER_LORA \\(.+\\); remove it$") as error:
        DeerLoraConfig(r=2, target_modules=["lin"], **{name: value})
    assert "\n" not in str(error.value)


def test_every_lora_field_of_the_installed_peft_is_either_honoured_or_refused():
    own = {f.name for f in dataclasses.fields(PeftConfig)}
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)} - own
    assert lora_fields == set(HONOURED_OPTIONS) | set(REFUSED_OPTIONS), "review the new PEFT options"
    assert not set(HONOURED_OPTIONS) & set(REFUSED_OPTIONS)
    assert set(REFUSED_OPTIONS) == {name for name, _ in REFUSED_EXAMPLES}


def test_a_lora_field_not_reviewed_here_is_refused_unless_left_at_its_default(monkeypatch):
    monkeypatch.setattr(config_module, "HONOURED_OPTIONS", tuple(o for o in HONOURED_OPTIONS if o != "lora_dropout"))
    DeerLoraConfig(r=2, target_modules=["lin"])
    with pytest.raises(ValueError, match=r"^lora_dropout=0.1 is not supported by DEER_LORA \(a LoRA option not rev"):
        DeerLoraConfig(r=2, target_modules=["lin"], lora_dropout=0.1)


def test_a_saved_adapter_config_with_a_refused_option_is_refused_on_load(tmp_path):
    make("Linear").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "trainable_token_indices": {"emb": [0, 3]}}))
    with pytest.raises(ValueError, match="trainable_token_indices=.* is not supported by DEER_LORA"):
        PeftModel.from_pretrained(TinyNet(), tmp_path, is_trainable=True)


HONOURED_EXAMPLES = [
    {"use_rslora": True},
    {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 16}},
    {"init_lora_weights": False},
    {"init_lora_weights": "gaussian"},
    {"init_lora_weights": "orthogonal"},
    {"layers_to_transform": [1]},
    {"exclude_modules": ["vit.layers.0.attention.v_proj"]},
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("options", HONOURED_EXAMPLES, ids=lambda o: ",".join(o))
def test_honoured_options_run_a_deer_round_with_identical_engines_and_only_the_phase_factor_moving(options):
    def run(engine_cls):
        torch.manual_seed(0)
        config = DeerLoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], **options)
        model = get_peft_model(tiny_vit(), config)
        layout = adapter_layout(model)
        state = get_adapter_state(model, layout)
        tasks = random_client_tasks((6, 9), torch.Generator().manual_seed(1))
        server = FederatedServer(
            method="deer",
            layout=layout,
            global_state=state,
            num_clients=len(tasks),
            clients_per_phase=len(tasks),
            dp=None,
            randomness=DPRandomness.from_seed(3),
        )
        engine, states = engine_cls(LocalTraining(batch_size=4, lr=0.1)), [state]
        for phase in iter_phases("deer", 1):
            server.finish_phase(phase, engine.train_clients(model, layout, server.global_state, phase, tasks))
            states.append({k: v.clone() for k, v in server.global_state.items()})
        return model, layout, states

    model, layout, seq = run(SequentialEngine)
    _, _, bat = run(BatchedEngine)
    for key in seq[0]:
        for s, b in zip(seq, bat, strict=True):
            torch.testing.assert_close(b[key], s[key], rtol=1e-4, atol=1e-6, msg=key)
    for before, after, factor in ((seq[0], seq[1], "B"), (seq[1], seq[2], "A")):
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert moved == set(layout.trained_keys(factor)), f"phase {factor}"
    modules = {m: mod for m, mod in model.named_modules()}
    for f in layout.lora:
        layer = modules[f.module]
        assert f.scaling == layer.scaling["default"]
        assert seq[0][f.a_key].shape[0] == layer.r["default"]
