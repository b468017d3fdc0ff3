"""What the DEeR ServerApp and ClientApp say to each other, and the checks on every reply.

Three message kinds:
- query "hello" (once per run): the node answers with the client id it holds and a count it may announce:
  its declared public size under record-level DP, nothing under client-level DP only, its exact count
  without DP;
- train (once per phase and participant): the server sends the global adapter, the phase, the run
  key and, with distributed noise, the mechanism's terms (sigma, C, lambda, noise kind); the client
  answers with the delta of the phase's trained parameters only, a public weight (`num-examples`: the
  declared public size under record-level DP, 1 under client-level DP only) and, under record-level DP,
  its accountant (`RecordReport`: functions of public values only). Training statistics (loss, images
  seen, seconds) are sent only without DP; under DP they stay in the site's own log;
- evaluate (once, after the run): the server sends the final adapter, its temperature and its decision
  threshold; the site answers with counts on its own held-out images (`SiteCounts`) without DP, or under
  DP keeps them in its own state directory and answers only that it evaluated (`SiteEvaluated`).

The ClientApp side works on message *contents* (`RecordDict`): the SuperNode's ClientApp process
forwards them to the site's long-lived worker (`site_worker.py`) and wraps the reply.

A reply that is an error, lacks a record, names another client or carries a delta of the wrong
keys, shapes or non-finite values raises `InvalidClientUpdate`, whose message is the logged reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from ..evaluation.calibration import check_temperature
from ..federated import AdapterState, ClientDP, ClientUpdate, InvalidClientUpdate, validate_updates
from ..methods import NoiseKind

GLOBAL = "global"  # ArrayRecord: the global adapter state (all LoRA factors and the head)
UPDATE = "update"  # ArrayRecord: the client's delta of the phase's trained parameters
CONFIG = "config"  # ConfigRecord: phase and identity fields
METRICS = "metrics"  # MetricRecord: num-examples and training statistics
RECORD = "record-dp"  # ConfigRecord: the site's record-level DP accountant (RecordReport)
COUNTS = "site-counts"  # MetricRecord: a site's evaluation counts (SiteCounts)


def state_to_record(state: AdapterState) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> AdapterState:
    return {k: v.to(torch.float32) for k, v in record.to_torch_state_dict().items()}


@dataclass(frozen=True)
class NoiseTerms:
    """The client-level mechanism a site applies before its update leaves it (distributed noise): noise
    multiplier sigma, clip norm C, ridge lambda of the metric, and the noise kind. The site draws its
    noise share from its own OS secret; these terms are the server's calibration, so no site recalibrates."""

    noise_multiplier: float
    clip_norm: float
    ridge: float
    noise: NoiseKind

    def __post_init__(self) -> None:
        finite = all(math.isfinite(v) for v in (self.noise_multiplier, self.clip_norm, self.ridge))
        if not (finite and self.noise_multiplier > 0 and self.clip_norm > 0 and self.ridge >= 0):
            raise ValueError(
                f"noise terms sigma={self.noise_multiplier}, C={self.clip_norm}, lambda={self.ridge} need sigma > 0, "
                "C > 0 and lambda >= 0 (finite); the ServerApp is misconfigured"
            )
        if self.noise not in tuple(NoiseKind):
            raise ValueError(f"noise kind {self.noise!r} is not one of {[k.value for k in NoiseKind]}")

    @classmethod
    def of(cls, dp: ClientDP, noise: NoiseKind) -> NoiseTerms:
        return cls(dp.noise_multiplier, dp.clip_norm, dp.regulator_ridge, noise)

    def client_dp(self) -> ClientDP:
        """The terms as the core's `ClientDP` (distributed placement)."""
        return ClientDP(
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            regulator_ridge=self.ridge,
            noise_placement="distributed",
        )


