"""Pytest plugin: run PEFT's generic custom-model battery on DEER_LORA.

Loaded with `-p deer_cases` into a pytest run of the *installed* peft version's own
`tests/test_custom_models.py` (unpacked from its sdist, never copied here). It

1. appends DEER_LORA cases (MLP, Embedding + transformers Conv1D, Conv2d; phases A and B; methods
   lora / ffa / rolora / deer) to the battery's `TEST_CASES`, before pytest parametrizes with it;
2. keeps only those cases and plain-`LoraConfig` controls on the same models (every other item is
   deselected);
3. marks each difference that DEER_LORA has by design as a strict xfail with its reason (a strict
   xfail that passes fails the run, so a stale expectation cannot hide);
4. writes the outcome of every selected test to the JSON file named by `DEER_BATTERY_REPORT`.

One shim: the battery's `set_init_weights_false` helper picks LoRA's switch only for the exact class
`LoraConfig`; for a subclass it would pass `init_weights=False`, a field LoRA does not have.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

import peft_deer  # noqa: F401  (registers DEER_LORA with PEFT)
from peft_deer import DeerLoraConfig

BATTERY_MODULE = "test_custom_models"
DEER_MARK = "DEER_LORA"

# (model id in the battery, its LoRA targets); the battery builds these tiny models itself.
MODELS = {
    "MLP": ["lin0", "lin1"],
    "EmbConv1D": ["emb", "conv1d"],
    "Conv2d": ["conv2d", "lin0"],
}
# (method, phase) pairs a DEER_LORA adapter can be in; `ffa` only ever trains B.
METHOD_PHASES = (
    ("lora", "A"),
    ("lora", "B"),
    ("ffa", "B"),
    ("rolora", "A"),
    ("rolora", "B"),
    ("deer", "A"),
    ("deer", "B"),
)

# Plain LoRA on the same models, from the battery's own list: the control.
CONTROL_CASES = (
    *(f"Vanilla MLP {i} LoRA" for i in range(1, 7)),
    *(f"Embedding + transformers Conv1D {i} LoRA" for i in range(1, 4)),
    "Conv2d 1 LoRA",
    "Conv2d 2 LoRA",
)


def deer_cases() -> list[tuple[str, str, type, dict]]:
    """DEER_LORA entries in the battery's `TEST_CASES` format: (name, model id, config class, kwargs)."""
    cases = []
    for model_id, targets in MODELS.items():
        for method, phase in METHOD_PHASES:
            kwargs = {"target_modules": targets, "method": method, "phase": phase}
            cases.append((f"{DEER_MARK} {model_id} {method} {phase}", model_id, DeerLoraConfig, kwargs))
    head = {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "method": "deer"}
    for phase in ("A", "B"):
        cases.append((f"{DEER_MARK} MLP deer {phase} head", "MLP", DeerLoraConfig, {**head, "phase": phase}))
    return cases


@dataclass(frozen=True)
class ExpectedDifference:
    """A battery test that fails on some DEER_LORA cases by design: a strict xfail raising `raises`."""

    tests: tuple[str, ...]  # the battery's test function names
    applies: Callable[[dict], bool]  # on the case's config kwargs
    raises: type[BaseException]
    reason: str


def _frozen_b_is_zero(kwargs: dict) -> bool:
    return kwargs.get("method") != "lora" and kwargs.get("phase") == "A"


EXPECTED_DIFFERENCES = (
    ExpectedDifference(
        ("test_only_params_are_updated",),
        _frozen_b_is_zero,
        AssertionError,
        "phase A trains A with B frozen at its zero init, so A's gradient is 0 and A cannot move",
    ),
    ExpectedDifference(
        ("test_disable_adapters", "test_disable_adapters_with_merging"),
        lambda kw: _frozen_b_is_zero(kw) and not kw.get("modules_to_save"),
        AssertionError,
        "phase A from a zero-initialised, frozen B cannot change the output, which the test requires after training",
    ),
    ExpectedDifference(
        ("test_adding_multiple_adapters_with_bias_raises",),
        lambda kw: True,
        ValueError,
        "DeerLoraConfig refuses bias='all' at config time (base biases are never aggregated)",
    ),
)


