"""A hospital's side of the DEeR Flower app: its data, backbone and model, and what it does with a message.

`handle(kind, content, run_config, node_config)` answers one message's content (hello, train, evaluate; a train
message of step `statistics` is the head refit's, `flower/refit.py`)
with the reply's content. It runs in the site's long-lived worker (`site_worker.py`), or in the
ClientApp process itself with `site-worker=false`; either way a `Site` is built once per run settings
and node config and kept (`site_for`), so data, backbone and model are loaded once, not per message.

Node config (`flower-supernode --node-config '...'`):
- `partition-id` (required): this site's client id in [0, num-clients), and the partition of the
  dataset it trains on;
- `num-partitions` (default: the run's num-clients): how many sites the dataset is split into, as
  the simulation splits it; 1 means the whole dataset is this site's own;
- `dataset`, `data-dir` (default: the run's): where this site's images are;
- `state-dir` (default `~/.local/state/peft_deer/site`): where the site keeps its record-level DP
  accountant between messages and restarts, its training diagnostics and (under DP) its evaluation;
- `public-size` (default: the run config's `record-public-sizes` entry for this partition-id, else the site's
  image count floored to 2 significant figures, `record_dp.public_size`, logged as derived: one record can move
  it at a grid edge): the site's declared public size under record-level DP, which fixes q, steps and sigma;
- `site-worker` (default true), `site-worker-idle-s`: see `peft_deer.flower.worker_link`.

Each train message runs the core's `train_client` with the seed the simulation would use for this
client and phase. With client-level DP and the `distributed` noise placement the client clips its
update in the metric and adds its noise share (`privatize_update`) before anything leaves the site,
with the sigma, C, lambda and noise kind the train instruction carries (`protocol.NoiseTerms`,
checked against this site's own run settings).
With record-level DP it trains with DP-SGD (the core's `record_dp`), q, steps and sigma from its declared
public size, and returns its accountant (`SiteAccountant`) with the update.
Under any DP a reply carries only the DP output and public values (client id, public weight, the record-level
report); the site's loss, images seen, timing and exact count go to its own `diagnostics-*.jsonl` in the state
directory, and its evaluation counts to its own `site-evaluation-*.json` (`SiteEvaluated` is all it answers).
Without DP (no guarantee claimed) they are sent to the server as before.
In a SecAgg+ phase (`secure-aggregation=true`) the train message is a legacy `FitIns` holding the same
instruction, noise terms included (`secagg_protocol`); the site trains and privatizes it alike and
answers with a `FitRes`, which the ClientApp's `secaggplus_mod` quantizes and masks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from peft import PeftModel
from torch.utils.data import Dataset

from ..data import partition_clients
from ..evaluation.metrics import predict_proba
from ..federated import (
    AdapterLayout,
    ClientTask,
    ClientUpdate,
    DPRandomness,
    Phase,
    build_whiteners,
    derive_seed,
    iter_phases,
    load_adapter_state,
    method_spec,
    privatize_update,
    train_client,
)
from ..federated.record_dp import RecordLevel
from ..federated.skellam import plan_skellam, skellam_message
from ..run.io import write_json_atomic
from ..run.privacy import local_training
from ..run.task import RunData, build_model, client_dataset, load_run_backbone, load_run_data, tensor_dataset
from ..settings import RunSettings
from .protocol import (
    SCORE_BINS,
    NoiseTerms,
    RecordReport,
    SiteCounts,
    SiteEvaluated,
    TrainInstruction,
    hello_content,
    read_evaluate_content,
    read_train_content,
    update_content,
)
from .refit import is_statistics, site_share_divisor, site_statistics
from .run_config import OPTION_KEYS, DeploymentOptions, parse_run_config
from .secagg_guard import check_threshold, default_state_dir, secagg_view
from .secagg_protocol import fit_res_content, is_fit_ins, read_fit_ins
from .secagg_refit import is_statistics_fit_ins, site_statistics_fit_res
from .site_accounting import SiteAccountant, site_record_level
from .site_evaluation import site_metrics
from .site_noise import noise_stream

# Run settings only the server uses: runs that differ in these share a site's loaded data and model.
SERVER_ONLY = {"output-dir", "resume", "overwrite", "max-phases", *OPTION_KEYS}
# Node config that does not change the data or the mechanism ("public-size" does: not here).
SITE_KEYS = {"state-dir", "site-worker", "site-worker-idle-s"}
MAX_SITES = 2  # loaded (settings, node) combinations kept per process
logger = logging.getLogger("peft_deer.flower.site")


@dataclass
class Site:
    """One site of one run's settings: its training partition, held-out images, model and DP settings."""

    settings: RunSettings
    client_id: int
    num_partitions: int
    data: RunData
    model: PeftModel
    layout: AdapterLayout
    train_data: Dataset
    record: RecordLevel | None
    state_dir: Path
    held_out: Dataset | None = None  # (pixel_values, label) of this site's held-out images
    options: DeploymentOptions | None = None  # the run config's deployment options (SecAgg+ and its noise)

    @classmethod
    def build(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Site:
        """Load the site's data, backbone and model. ValueError (one line) on bad node config."""
        settings, options = parse_run_config(run_config)
        if "partition-id" not in node_config:
            raise ValueError("this SuperNode has no partition-id in its --node-config")
        client_id = int(node_config["partition-id"])
        num_clients = settings.data.num_clients
        num_partitions = int(node_config.get("num-partitions", num_clients))
        if not 0 <= client_id < num_clients:
            raise ValueError(f"partition-id {client_id} is outside [0, num-clients={num_clients})")
        if num_partitions != 1 and num_partitions != num_clients:
            raise ValueError(f"num-partitions {num_partitions} must be 1 (own data) or num-clients={num_clients}")
        data = load_run_data(
            settings, node_config.get("dataset") or None, node_config.get("data-dir") or None, num_partitions
        )
        backbone = load_run_backbone(settings, data.splits)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, layout = build_model(settings, backbone, 0.0, device)
        partition = 0 if num_partitions == 1 else client_id
        train_data = client_dataset(data, backbone, partition)
        declared = _declared_size(node_config.get("public-size"))
        if declared is None and settings.record.public_sizes is not None:  # the run config's declaration
            sizes = settings.record.public_sizes
            if len(sizes) != num_clients:
                raise ValueError(f"record-public-sizes {list(sizes)} must give one size per client ({num_clients})")
            declared = sizes[client_id]
        if declared is None and settings.privacy.record_level:
            logger.info(
                "record-level DP: public size derived from this site's image count (floored to a grid; one record "
                "can change it at a grid edge); set node config public-size to fix it in advance"
            )
        record = site_record_level(settings, len(train_data), declared)
        state_dir = Path(node_config.get("state-dir") or default_state_dir()).expanduser()
        site = cls(settings, client_id, num_partitions, data, model, layout, train_data, record, state_dir)
        site.options = options
        site.held_out = tensor_dataset(backbone, data.splits.test, site.held_out_indices())
        return site

    @property
    def partition(self) -> int:
        return 0 if self.num_partitions == 1 else self.client_id

    def held_out_indices(self) -> np.ndarray:
        """This site's held-out images: its own test split, or (a shared dataset split across sites) its share of
        the test split, partitioned as the training split is."""
        labels = self.data.splits.test.labels
        if self.num_partitions == 1:
            return np.arange(len(labels))
        data, seed = self.settings.data, self.settings.federation.seed
        parts = partition_clients(
            labels, self.num_partitions, data.partition, data.dirichlet_alpha, seed=derive_seed(seed, "site-test")
        )
        return np.sort(parts[self.client_id])

    # -- the three messages --------------------------------------------------------------------------
    @property
    def private(self) -> bool:
        """Whether the run has DP: then nothing un-noised about this site's data leaves it."""
        return self.settings.privacy.dp != "none"

    def public_count(self) -> int | None:
        """The count this site may announce: its declared public size under record-level DP, none under
        client-level DP only, its exact image count without DP (no guarantee claimed)."""
        if self.record is not None:
            return self.record.dp.public_size(self.client_id, len(self.train_data))
        return None if self.private else len(self.train_data)

    def hello(self) -> RecordDict:
        """Announce this site's client id and the count it may announce (`public_count`)."""
        return hello_content(self.client_id, self.public_count())

    def train(self, content: RecordDict) -> RecordDict:
        """One phase of local training from the received global adapter; the trained factor's delta."""
        return update_content(*self.reply_update(read_train_content(content)), statistics=not self.private)

    def reply_update(self, work: TrainInstruction) -> tuple[ClientUpdate, RecordReport | None]:
        """`train_update`, then what may leave the site: under DP the statistics go to the site's own log and the
        weight becomes public (the declared size under record-level DP, else 1: client-level weights are uniform)."""
        update, report = self.train_update(work)
        if not self.private:
            return update, report
        self.log_diagnostics(work, update)
        count = self.public_count()
        return ClientUpdate(update.client_id, update.delta, 1 if count is None else count), report

    def log_diagnostics(self, work: TrainInstruction, update: ClientUpdate) -> None:
        """Append this update's training statistics to the site's own `diagnostics-<run key>-client<k>.jsonl`."""
        row = {
            "round": work.round,
            "phase": work.phase,
            "num_examples": len(self.train_data),
            "train_loss": update.mean_loss,
            "images_seen": update.images_seen,
            "seconds": update.seconds,
        }
        path = self.state_dir / f"diagnostics-{work.run_key or 'no-run-key'}-client{self.client_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def train_update(self, work: TrainInstruction) -> tuple[ClientUpdate, RecordReport | None]:
        """Train one phase as `work` says (a plain train message or a SecAgg+ phase's `FitIns`): the update,
        privatized with the noise terms `work` carries under distributed noise, and the record-level report."""
        settings, client_id = self.settings, self.client_id
        seed = settings.federation.seed
        if work.client_id != client_id:
            raise ValueError(f"asked to train client {work.client_id}, but this SuperNode holds client {client_id}")
        phase = _phase(settings.federation.method, settings.federation.rounds, work.round, work.phase)
        noise = self.expected_noise(work.noise)
        most = site_share_divisor(self)
        if noise is not None and not 1 <= work.num_shares <= most:
            raise ValueError(f"the train instruction's num-shares {work.num_shares} is outside [1, d = k - t = {most}] "
                             "of this run's config: refused (a larger d is a smaller noise share)")  # fmt: skip
        # DP draws: the site's own secret; with reproducible-noise the simulation's (no guarantee: testing only).
        randomness = DPRandomness.from_seed(seed) if settings.privacy.reproducible_noise else None
        task = ClientTask(
            client_id,
            self.train_data,
            derive_seed(seed, *phase.step, client_id, "train"),
            dp_randomness=None
            if randomness is None or self.record is None
            else randomness.child(*phase.step, client_id, "record-dp"),
        )
        update = train_client(
            self.model, self.layout, work.global_state, phase, task, local_training(settings, self.record)
        )
        report = None
        if self.record is not None:
            report = SiteAccountant(self.state_dir, work.run_key, client_id).step(self.record, update.num_examples)
        if noise is not None:
            whiteners = build_whiteners(self.layout, work.global_state, list(update.delta), noise.noise, noise.ridge)
            # the site's key and the instruction's digest (`site_noise`): a re-sent instruction gets the same share
            if randomness is None:
                stream = noise_stream(self.state_dir, work)
            else:
                stream = randomness.stream(*phase.step, client_id, "noise")
            dp = noise.client_dp()
            if work.skellam_scale is None:
                delta, _ = privatize_update(update.delta, whiteners, noise.noise, dp, work.num_shares, stream)
            else:  # SecAgg+ with integer (Skellam) shares: the plan follows from public terms, s checks it
                dim = sum(v.numel() for v in update.delta.values())
                plan = plan_skellam(dp.noise_multiplier, dp.clip_norm, dim, work.num_shares, 1)
                if plan.scale != work.skellam_scale:
                    raise ValueError(f"skellam scale {work.skellam_scale} is not this site's {plan.scale}")
                delta = skellam_message(update.delta, whiteners, dp.clip_norm, plan, stream)
            update = dataclasses.replace(update, delta=delta)
        return update, report

    def expected_noise(self, received: NoiseTerms | None) -> NoiseTerms | None:
        """The noise terms to apply, once checked against this site's run settings: distributed client-level
        noise needs them (else the update would leave un-noised), with the noise kind of the site's method."""
        privacy = self.settings.privacy
        wanted = privacy.client_level and privacy.noise_placement == "distributed"
        if wanted and received is None:
            raise ValueError("the run adds distributed noise but the train instruction carries no noise terms")
        if not wanted and received is not None:
            raise ValueError("the train instruction carries noise terms, but this run's noise is not distributed")
        kind = method_spec(self.settings.federation.method).noise
        if received is not None and received.noise != kind:
            raise ValueError(
                f"the train instruction asks for {received.noise.value} noise; this run's method uses {kind.value}"
            )
        return received

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Evaluate the received adapter on the held-out images (`evaluate_counts`). Without DP the reply carries
        the counts; under DP the site writes them and its metrics to its own `site-evaluation-client<k>-<time>.json`
        and answers only that it evaluated."""
        counts = self.evaluate_counts(content)
        if not self.private:
            return counts.to_content()
        metrics = site_metrics(np.array(counts.confusion), counts.score_histograms)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = self.state_dir / f"site-evaluation-client{self.client_id}-{stamp}-{time.time_ns() % 10**9:09d}.json"
        write_json_atomic(path, {"client": self.client_id, **metrics, "confusion": [list(r) for r in counts.confusion]})
        logger.info("site evaluation of client %d kept at the site: %s", self.client_id, path)
        return SiteEvaluated(self.client_id).to_content()

    def evaluate_counts(self, content: RecordDict) -> SiteCounts:
        """Counts of the global adapter's decisions (and, binary, calibrated P(class 1) histograms) on the held-out
        images, with the server's temperature and threshold."""
        state, threshold, temperature = read_evaluate_content(content)
        load_adapter_state(self.model, state)
        settings = self.settings
        probs = predict_proba(
            self.model, self.held_out, settings.output.eval_batch_size, settings.local.mixed_precision, temperature
        )
        labels = self.held_out.tensors[1].numpy()
        k = probs.shape[1]
        if k == 2 and threshold is not None:
            decisions = (probs[:, 1] >= threshold).astype(np.int64)
        else:
            decisions = probs.argmax(1)
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (labels, decisions), 1)
        hists = None
        if k == 2:
            hists = tuple(
                tuple(int(h) for h in np.histogram(probs[labels == c, 1], bins=SCORE_BINS, range=(0.0, 1.0))[0])
                for c in range(2)
            )
        return SiteCounts(self.client_id, tuple(tuple(int(x) for x in row) for row in confusion), hists)


