"""The ClientApp component of the DEeR Flower app (`[tool.flwr.app.components] clientapp`).

Flower starts a fresh `flwr-clientapp` process for every message a SuperNode receives, and importing
`peft_deer` loads torch (seconds) before a site's data and model (about 30 s more). So this module lives
outside the package, imports no torch, and hands each message to the site's long-lived worker
(`peft_deer.flower.worker_link`; the worker keeps the site loaded across messages). Node config
`site-worker=false` does the work in this process instead (everything reloaded per message). The wire format
(`peft_deer.flower.wire`), the SecAgg+ mask hardening (`peft_deer.flower.mask_hardening`) and the site's SecAgg+
checks (`peft_deer.flower.secagg_guard`) are loaded by path from the `peft_deer` beside this file
(`peft_deer.light_import`), without the package's torch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

_spec = importlib.util.spec_from_file_location(
    "_peft_deer_light_import", Path(__file__).resolve().parent / "peft_deer" / "light_import.py"
)
_light = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_light)
_light.load("peft_deer.flower.mask_hardening").harden_secaggplus_masks()
ask_worker = _light.load("peft_deer.flower.worker_link").ask_worker
guarded_secaggplus = _light.load("peft_deer.flower.secagg_guard").guarded_secaggplus

app = ClientApp()


def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` for the train messages of a SecAgg+ run (they carry its config record; the mod
    masks what the site returns), behind the site's own checks (`peft_deer.flower.secagg_guard`); the plain train
    path for the others."""
    return guarded_secaggplus(msg, context, call_next)


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Which client this site holds, and how many training images."""
    return _answer("hello", msg, context)


@app.train(mods=[secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    """One phase of local training; the reply carries only the trained factor's delta (privatized under
    distributed noise; masked by SecAgg+ when the server runs the phase through it)."""
    return _answer("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Counts of the final adapter's decisions on this site's held-out images."""
    return _answer("evaluate", msg, context)


def _answer(kind: str, msg: Message, context: Context) -> Message:
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    if str(node_config.get("site-worker", True)).lower() in ("false", "0", "no"):
        from peft_deer.flower.site import handle  # in this process: torch, data and model load per message

        content = handle(kind, msg.content, run_config, node_config)
    else:
        content = ask_worker(kind, msg.content, run_config, node_config)
    return Message(content, reply_to=msg)