def expected_difference(test_name: str, kwargs: dict) -> ExpectedDifference | None:
    """The difference this DEER_LORA item is expected to show by design (None: it must pass)."""
    return next((d for d in EXPECTED_DIFFERENCES if test_name in d.tests and d.applies(kwargs)), None)


def _battery_module(collector) -> object | None:
    module = getattr(collector, "module", None)
    return module if module is not None and module.__name__.rsplit(".", 1)[-1] == BATTERY_MODULE else None


def _lora_aware_init_false(original):
    """`original` with LoRA's switch (`init_lora_weights=False`) for every LoraConfig subclass."""
    from peft import AdaLoraConfig, LoraConfig

    def set_init_weights_false(config_cls, kwargs):
        if issubclass(config_cls, LoraConfig) and not issubclass(config_cls, AdaLoraConfig):
            return {**kwargs, "init_lora_weights": False}
        return original(config_cls, kwargs)

    return set_init_weights_false


class DeerBattery:
    """The plugin object: injection at first collection, selection and marks, outcome report."""

    def __init__(self) -> None:
        self.injected = False
        self.cases: dict[str, str] = {}  # node id -> the battery case it runs
        self.outcomes: dict[str, dict] = {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_pycollect_makeitem(self, collector, name, obj):
        module = _battery_module(collector)
        if module is None or self.injected:
            return None
        # The parametrize marks hold this very list object; pytest reads it when it generates the items.
        cases = getattr(module, "TEST_CASES", None)
        if not isinstance(cases, list):
            raise pytest.UsageError(f"{module.__file__} has no TEST_CASES list; the battery's layout changed")
        cases.extend(deer_cases())
        for mod in [m for n, m in sys.modules.items() if n.rsplit(".", 1)[-1] in ("testing_utils", BATTERY_MODULE)]:
            if hasattr(mod, "set_init_weights_false"):
                mod.set_init_weights_false = _lora_aware_init_false(mod.set_init_weights_false)
        self.injected = True
        return None

    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            case = params.get("test_name")
            if isinstance(case, str) and (case.startswith(DEER_MARK) or case in CONTROL_CASES):
                keep.append(item)
                self.cases[item.nodeid] = case
                if case.startswith(DEER_MARK):
                    diff = expected_difference(item.originalname, params.get("config_kwargs", {}))
                    if diff is not None:
                        reason = f"expected by design: {diff.reason}"
                        item.add_marker(pytest.mark.xfail(reason=reason, raises=diff.raises, strict=True))
            else:
                drop.append(item)
        if not self.injected:
            raise pytest.UsageError(f"{BATTERY_MODULE}.py was not collected: nothing to inject DEER_LORA cases into")
        config.hook.pytest_deselected(items=drop)
        items[:] = keep

    def pytest_runtest_logreport(self, report):
        outcome = _outcome(report)
        if outcome is None:
            return
        previous = self.outcomes.get(report.nodeid, {}).get("outcome")
        if previous in (None, "passed"):  # a failed teardown overrides a passed call
            reason = ""
            if report.longrepr is not None and outcome != "passed":
                reason = str(report.longrepr)[-600:] if outcome in ("failed", "error") else _skip_reason(report)
            self.outcomes[report.nodeid] = {"case": self.cases.get(report.nodeid), "outcome": outcome, "reason": reason}

    def pytest_sessionfinish(self, session):
        path = os.environ.get("DEER_BATTERY_REPORT")
        if path:
            with open(path, "w") as f:
                json.dump({"injected": self.injected, "tests": self.outcomes}, f)
        counts = Counter(v["outcome"] for v in self.outcomes.values())
        print(f"\nDEER_LORA battery: {dict(counts)}", file=sys.stderr)


def _outcome(report) -> str | None:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.when == "call":
        return report.outcome
    if report.failed:
        return "error"
    if report.skipped:
        return "skipped"
    return None


def _skip_reason(report) -> str:
    if hasattr(report, "wasxfail"):
        return report.wasxfail
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def pytest_configure(config):
    config.pluginmanager.register(DeerBattery(), "deer-battery")