def _declared_size(value: Any) -> int | None:
    """The node config's `public-size` as an integer >= 1 (None if not given); ValueError (one line) otherwise."""
    if value is None:
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"node config public-size {value!r} must be an integer >= 1")
    return int(text)


def _phase(method: str, rounds: int, round_index: int, phase_index: int) -> Phase:
    phase = next(iter_phases(method, rounds, (round_index, phase_index)), None)
    if phase is None or phase.step != (round_index, phase_index):
        raise ValueError(f"round {round_index} phase {phase_index} is not in the run's schedule")
    return phase


_SITES: OrderedDict[str, Site] = OrderedDict()


def site_for(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Site:
    """The process's `Site` for these settings and node config, built on first use and then kept."""
    key = json.dumps(
        [
            {k: v for k, v in run_config.items() if k not in SERVER_ONLY},
            {k: v for k, v in node_config.items() if k not in SITE_KEYS},
        ],
        sort_keys=True,
        default=str,
    )
    if key in _SITES:
        _SITES.move_to_end(key)
    else:
        start = time.perf_counter()
        _SITES[key] = Site.build(run_config, node_config)
        logger.info(
            "loaded the site of client %d (%d training images) in %.1f s",
            _SITES[key].client_id,
            len(_SITES[key].train_data),
            time.perf_counter() - start,
        )
        while len(_SITES) > MAX_SITES:
            _SITES.popitem(last=False)
    site = _SITES[key]
    site.state_dir = Path(node_config.get("state-dir") or default_state_dir()).expanduser()
    site.options = parse_run_config(run_config)[1]  # not in the cache key: this message's run config says them
    return site


def handle(kind: str, content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> RecordDict:
    """The reply content of one message (`kind`: hello, train or evaluate) at this site."""
    site = site_for(run_config, node_config)
    if kind == "hello":
        return site.hello()
    view = secagg_view(content)
    if kind == "train" and site.options is not None and site.options.secure_aggregation and view is None:
        raise ValueError("this run's config has secure-aggregation=true, but the train message did not come through "
                         "SecAgg+ (its reply would leave unmasked): refused")  # fmt: skip
    if kind == "train" and is_fit_ins(content) and is_statistics_fit_ins(content):  # the refit through SecAgg+
        return site_statistics_fit_res(site, content, view)
    if kind == "train" and is_fit_ins(content):  # a SecAgg+ phase: legacy FitIns in, FitRes out (secagg.py)
        work = read_fit_ins(content)
        if view is None:
            raise ValueError("a SecAgg+ train instruction that did not come through SecAgg+: refused")
        check_threshold(view[1], work.num_shares, site.settings.privacy.collusion_threshold)
        work = dataclasses.replace(work, secagg_view=(tuple(view[0]), view[1]))
        return fit_res_content(*site.reply_update(work))
    if kind == "train" and is_statistics(content):  # --head-refit stats: this site's noised statistics
        return site_statistics(site, content)
    if kind == "train":
        return site.train(content)
    if kind == "evaluate":
        return site.evaluate(content)
    raise ValueError(f"unknown message kind {kind!r}")


__all__ = ["SERVER_ONLY", "Site", "default_state_dir", "handle", "site_for"]