@dataclass(frozen=True)
class TrainInstruction:
    """One client's work order: the global adapter, the phase (round, index), the noise share count m, the
    run key (an HMAC of the server's secret: the same for a run and its resumes, new for a new run; a site
    files its record-level accountant under it) and, with distributed noise, the `NoiseTerms` to apply."""

    global_state: AdapterState
    round: int
    phase: int
    client_id: int
    num_shares: int  # d: the site's noise share has variance sigma^2 C^2 / d (d = k - t, `share_divisor`)
    run_key: str = ""
    noise: NoiseTerms | None = None
    skellam_scale: float | None = None  # SecAgg+ with secagg-noise='skellam': send integers (`skellam.py`)
    # the SecAgg+ run it came through, as the site's mod saw it (`secagg_guard.secagg_view`): participants, threshold
    secagg_view: tuple[tuple[int, ...], int] | None = None


def hello_message(node_id: int) -> Message:
    return Message(
        RecordDict({CONFIG: ConfigRecord({"step": "hello"})}), dst_node_id=node_id, message_type=MessageType.QUERY
    )


def hello_content(client_id: int, count: int | None) -> RecordDict:
    """A node's hello: its client id and the count it may announce (None: none, e.g. under client-level DP)."""
    config = ConfigRecord({"client-id": client_id})
    if count is not None:
        config["num-examples"] = int(count)
    return RecordDict({CONFIG: config})


def read_hello_reply(reply: Message) -> tuple[int, int | None]:
    """(client id, announced count or None) of a node; ValueError with the node's reason if it failed."""
    if reply.has_error():
        raise ValueError(f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
    config = reply.content.config_records.get(CONFIG)
    if config is None or "client-id" not in config:
        raise ValueError(f"node {reply.metadata.src_node_id} sent no client id")
    return int(config["client-id"]), (int(config["num-examples"]) if "num-examples" in config else None)


def train_message(node_id: int, instruction: TrainInstruction) -> Message:
    config = ConfigRecord(
        {
            "round": instruction.round,
            "phase": instruction.phase,
            "client-id": instruction.client_id,
            "num-shares": instruction.num_shares,
            "run-key": instruction.run_key,
        }
    )
    if instruction.noise is not None:
        terms = instruction.noise
        config["noise-multiplier"] = float(terms.noise_multiplier)
        config["clip-norm"] = float(terms.clip_norm)
        config["ridge"] = float(terms.ridge)
        config["noise-kind"] = terms.noise.value
    content = RecordDict({GLOBAL: state_to_record(instruction.global_state), CONFIG: config})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def read_train_content(content: RecordDict) -> TrainInstruction:
    """The work order in a train message; ValueError (one line) if its noise terms are malformed."""
    config = content.config_records[CONFIG]
    noise = None
    if "noise-kind" in config:
        try:
            kind = NoiseKind(str(config["noise-kind"]))
        except ValueError:
            raise ValueError(
                f"noise kind {config['noise-kind']!r} is not one of {[k.value for k in NoiseKind]}"
            ) from None
        terms = (float(config["noise-multiplier"]), float(config["clip-norm"]), float(config["ridge"]))
        noise = NoiseTerms(*terms, kind)
    return TrainInstruction(
        record_to_state(content.array_records[GLOBAL]),
        int(config["round"]),
        int(config["phase"]),
        int(config["client-id"]),
        int(config["num-shares"]),
        str(config.get("run-key", "")),
        noise,
    )


def read_train_message(msg: Message) -> TrainInstruction:
    return read_train_content(msg.content)


def update_content(update: ClientUpdate, record: RecordReport | None = None, statistics: bool = False) -> RecordDict:
    """A site's train reply: the delta, the weight `num-examples` (the caller makes it public under DP), the
    client id, the record-level report and, only with `statistics` (no DP), loss, images seen and seconds."""
    metrics = MetricRecord({"num-examples": update.num_examples})
    if statistics:
        metrics["train-loss"] = float(update.mean_loss)
        metrics["images-seen"] = update.images_seen
        metrics["seconds"] = float(update.seconds)
    content = RecordDict(
        {
            UPDATE: state_to_record(update.delta),
            METRICS: metrics,
            CONFIG: ConfigRecord({"client-id": update.client_id}),
        }
    )
    if record is not None:
        content[RECORD] = record.to_record()
    return content


def update_reply(
    msg: Message, update: ClientUpdate, record: RecordReport | None = None, statistics: bool = False
) -> Message:
    return Message(update_content(update, record, statistics), reply_to=msg)


def read_update_reply(reply: Message, client_id: int, shapes: dict[str, torch.Size]) -> ClientUpdate:
    """The `ClientUpdate` in `reply` from `client_id`, checked against the phase's trained `shapes`."""
    if reply.has_error():
        raise InvalidClientUpdate(client_id, f"client failed: {reply.error.reason}")
    content = reply.content
    missing = [
        name
        for name, records in (
            (UPDATE, content.array_records),
            (METRICS, content.metric_records),
            (CONFIG, content.config_records),
        )
        if name not in records
    ]
    if missing:
        raise InvalidClientUpdate(client_id, f"reply lacks the records {missing}")
    claimed = int(content.config_records[CONFIG].get("client-id", -1))
    if claimed != client_id:
        raise InvalidClientUpdate(client_id, f"reply claims to come from client {claimed}")
    metrics = content.metric_records[METRICS]
    try:
        delta = record_to_state(content.array_records[UPDATE])
    except Exception as err:  # undecodable arrays: the reason is the decoder's
        raise InvalidClientUpdate(client_id, f"update arrays do not decode: {err}") from err
    update = ClientUpdate(
        client_id,
        delta,
        int(metrics.get("num-examples", 0)),
        float(metrics.get("train-loss", float("nan"))),
        int(metrics.get("images-seen", 0)),
        float(metrics.get("seconds", 0.0)),
    )
    validate_updates([update], shapes)
    return update


# ----------------------------------------------------------------------------- record-level DP at a site


@dataclass(frozen=True)
class RecordReport:
    """A site's record-level DP accountant after an update: this update's DP-SGD steps (`sigma`,
    `sample_rate`, `steps`), its whole opacus RDP history [(sigma, q, steps)] over the run (retries
    included), the epsilon that history gives at the run's record delta and the site's declared public size
    (q = batch_size / public size): all functions of public values, none of the site's exact count."""

    sigma: float
    sample_rate: float
    steps: int
    history: tuple[tuple[float, float, int], ...]
    epsilon: float
    public_size: int | None = None

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                **({} if self.public_size is None else {"public-size": int(self.public_size)}),
                "sigma": self.sigma,
                "sample-rate": self.sample_rate,
                "steps": self.steps,
                "history-sigma": [float(s) for s, _, _ in self.history],
                "history-rate": [float(q) for _, q, _ in self.history],
                "history-steps": [int(n) for _, _, n in self.history],
                "epsilon": self.epsilon,
            }
        )


