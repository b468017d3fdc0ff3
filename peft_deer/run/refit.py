"""`--head-refit stats`: after the last round, replace the final adapter's classifier head with a closed-form LDA
head fitted on the hospitals' DP class statistics (the math and its sensitivities: `federated/head_refit.py`).

The projection is PCA of the server's own validation features (public to the hospitals; no hospital data). Each
hospital computes its statistics on its training images' head-input features under the final global adapter and
releases them at the run's level (`site_release`, the same code in the simulation and at a Flower site):

- record (DP-SGD inside hospitals): the hospital adds N(0, (m sqrt(3))^2) itself; one more Gaussian step
  (m, q = 1, 1 step) in its record-level accountant.
- client: the hospital's proportions-weighted statistics (norm <= sqrt(3)); noise N(0, (m sqrt(3))^2) on the sum
  (drawn by the server with central placement, as per-hospital shares of variance 1 / (k - t) of it with
  distributed placement, as `FederatedServer.share_divisor` sizes them for the noise floor k); one more
  release at q = 1 in the client-level ledger (a release that would pass --epsilon is skipped, and says so).
- client,record: weights 1 / declared public size, each hospital's vector clipped to sqrt(3); both noises.
- none: exact statistics (no noise).

Only the transport differs (`refit_head(release=...)`): the simulation computes every hospital's release in
process (`simulate_release`); under Flower each site computes and noises its own and the server sums the replies
(`peft_deer.flower.refit`). The fit, the accounting of the client-level release and the ledger entry are this
module's, once. The released statistics, sigma, sensitivities and the release's own epsilon are in privacy.json
under `head_refit` (no wall time: it depends on the hospitals' exact sizes); validation AUC before / after in
summary.json. Only `adapter/` (final) gets the new head;
`adapter-best/` keeps its trained one. The refit is in the checkpoint: a resumed run never releases twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..federated import AdapterLayout, load_adapter_state
from ..federated.collusion import adversary_multipliers
from ..federated.head_refit import (
    CLIENT_SENSITIVITY,
    CLIP_RULE,
    COUNT_FLOOR_FRACTION,
    RECORD_SENSITIVITY,
    ClassStats,
    Projection,
    accountant_epsilon,
    choose_shrinkage,
    fit_lda,
    gaussian_release,
    head_in_input_space,
    hospital_contribution,
    pca_projection,
    unit_scaled,
    validation_auc,
)
from ..federated.randomness import SecureStream
from .privacy import refit_multiplier

if TYPE_CHECKING:  # a Flower site imports this module for `site_release`: not the server's experiment
    from .experiment import Experiment


def head_linear(model: torch.nn.Module, layout: AdapterLayout) -> tuple[torch.nn.Linear, str, str]:
    """The trained head's Linear module and its (weight, bias) keys; ValueError unless it is one Linear."""
    keys = layout.head_keys
    modules = {k.rsplit(".", 1)[0] for k in keys}
    if len(modules) != 1 or {k.rsplit(".", 1)[1] for k in keys} != {"weight", "bias"}:
        raise ValueError(f"--head-refit stats needs one Linear classifier head with a bias; the head is {list(keys)}")
    name = modules.pop()
    module = dict(model.named_modules())[name]
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"--head-refit stats needs a Linear classifier head; {name} is {type(module).__name__}")
    return module, f"{name}.weight", f"{name}.bias"


@torch.no_grad()
def head_features(model: torch.nn.Module, layout: AdapterLayout, dataset: Dataset, batch_size: int) -> np.ndarray:
    """The input of the classifier head (n, D) float64 for `dataset` under the loaded adapter."""
    module, _, _ = head_linear(model, layout)
    found: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda _m, args: found.append(args[0].detach().double().cpu()))
    device = next(model.parameters()).device
    model.eval()
    try:
        for pixel_values, _ in DataLoader(dataset, batch_size=batch_size):
            model(pixel_values=pixel_values.to(device))
    finally:
        hook.remove()
    out = torch.cat(found).numpy()
    if out.ndim != 2:
        raise ValueError(f"--head-refit stats needs head inputs of shape (n, D), got {out.shape}")
    return out


def dataset_labels(dataset: Dataset) -> np.ndarray:
    return np.asarray(dataset.tensors[1]).astype(np.int64)


@dataclass(frozen=True)
class RefitRequest:
    """What the server asks every hospital (all public): the projection, the number of classes, the refit's
    noise multiplier m, the run's levels and, with distributed client-level noise, the share divisor d (each
    hospital adds variance (m sqrt(3))^2 / d)."""

    projection: Projection
    num_classes: int
    multiplier: float
    client_level: bool
    record_level: bool
    share_divisor: int | None = None
    shares: int | None = None  # k, the shares the server sums with distributed noise (the noise floor)

    @property
    def size(self) -> int:
        """The length of a released vector: C (1 + k + k^2)."""
        k = self.projection.dims
        return self.num_classes * (1 + k + k * k)


