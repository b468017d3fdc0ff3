"""A run's final outputs: adapters (final, best, plain-LoRA export), privacy ledger, test metrics, curves,
model card and `summary.json` (written last).

Every file is written atomically: JSON via a temp file and a rename, each adapter dir complete in
`<name>.tmp` and renamed into place after all three are written, so a failed or killed final write leaves the
previous complete files. Output layout of a run directory: adapter/, adapter-best/, adapter-lora/ (plain LoRA export),
privacy.json, metrics.jsonl, summary.json, curves.png, examples/, base-model/ (random backbones only)
-- all of it publishable: nothing in it is computed from a client's data without noise.
Each adapter's temperature (probabilities = softmax(logits / T), fitted on the server's validation split)
is in its `peft_deer_run.json` and in `summary.json` under `calibration`.
`server-private/` (owner-only) holds what is (training losses, update norms, participants, timing, per-client
label counts, dropped updates) and, while the run is unfinished, `checkpoint.pt` with the run's DP secret.
Never publish it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..federated import load_adapter_state
from ..federated.trust_model import trust_model_of
from ..tuner.export import export_lora_adapter
from .evaluate import final_evaluation
from .experiment import Experiment
from .files import CHECKPOINT, DEPLOYMENT, PRIVACY_LEDGER, SUMMARY
from .io import write_json_atomic
from .progress import RunProgress
from .reporting import model_card, plot_curves, reproducible_noise_label
from .run_dir import live_dir, publish, remove_temp_files

DECISION_RULE = (
    "class 1 when P(class 1) >= decision_threshold, P = softmax(logits / temperature) "
    "(threshold: Youden's J on the calibrated validation probabilities)"
)
OFFSET_RULE = (
    "argmax over classes of log P(class) + class_offsets, P = softmax(logits / temperature) "
    "(offsets: maximise balanced accuracy on the calibrated validation probabilities)"
)


def finalize(
    exp: Experiment,
    out: Path,
    progress: RunProgress,
    stopped: str | None,
    extra_privacy: dict | None = None,
    private_extra: dict | None = None,
) -> dict[str, Any]:
    """Write adapters, ledger, test metrics, curves and the model card; `summary.json` last. Returns the summary.

    `extra_privacy` is merged into the ledger (a deployment states its transport and trust model there);
    `private_extra` goes to `server-private/deployment.json` (e.g. which clients' updates were dropped).
    """
    settings, model, server, splits, backbone = exp.settings, exp.model, exp.server, exp.data.splits, exp.backbone
    data = settings.data
    published, out = out, live_dir(out)  # a run that ended before its first checkpoint is still staged
    remove_temp_files(out)  # from a run killed while writing its outputs, now resumed
    test, calibration = {}, {}
    adapters = {"final": server.global_state}
    if progress.best is not None:
        adapters["best"] = progress.best.state
    staged: dict[Path, Path] = {}  # adapter dir -> its complete copy, renamed into place once all are written
    for name, state in adapters.items():
        load_adapter_state(model, state)
        with exp.model_inputs():
            evaluation = final_evaluation(exp)  # this adapter's temperature and threshold, from validation only
        val, test[name], calibration[name] = evaluation.val, evaluation.test, evaluation.calibration
        target = out / ("adapter" if name == "final" else "adapter-best")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, save_embedding_layers=False)  # vision backbones: no resized vocabulary to save
        write_json_atomic(
            tmp / "peft_deer_run.json",
            {
                "class_names": splits.class_names,
                "image_size": backbone.image_size,
                "num_channels": backbone.num_channels,
                "mean": list(backbone.mean),
                "std": list(backbone.std),
                "base_model": exp.base_name,
                "base_model_sha256": backbone.weights_sha256,
                "model": settings.model.model,
                "base_description": backbone.description,
                "method": settings.federation.method,
                "dataset": settings.data.dataset,
                "decision_threshold": val["threshold"],
                "decision_rule": DECISION_RULE
                if val["threshold"] is not None
                else (OFFSET_RULE if evaluation.class_offsets else "argmax"),
                **({"class_offsets": evaluation.class_offsets} if evaluation.class_offsets else {}),
                "val_sensitivity": val["sensitivity"],
                "val_specificity": val["specificity"],
                "temperature": evaluation.temperature,  # the demo divides the logits by it before the softmax
                "calibration": evaluation.calibration,
                "reproducible_noise": settings.privacy.reproducible_noise,
                **reproducible_noise_label(settings.privacy.reproducible_noise),
            },
        )
        staged[target] = tmp
    load_adapter_state(model, server.global_state)
    lora = out / "adapter-lora.tmp"
    shutil.rmtree(lora, ignore_errors=True)
    export_lora_adapter(staged[out / "adapter"], lora)
    shutil.copy2(staged[out / "adapter"] / "peft_deer_run.json", lora / "peft_deer_run.json")
    staged[out / "adapter-lora"] = lora

    ledger = {**server.ledger(), "dataset": settings.data.dataset, **(extra_privacy or {})}
    ledger["trust_model_table"] = trust_model_of(ledger)  # per adversary: the epsilon that holds against it
    write_json_atomic(out / PRIVACY_LEDGER, ledger)
    if private_extra:
        write_json_atomic(out / DEPLOYMENT, private_extra)
    if progress.rows:
        curves = out / "curves.tmp"
        shutil.rmtree(curves, ignore_errors=True)
        curves.mkdir()
        plot_curves(progress.rows, curves / "curves.png", ledger)
        os.replace(curves / "curves.png", out / "curves.png")
        curves.rmdir()
    rounds_done = len(server.releases) // server.spec.releases_per_round
    info = {
        "method": settings.federation.method,
        "dataset": settings.data.dataset,
        "base_model": exp.base_name,
        "base_model_sha256": backbone.weights_sha256,
        "base_description": backbone.description,
        "class_names": splits.class_names,
        "num_clients": settings.data.num_clients,
        "partition": data.partition
        + (f" alpha={data.dirichlet_alpha}" if data.partition.startswith("dirichlet") else ""),
        "image_size": backbone.image_size,
        "rank": settings.model.rank,
        "lora_alpha": settings.model.lora_alpha,
        "server_optimizer": server.optimizer.describe(),
        "rounds_completed": rounds_done,
        "privacy": ledger,
        "test": test,
        "calibration": calibration,
    }
    card = model_card(info)
    for tmp in staged.values():
        (tmp / "README.md").write_text(card)
    for target, tmp in staged.items():
        _replace_dir(tmp, target)
    summary = {
        **{k: v for k, v in info.items() if k != "privacy"},
        "epsilon": ledger.get("epsilon"),
        "delta": ledger.get("delta"),
        "privacy_level": ledger["level"],
        "reproducible_noise": settings.privacy.reproducible_noise,
        **reproducible_noise_label(settings.privacy.reproducible_noise),
        "stopped": stopped,
        "head_refit": None
        if server.refit is None
        else {  # validation only: the test split chose nothing
            k: server.refit.get(k) for k in ("applied", "dims", "shrinkage", "val_auc_before", "val_auc_after")
        },
        "best_round": None if progress.best is None else progress.best.round,
        "args": settings.flat(),
        "args_sha256": hashlib.sha256(json.dumps(settings.fingerprint(), sort_keys=True).encode()).hexdigest(),
    }
    write_json_atomic(out / SUMMARY, summary)
    (out / CHECKPOINT).unlink(missing_ok=True)
    publish(published)
    return summary


def _replace_dir(tmp: Path, target: Path) -> None:
    """Put the complete directory `tmp` at `target` by renames (the old one is removed last); a kill in
    between leaves `*.tmp` dirs that a resumed run removes before it writes its outputs again."""
    for path in (tmp, *tmp.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    old = target.with_name(target.name + ".old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def final_line(summary: dict[str, Any], out: Path) -> str:
    """The one-line result a driver prints at the end."""
    final = summary["test"]["final"]
    auc = "n/a" if final["auc"] is None else f"{final['auc']:.4f}"
    eps = summary.get("epsilon")
    return (
        f"done: {summary['method']} test acc {final['accuracy']:.4f} bal acc {final['balanced_accuracy']:.4f} auc {auc}"
        + ("" if eps in (None, float("inf")) else f" eps {eps:.3f}")
        + (" (reproducible noise: NO privacy guarantee)" if summary.get("reproducible_noise") else "")
        + f" -> {out}"
    )
