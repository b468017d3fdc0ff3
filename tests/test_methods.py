"""The method table (`peft_deer.methods`): the behaviour each name used to be compared for, now asked of its spec."""

import json

import pytest

from peft_deer import DeerLoraConfig
from peft_deer.methods import METHOD_SPECS, NoiseKind, method_spec
from peft_deer.run.io import dumps_strict
from peft_deer.tuner.config import METHODS, trained_factors


def test_method_order_and_names_are_the_public_ones():
    assert METHODS == ("deer", "rolora", "ffa", "lora", "deer-reference")
    assert all(METHOD_SPECS[m].name == m for m in METHODS)


@pytest.mark.parametrize(
    ("method", "joint", "factors", "noise", "record_noise", "budget"),
    [
        ("lora", True, ("A", "B"), "plain", "plain", True),
        ("ffa", False, ("B",), "plain", "plain", True),
        ("rolora", False, ("A", "B"), "plain", "plain", True),
        ("deer", False, ("A", "B"), "regulated", "regulated", True),
        ("deer-reference", False, ("A", "B"), "reference", "plain", False),
    ],
)
def test_spec_properties_match_the_former_name_tests(method, joint, factors, noise, record_noise, budget):
    spec = method_spec(method)
    assert spec.trains_jointly is joint  # was: method == "lora"
    assert spec.factors == factors  # was: method == "ffa" -> only B
    assert spec.noise is NoiseKind(noise)
    assert spec.record_noise is NoiseKind(record_noise)  # was: "regulated" if noise == "regulated" else "plain"
    assert spec.enforces_budget is budget  # was: method == "deer-reference" -> no budget stop
    assert trained_factors(method, "A") == (("A", "B") if joint else ("A",))


def test_noise_kind_serialises_as_its_old_string():
    assert json.loads(dumps_strict({"noise": NoiseKind.REGULATED})) == {"noise": "regulated"}
    assert f"{NoiseKind.REFERENCE}" == "reference"
    assert NoiseKind.PLAIN == "plain"


def test_ffa_phase_a_is_refused_with_the_same_message():
    with pytest.raises(ValueError, match=r"^method='ffa' trains only B: phase must be 'B'$"):
        DeerLoraConfig(r=2, target_modules=["q"], method="ffa", phase="A")
    DeerLoraConfig(r=2, target_modules=["q"], method="deer", phase="A")


def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(ValueError, match="is not one of"):
        method_spec("fedavg")


def test_config_phase_is_the_trained_factor_and_a_for_joint_phases():
    from peft_deer.federated.schedule import Phase, iter_phases

    assert [p.config_phase for p in iter_phases("deer", 1)] == ["B", "A"]
    assert [p.config_phase for p in iter_phases("ffa", 2)] == ["B", "B"]
    assert Phase(0, 0, ("A", "B")).config_phase == "A"  # what its docstring now says (it said 'B')