def site_release(
    features: np.ndarray,
    labels: np.ndarray,
    request: RefitRequest,
    public_size: int | None,
    stream: Callable[[str], SecureStream],
) -> ClassStats:
    """One hospital's statistics as they leave it: projected, clipped, weighted and bounded for the run's level,
    with its own record-level noise ('record' stream) and its distributed client-level share ('share' stream).
    `public_size`: its declared public size (client,record weights), else unused."""
    client, record, m = request.client_level, request.record_level, request.multiplier
    if client and record:  # public weight 1 / s_h, clipped to the client bound
        if public_size is None or public_size < 1:
            raise ValueError("client,record head refit needs the hospital's declared public size")
        weight, bound = 1.0 / public_size, CLIENT_SENSITIVITY
    elif client:
        weight, bound = 1.0 / max(len(labels), 1), None
    else:
        weight, bound = 1.0, None
    part = hospital_contribution(request.projection.clipped(features), labels, request.num_classes, weight, bound)
    if record:
        part = gaussian_release(part, m * RECORD_SENSITIVITY * weight, stream("record"))
    if request.share_divisor is not None:  # keeps sigma against t colluders (d = k - t)
        part = gaussian_release(part, m * CLIENT_SENSITIVITY / math.sqrt(request.share_divisor), stream("share"))
    return part


def simulate_release(exp: Experiment, request: RefitRequest) -> ClassStats:
    """The simulation's transport: every hospital's `site_release` in process, summed as the server receives it;
    each hospital's record-level accountant takes its Gaussian step."""
    server = exp.server
    if exp.client_data is None:
        raise ValueError("--head-refit stats needs the hospitals' features: this server holds no client data")
    batch = exp.settings.output.eval_batch_size
    with exp.model_inputs():
        hospitals = [(head_features(exp.model, exp.layout, d, batch), dataset_labels(d)) for d in exp.client_data]
    total = None
    for c, (x, y) in enumerate(hospitals):
        size = server.record.dp.public_size(c, len(y)) if request.record_level else None
        part = site_release(x, y, request, size, lambda purpose, c=c: server.randomness.stream("refit", purpose, c))
        if request.record_level:
            server.record.accountants.step(c, request.multiplier, 1.0, 1)
        total = part if total is None else total + part
    return total


# The summed releases, or (summed releases, facts of the transport's protocol: the entry's "secure_aggregation").
StatisticsRelease = Callable[["Experiment", RefitRequest], ClassStats | tuple[ClassStats, dict]]


def refit_head(
    exp: Experiment,
    say: Callable[[str], None] = print,
    release: StatisticsRelease = simulate_release,
    noise_floor: int | None = None,
    multiplier: float | None = None,
) -> dict | None:
    """Run the refit once (see the module docstring); returns its ledger entry (None: --head-refit none).

    `release` gathers the hospitals' summed releases (and steps their record-level accountants); `noise_floor`
    k sizes the distributed shares (default: every hospital); `multiplier` m is the transport's (default
    `refit_multiplier(settings)`). With `server.refit_budget_probe` set (SecAgg+ with Skellam shares), the
    client-level budget check uses that mechanism's epsilon."""
    settings, server = exp.settings, exp.server
    cfg, privacy = settings.refit, settings.privacy
    if cfg.head_refit == "none" or server.refit is not None:
        return server.refit
    _, w_key, b_key = head_linear(exp.model, exp.layout)
    load_adapter_state(exp.model, server.global_state)
    with exp.model_inputs():
        val_x = head_features(exp.model, exp.layout, exp.val_data, settings.output.eval_batch_size)
    val_y = np.asarray(exp.data.splits.val.labels).astype(np.int64)
    num_classes = int(server.global_state[w_key].shape[0])
    before = validation_auc(val_y, val_x @ server.global_state[w_key].double().numpy().T
                            + server.global_state[b_key].double().numpy())  # fmt: skip
    projection = pca_projection(val_x, min(cfg.refit_dims, val_x.shape[1]))
    m = refit_multiplier(settings) if multiplier is None else multiplier
    distributed = privacy.client_level and server.dp is not None and server.dp.noise_placement == "distributed"
    k = settings.data.num_clients if noise_floor is None else noise_floor
    request = RefitRequest(
        projection, num_classes, m, privacy.client_level, privacy.record_level,
        server.share_divisor(k) if distributed else None, k if distributed else None,
    )  # fmt: skip
    entry: dict = {
        "level": privacy.dp,
        "released": f"per hospital and class: count, sum (k = {projection.dims}) and second moment (k x k) of its "
        "projected, clipped head-input features",
        "projection": projection.source,
        "dims": projection.dims,
        "clip": CLIP_RULE,
        "hospitals": settings.data.num_clients,
    }
    if privacy.client_level and server.dp is not None and server.dp.target_epsilon is not None:
        if server.refit_budget_probe is not None:
            eps, _ = server.refit_budget_probe(request.size, m, request.share_divisor)
        else:
            eps = server.accountant.epsilon_after(m, 1.0, server.dp.delta, server.budget_accountant)
        if eps > server.dp.target_epsilon and not settings.federation.rounds:  # the run's one release
            raise ValueError(
                f"statistics only (--rounds 0): the refit's release would reach client-level epsilon {eps:.4f} > "
                f"{server.dp.target_epsilon}; nothing was released (raise --noise-multiplier, or leave it to --epsilon)"
            )
        if eps > server.dp.target_epsilon:
            entry.update(applied=False, note=f"skipped: the release would reach epsilon {eps:.3f} > target")
            say(f"head refit skipped: client-level epsilon would reach {eps:.3f} > {server.dp.target_epsilon}")
            server.refit = entry
            return entry
    released = release(exp, request)
    released, facts = released if isinstance(released, tuple) else (released, None)
    if facts is not None:  # in the entry, so in the checkpoint: a resumed run's ledger still has them
        entry["secure_aggregation"] = facts
    stats = account_release(exp, request, released, entry)
    shrinkage, by_shrinkage = choose_shrinkage(stats, projection, val_x, val_y)
    head, scale = unit_scaled(head_in_input_space(fit_lda(stats, shrinkage), projection), val_x)
    server.global_state = {
        **server.global_state,
        w_key: torch.from_numpy(head.weight).float(),
        b_key: torch.from_numpy(head.bias).float(),
    }
    after = validation_auc(val_y, head.logits(val_x))
    entry.update(
        applied=True,
        shrinkage=shrinkage,
        shrinkage_chosen_on="server's validation split (AUC)",
        val_auc_by_shrinkage={f"{g:g}": a for g, a in by_shrinkage.items()},
        count_floor_fraction=COUNT_FLOOR_FRACTION,
        logit_scale=scale,  # the LDA head times this: class-centred validation logits of RMS 1 (no float32 saturation)
        val_auc_before=before,
        val_auc_after=after,
        applied_to="adapter/ (final); adapter-best/ keeps its trained head"
        if settings.federation.rounds
        else "adapter/ (statistics only, --rounds 0: no training, no adapter-best/)",
    )
    server.refit = entry
    say(f"head refit: val auc {before:.4f} -> {after:.4f} (k {projection.dims}, shrinkage {shrinkage:g})")
    return entry


