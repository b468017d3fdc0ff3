"""The DEeR `ServerApp`: the same run as `deer-fed`, with the clients on Flower SuperNodes.

It builds the run exactly as the simulation does (`peft_deer.experiment`), waits for `num-clients`
SuperNodes, learns which client id each holds, and runs the phase loop (`run_phases`: budget stop,
validation on the server's held-out split, best adapter, checkpoints, `resume`) with `DeerStrategy`
moving the messages. The outputs land in `output-dir` in the simulation's layout, so `python -m app
--adapter OUTPUT_DIR/adapter` serves a Flower-trained adapter unchanged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..experiment import (
    SettingsMismatch,
    build_experiment,
    final_line,
    finalize,
    prepare_output_dir,
    run_phases,
    start_or_resume,
)
from .protocol import hello_message, read_hello_reply
from .run_config import DeploymentOptions, parse_run_config
from .strategy import DeerStrategy

logger = logging.getLogger("flwr")
app = ServerApp()


def discover_clients(grid: Grid, num_clients: int, options: DeploymentOptions) -> dict[int, int]:
    """Wait for `num_clients` SuperNodes and map each announced client id to its node id.

    Raises RuntimeError if they do not all connect in `node_wait_s`, or if two announce one id.
    """
    deadline = time.monotonic() + options.node_wait_s
    while len(nodes := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of num-clients={num_clients} SuperNodes connected within {options.node_wait_s:g} s"
            )
        time.sleep(1.0)
    replies = list(grid.send_and_receive([hello_message(n) for n in nodes], timeout=options.reply_timeout_s))
    clients: dict[int, int] = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        try:
            client_id, num_examples = read_hello_reply(reply)
        except ValueError as err:
            logger.warning("%s; its client takes no part", err)
            continue
        if client_id in clients:
            raise RuntimeError(
                f"SuperNodes {clients[client_id]} and {reply.metadata.src_node_id} both hold client {client_id}"
            )
        clients[client_id] = reply.metadata.src_node_id
        logger.info(
            "client %d is SuperNode %d (%d training images)", client_id, reply.metadata.src_node_id, num_examples
        )
    missing = sorted(set(range(num_clients)) - set(clients))
    if missing:
        logger.warning("no SuperNode holds clients %s: they are dropped whenever sampled", missing)
    return clients


@app.main()
def main(grid: Grid, context: Context) -> None:
    args, options = parse_run_config(context.run_config)
    args.output_dir = str(Path(args.output_dir).resolve())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    exp = build_experiment(args, device, with_client_data=False, say=logger.info)
    out = prepare_output_dir(args, prog="deer-flower")
    logger.info("DEeR run %s -> %s", args.method, out)
    exp.save_base_model()
    try:
        progress = start_or_resume(exp, out, say=logger.info)
    except SettingsMismatch as err:
        raise ValueError(f"deer-flower: {err}") from err
    strategy = DeerStrategy(exp.server, discover_clients(grid, args.num_clients, options), args.rounds, options)
    strategy.summary()
    stopped = run_phases(exp, out, progress, strategy.release_phase(grid), say=logger.info)
    if stopped == "max-phases":
        logger.info("stopped after max-phases; continue with resume=true")
        return
    summary = finalize(
        exp, out, progress, stopped, extra_privacy=strategy.deployment_ledger(), private_extra=strategy.private_ledger()
    )
    logger.info(final_line(summary, out))
