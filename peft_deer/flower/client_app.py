"""The DEeR `ClientApp`: a hospital's SuperNode trains on its own images and returns only a delta.

Node config (`flower-supernode --node-config '...'`):
- `partition-id` (required): this site's client id in [0, num-clients), and the partition of the
  dataset it trains on;
- `num-partitions` (default: the run's num-clients): how many sites the dataset is split into, as
  the simulation splits it; 1 means the whole dataset is this site's own;
- `dataset`, `data-dir` (default: the run's): where this site's images are.

Each train message runs the core's `train_client` with the seed the simulation would use for this
client and phase. With client-level DP and the `distributed` noise placement the client clips its
update in the metric and adds its noise share (`privatize_update`) before anything leaves the site.
"""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..experiment import build_model, client_dataset, client_dp, load_run_backbone, load_run_data, local_training
from ..federated import (
    ClientTask,
    DPRandomness,
    Phase,
    build_whiteners,
    derive_seed,
    iter_phases,
    method_spec,
    privatize_update,
    train_client,
)
from .protocol import hello_reply, read_train_message, update_reply
from .run_config import parse_run_config

app = ClientApp()


def _site(context: Context):
    """(settings, options, client id, data, partition index) of this SuperNode."""
    args, options = parse_run_config(context.run_config)
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no partition-id in its --node-config")
    client_id = int(node["partition-id"])
    num_partitions = int(node.get("num-partitions", args.num_clients))
    if not 0 <= client_id < args.num_clients:
        raise ValueError(f"partition-id {client_id} is outside [0, num-clients={args.num_clients})")
    if num_partitions != 1 and num_partitions != args.num_clients:
        raise ValueError(f"num-partitions {num_partitions} must be 1 (own data) or num-clients={args.num_clients}")
    data = load_run_data(args, node.get("dataset") or None, node.get("data-dir") or None, num_partitions)
    return args, options, client_id, data, 0 if num_partitions == 1 else client_id


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Announce this site's client id and example count (loading its data checks the setup early)."""
    _, _, client_id, data, partition = _site(context)
    return hello_reply(msg, client_id, len(data.partitions[partition]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One phase of local training from the received global adapter; reply with the trained factor's delta."""
    args, _, client_id, data, partition = _site(context)
    work = read_train_message(msg)
    if work.client_id != client_id:
        raise ValueError(f"asked to train client {work.client_id}, but this SuperNode holds client {client_id}")
    phase = _phase(args.method, args.rounds, work.round, work.phase)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_run_backbone(args, data.splits)
    model, layout = build_model(args, backbone, 0.0, device)
    task = ClientTask(
        client_id, client_dataset(data, backbone, partition), derive_seed(args.seed, *phase.step, client_id, "train")
    )
    update = train_client(model, layout, work.global_state, phase, task, local_training(args))
    dp = client_dp(args)
    if dp is not None and dp.placement == "distributed":
        noise = method_spec(args.method).noise
        whiteners = build_whiteners(layout, work.global_state, list(update.delta), noise, dp.ridge)
        # The site's own secret; with reproducible-noise the simulation's draw (no guarantee: testing only).
        randomness = DPRandomness.from_seed(args.seed) if args.reproducible_noise else DPRandomness.secret()
        generator = randomness.generator(*phase.step, client_id, "noise")
        delta, _ = privatize_update(update.delta, whiteners, noise, dp, work.num_shares, generator)
        update = dataclasses.replace(update, delta=delta)
    return update_reply(msg, update)


def _phase(method: str, rounds: int, round_index: int, phase_index: int) -> Phase:
    phase = next(iter_phases(method, rounds, (round_index, phase_index)), None)
    if phase is None or phase.step != (round_index, phase_index):
        raise ValueError(f"round {round_index} phase {phase_index} is not in the run's schedule")
    return phase
