"""`--head-refit stats` under Flower: the statistics travel as a site reply, noised at the site.

The ServerApp's whole run (`run_experiment` with a `FlowerTransport`) goes in process over a grid that hands every
message to the sites' real `handle` (tiny random ViT, real MedMNIST, CPU): its refitted head and ledger equal the
simulation's (exact without DP; with reproducible noise the sites draw the simulation's noise, so exact too); a
site's reply at a DP level carries noise of the stated std around its exact statistics.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from helpers import MEDMNIST_DIR

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'peft_deer[flower]')")

from flwr.app import Message, MessageType  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_flower_sites import tiny_run_config  # noqa: E402

from peft_deer.federated import get_adapter_state  # noqa: E402
from peft_deer.federated.head_refit import (  # noqa: E402
    CLIENT_SENSITIVITY,
    RECORD_SENSITIVITY,
    hospital_contribution,
    pca_projection,
)
from peft_deer.flower.refit import STATISTICS, site_share_divisor, statistics_message  # noqa: E402
from peft_deer.flower.run_config import parse_run_config  # noqa: E402
from peft_deer.flower.server_app import FlowerTransport  # noqa: E402
from peft_deer.flower.site import handle, site_for  # noqa: E402
from peft_deer.run import Host, run_experiment  # noqa: E402
from peft_deer.run.privacy import refit_multiplier  # noqa: E402
from peft_deer.run.refit import RefitRequest, dataset_labels, head_features  # noqa: E402
from peft_deer.run.simulation import Simulation  # noqa: E402

RUN_KEY = "0123456789abcdef"
KINDS = {MessageType.QUERY: "hello", MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate"}
LEVELS = {  # run config of each level; DP levels are statistics-only runs (rounds 0): the refit is the release
    "none": {"dp": "none", "rounds": 1},
    "client": {"dp": "client", "noise-multiplier": 1.5, "delta": 1e-3, "noise-placement": "distributed", "rounds": 0},
    "record": {"dp": "record", "record-epsilon": 4.0, "record-delta": 1e-4, "rounds": 0},
}


pytestmark = pytest.mark.usefixtures("one_thread", "flower_task_identity")  # (conftest.py)


class SiteGrid:
    """A Flower `Grid` in this process: node 100 + c holds client c, and each message goes to its site's `handle`
    (a copy travels); `replies` keeps what the server received, with its kind."""

    def __init__(self, run_config: dict, state_dir, clients: int = 2) -> None:
        self.run_config = run_config
        self.nodes = {
            100 + c: {"partition-id": c, "data-dir": str(MEDMNIST_DIR), "state-dir": str(state_dir)}
            for c in range(clients)
        }
        self.replies: list[tuple[str, Message]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        out = []
        for msg in messages:
            kind = KINDS[msg.metadata.message_type]
            content = handle(kind, copy.deepcopy(msg.content), self.run_config, self.nodes[msg.metadata.dst_node_id])
            out.append(Message(content, reply_to=msg))
            self.replies.append((kind, out[-1]))
        return out


def run_config(level: str, out) -> dict:
    overrides = {"head-refit": "stats", "refit-dims": 8, "min-clients-per-phase": 2, "reproducible-noise": True}
    return tiny_run_config(**LEVELS[level], **overrides, **{"output-dir": str(out)})


def _without_time(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "seconds"}


@pytest.mark.parametrize("level", list(LEVELS))
def test_a_flower_refit_equals_the_simulations_and_is_in_the_ledger(level, tmp_path, medmnist_dir):
    """Flower and deer-fed on the same data, partition and seeds: the same refitted head, bit for bit (no DP:
    exact statistics; client / record: the sites draw the simulation's reproducible noise), the same head_refit
    entry, and the same ledgers (client: one more release at q = 1; record: each site's Gaussian step)."""
    config = run_config(level, tmp_path / "flower")
    settings, options = parse_run_config(config)
    grid = SiteGrid(config, tmp_path / "site-state")
    outcome = run_experiment(settings, FlowerTransport(grid, options), Host(say=lambda _: None))
    assert outcome.summary is not None
    sim = run_experiment(settings.replace(output_dir=str(tmp_path / "sim")), Simulation(), Host(say=lambda _: None))
    assert [k for k, r in grid.replies].count("train") == 2 * (2 if level == "none" else 0) + 2  # + the statistics

    flower_adapter = load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors")
    sim_adapter = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(flower_adapter[k], sim_adapter[k]) for k in sim_adapter)
    flower_ledger, sim_ledger = (json.loads((o.out / "privacy.json").read_text()) for o in (outcome, sim))
    refit = flower_ledger["head_refit"]
    assert refit["applied"] and refit["dims"] == 8 and _without_time(refit) == _without_time(sim_ledger["head_refit"])
    assert outcome.summary["head_refit"]["val_auc_after"] == sim.summary["head_refit"]["val_auc_after"]
    m = refit_multiplier(settings)
    if level == "client":
        assert refit["client"]["noise_placement"] == "distributed" and refit["client"]["share_divisor"] >= 1
        assert flower_ledger["epsilon"] == pytest.approx(sim_ledger["epsilon"]) and flower_ledger["epsilon"] > 0
    if level == "record":
        assert flower_ledger["record"]["steps"] == sim_ledger["record"]["steps"] == {"0": 1, "1": 1}
        assert flower_ledger["record"]["epsilon_per_client"] == pytest.approx(
            sim_ledger["record"]["epsilon_per_client"]
        )
        assert refit["record"]["noise_std_per_hospital"] == pytest.approx(m * RECORD_SENSITIVITY)
    if level == "none":
        assert refit["noise"].startswith("none")
        head = [k for k in flower_adapter if "classifier" in k]
        best = load_file(tmp_path / "flower" / "adapter-best" / "adapter_model.safetensors")
        assert head and all(not flower_adapter[k].equal(best[k]) for k in head)  # the head was refitted


@pytest.mark.parametrize("level", ["record", "client"])
def test_a_site_sends_only_noised_statistics_of_the_stated_std(level, tmp_path, medmnist_dir):
    """With the site's own secret (no reproducible noise), the reply differs from the site's exact statistics by
    noise of std m sqrt(3) (record) or m sqrt(3) / sqrt(d) (distributed client share); an identical re-send gets the
    identical reply, another instruction is refused."""
    config = {**run_config(level, tmp_path / "out"), "reproducible-noise": False}
    settings, _ = parse_run_config(config)
    node = {"partition-id": 1, "data-dir": str(MEDMNIST_DIR), "state-dir": str(tmp_path / "state")}
    site = site_for(config, node)
    state = get_adapter_state(site.model, site.layout)
    features = head_features(site.model, site.layout, site.train_data, 64)
    labels = dataset_labels(site.train_data)
    projection = pca_projection(features, 8)  # any public projection does
    m, d = refit_multiplier(settings), site_share_divisor(site) if level == "client" else None  # d = k - t
    request = RefitRequest(projection, 2, m, level == "client", level == "record", d)
    msg = statistics_message(101, state, request, 1, RUN_KEY)
    reply = handle("train", copy.deepcopy(msg.content), config, node)
    sent = reply.array_records[STATISTICS].to_torch_state_dict()["vector"].double().numpy()
    weight = 1.0 if level == "record" else 1.0 / len(labels)
    exact = hospital_contribution(projection.clipped(features), labels, 2, weight).vector()
    noise = sent - exact
    std = m * RECORD_SENSITIVITY if level == "record" else m * CLIENT_SENSITIVITY / math.sqrt(d)
    assert len(noise) == request.size == 2 * (1 + 8 + 64)
    assert 0.75 * std < float(np.std(noise)) < 1.25 * std and abs(float(np.mean(noise))) < 0.3 * std
    again = handle("train", copy.deepcopy(msg.content), config, node)
    assert np.array_equal(again.array_records[STATISTICS].to_torch_state_dict()["vector"].double().numpy(), sent)
    if level == "record":  # one Gaussian step in the site's accountant, not two for the re-send
        report = reply.config_records["record-dp"]
        assert list(report["history-sigma"]) == [m] and list(report["history-steps"]) == [1]
        assert list(again.config_records["record-dp"]["history-steps"]) == [1]
    other = statistics_message(
        101, state, RefitRequest(pca_projection(features, 4), 2, m, *request_levels(request)), 1, RUN_KEY
    )
    with pytest.raises(ValueError, match="already answered for another instruction"):
        handle("train", copy.deepcopy(other.content), config, node)


def request_levels(request: RefitRequest) -> tuple:
    return request.client_level, request.record_level, request.share_divisor


def test_a_refit_with_secure_aggregation_passes_the_setup_that_once_refused_it():
    """SecAgg+ carries the statistics now (`tests/test_flower_secagg_refit.py`): the setup no longer refuses it."""
    from types import SimpleNamespace

    config = {"dp": "client", "noise-multiplier": 1.0, "noise-placement": "distributed", "secure-aggregation": True}
    settings, options = parse_run_config(
        tiny_run_config(**config, **{"head-refit": "stats", "min-clients-per-phase": 2})
    )
    exp = SimpleNamespace(settings=settings, server=SimpleNamespace(record=None), deployment_fingerprint={})
    FlowerTransport(None, options, context=object()).before_start(exp, None)
    assert exp.deployment_fingerprint == {"secagg-noise": "skellam"}
    # with training the refit's multiplier is the fixed refit-noise-multiplier, as the sites compute it
    transport = FlowerTransport(None, options, context=object())
    assert transport.refit_multiplier(exp) == settings.refit.refit_noise_multiplier