def read_record_report(reply: Message, client_id: int) -> RecordReport:
    """The record-level accountant a site sent with its update; `InvalidClientUpdate` if missing or malformed."""
    return record_report_from_config(reply.content.config_records.get(RECORD), client_id)


def record_report_from_config(config: ConfigRecord | None, client_id: int) -> RecordReport:
    """`read_record_report` on the record itself (a SecAgg+ reply carries it inside its FitRes metrics)."""
    if config is None:
        raise InvalidClientUpdate(client_id, "record-level DP run, but the reply carries no accountant")
    try:
        history = tuple(
            (float(s), float(q), int(n))
            for s, q, n in zip(config["history-sigma"], config["history-rate"], config["history-steps"], strict=True)
        )
        report = RecordReport(
            float(config["sigma"]),
            float(config["sample-rate"]),
            int(config["steps"]),
            history,
            float(config["epsilon"]),
            int(config["public-size"]) if "public-size" in config else None,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidClientUpdate(client_id, f"malformed record-level accountant: {err}") from err
    sound = [
        s > 0 and math.isfinite(s) and 0 < q <= 1 and n >= 0
        for s, q, n in (*history, (report.sigma, report.sample_rate, report.steps))
    ]
    if not history or not all(sound) or not report.epsilon >= 0 or (report.public_size or 1) < 1:
        raise InvalidClientUpdate(
            client_id,
            "record-level accountant with a non-positive sigma, q outside (0, 1], negative steps or public size < 1",
        )
    return report


# ----------------------------------------------------------------------------- per-site evaluation

SCORE_BINS = 1000  # binary tasks: P(class 1) histograms with this many equal bins on [0, 1]


@dataclass(frozen=True)
class SiteCounts:
    """What a site returns from evaluating the global adapter on its own held-out images: counts only.

    confusion: (K, K) counts, rows = true class, columns = decision (threshold rule for K = 2, else argmax);
    score_histograms: K = 2 only, per true class, counts of P(class 1) in `SCORE_BINS` bins (for the AUC).
    """

    client_id: int
    confusion: tuple[tuple[int, ...], ...]
    score_histograms: tuple[tuple[int, ...], ...] | None = None

    def to_content(self) -> RecordDict:
        k = len(self.confusion)
        metrics: dict = {"num-classes": k, "confusion": [int(c) for row in self.confusion for c in row]}
        for c, hist in enumerate(self.score_histograms or ()):
            metrics[f"scores-class-{c}"] = [int(h) for h in hist]
        return RecordDict({COUNTS: MetricRecord(metrics), CONFIG: ConfigRecord({"client-id": self.client_id})})


@dataclass(frozen=True)
class SiteEvaluated:
    """A site's answer to evaluate under DP: it evaluated and kept its counts in its own state directory
    (nothing un-noised about its held-out images leaves it)."""

    client_id: int

    def to_content(self) -> RecordDict:
        return RecordDict({CONFIG: ConfigRecord({"client-id": self.client_id, "kept-at-site": True})})


def evaluate_message(node_id: int, state: AdapterState, threshold: float | None, temperature: float = 1.0) -> Message:
    config = ConfigRecord(
        {"temperature": float(temperature), **({} if threshold is None else {"threshold": float(threshold)})}
    )
    return Message(
        RecordDict({GLOBAL: state_to_record(state), CONFIG: config}),
        dst_node_id=node_id,
        message_type=MessageType.EVALUATE,
    )


def read_evaluate_content(content: RecordDict) -> tuple[AdapterState, float | None, float]:
    """(global adapter, decision threshold or None for argmax, temperature) of an evaluate message.

    The threshold applies to softmax(logits / temperature); a message without a temperature means T = 1."""
    config = content.config_records[CONFIG]
    threshold = float(config["threshold"]) if "threshold" in config else None
    try:
        temperature = check_temperature(config.get("temperature", 1.0))
    except ValueError as err:
        raise ValueError(f"the evaluate instruction's {err}") from None
    return record_to_state(content.array_records[GLOBAL]), threshold, temperature


def read_site_counts(reply: Message) -> SiteCounts | SiteEvaluated:
    """The counts a site returned (or, under DP, that it evaluated and kept them); ValueError with the reason if
    the reply is an error or malformed."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise ValueError(f"node {node} could not evaluate: {reply.error.reason}")
    metrics = reply.content.metric_records.get(COUNTS)
    config = reply.content.config_records.get(CONFIG)
    if metrics is None and config is not None and config.get("kept-at-site") and "client-id" in config:
        return SiteEvaluated(int(config["client-id"]))
    if metrics is None or config is None:
        raise ValueError(f"node {node} sent no evaluation counts")
    k = int(metrics["num-classes"])
    flat = [int(c) for c in metrics["confusion"]]
    if k < 2 or len(flat) != k * k or min(flat) < 0:
        raise ValueError(f"node {node} sent a malformed confusion matrix")
    confusion = tuple(tuple(flat[i * k : (i + 1) * k]) for i in range(k))
    hists = None
    if k == 2 and "scores-class-0" in metrics:
        hists = tuple(tuple(int(h) for h in metrics[f"scores-class-{c}"]) for c in range(2))
        if any(len(h) != SCORE_BINS or sum(h) != sum(row) for h, row in zip(hists, confusion, strict=True)):
            raise ValueError(f"node {node} sent score histograms that do not match its confusion matrix")
    return SiteCounts(int(config["client-id"]), confusion, hists)