def account_release(exp: Experiment, request: RefitRequest, total: ClassStats, entry: dict) -> ClassStats:
    """The summed releases as the fit uses them: the server's client-level noise (central placement), the
    client-level ledger's step, and the entry's description of both levels."""
    server = exp.server
    m, client, record = request.multiplier, request.client_level, request.record_level
    kind = exp.settings.privacy.accountant  # the run's accountant ('rdp' or 'prv'), as its epsilon figures
    if client:
        if request.share_divisor is None:
            total = gaussian_release(total, m * CLIENT_SENSITIVITY, server.randomness.stream("refit", "client"))
        server.accountant.step(m, 1.0)
        server.nominal_accountant.step(m, 1.0)
        if request.share_divisor is not None:  # the sum of k shares against the public, one site and t colluders
            k, t = request.shares, server.collusion_threshold
            for who, multiplier in adversary_multipliers(m, k, request.share_divisor, t).items():
                if multiplier > 0:
                    server.adversary_accountants[who].step(multiplier, 1.0)
                else:
                    server.adversary_exposed[who] = True
        entry["client"] = {
            "noise_multiplier": m,
            "sensitivity": CLIENT_SENSITIVITY,
            "sensitivity_derivation": "each hospital's vector [p_c, p_c mu_c, p_c M_c]_c has norm^2 <= "
            "3 sum_c p_c^2 <= 3 (clipped to sqrt(3) with public weights): add/remove one hospital",
            "noise_std_on_sum": m * CLIENT_SENSITIVITY,
            "noise_placement": server.dp.noise_placement,
            "accounting": "one more release (noise multiplier m, q = 1) in the client-level accountant",
            "epsilon_of_this_release": accountant_epsilon([(m, 1.0, 1)], server.dp.delta, kind),
            "epsilon_of_this_release_accountant": kind,
        }
        if request.share_divisor is not None:
            entry["client"]["share_divisor"] = request.share_divisor
    if record:
        entry["record"] = {
            "noise_multiplier": m,
            "sensitivity": "sqrt(3) x weight" if client else RECORD_SENSITIVITY,
            "sensitivity_derivation": "one record of class c changes (n_c, s_c, S_c) by (1, z, z z^T): "
            "norm^2 1 + |z|^2 + |z|^4 <= 3",
            "noise_std_per_hospital": "m sqrt(3) / s_h (s_h: declared public size)"
            if client
            else m * RECORD_SENSITIVITY,
            "accounting": "one more Gaussian step (m, q = 1, 1 step) in each hospital's record-level accountant",
            "epsilon_of_this_release": accountant_epsilon([(m, 1.0, 1)], server.record.dp.delta, kind),
            "epsilon_of_this_release_accountant": kind,
        }
    if not client and not record:
        entry["noise"] = "none: exact statistics (no DP)"
    return total


__all__ = [
    "RefitRequest",
    "StatisticsRelease",
    "account_release",
    "dataset_labels",
    "head_features",
    "head_linear",
    "refit_head",
    "simulate_release",
    "site_release",
]
