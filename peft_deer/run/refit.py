"""`--head-refit stats`: after the last round, replace the final adapter's classifier head with a closed-form LDA
head fitted on the hospitals' DP class statistics (the math and its sensitivities: `federated/head_refit.py`).

The projection is PCA of the server's own validation features (public to the hospitals; no hospital data). Each
hospital computes its statistics on its training images' head-input features under the final global adapter and
releases them at the run's level:

- record (DP-SGD inside hospitals): the hospital adds N(0, (m sqrt(3))^2) itself; one more Gaussian step
  (m, q = 1, 1 step) in its record-level accountant.
- client: the hospital's proportions-weighted statistics (norm <= sqrt(3)); noise N(0, (m sqrt(3))^2) on the sum
  (drawn by the server with central placement, as per-hospital shares of variance 1 / (k - t) of it with
  distributed placement, as `FederatedServer.share_divisor` sizes them); one more
  release at q = 1 in the client-level ledger (a release that would pass --epsilon is skipped, and says so).
- client,record: weights 1 / declared public size, each hospital's vector clipped to sqrt(3); both noises.
- none: exact statistics (no noise).

The released statistics, sigma, sensitivities and the release's own epsilon are in privacy.json under
`head_refit`; validation AUC before / after in summary.json. Only `adapter/` (final) gets the new head;
`adapter-best/` keeps its trained one. The refit is in the checkpoint: a resumed run never releases twice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..federated import load_adapter_state
from ..federated.head_refit import (
    CLIENT_SENSITIVITY,
    CLIP_RULE,
    COUNT_FLOOR_FRACTION,
    RECORD_SENSITIVITY,
    ClassStats,
    choose_shrinkage,
    fit_lda,
    gaussian_epsilon,
    gaussian_release,
    head_in_input_space,
    hospital_contribution,
    pca_projection,
    validation_auc,
)
from .experiment import Experiment
from .privacy import refit_multiplier


def head_linear(exp: Experiment) -> tuple[torch.nn.Linear, str, str]:
    """The trained head's Linear module and its (weight, bias) keys; ValueError unless it is one Linear."""
    keys = exp.layout.head_keys
    modules = {k.rsplit(".", 1)[0] for k in keys}
    if len(modules) != 1 or {k.rsplit(".", 1)[1] for k in keys} != {"weight", "bias"}:
        raise ValueError(f"--head-refit stats needs one Linear classifier head with a bias; the head is {list(keys)}")
    name = modules.pop()
    module = dict(exp.model.named_modules())[name]
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"--head-refit stats needs a Linear classifier head; {name} is {type(module).__name__}")
    return module, f"{name}.weight", f"{name}.bias"


@torch.no_grad()
def head_features(exp: Experiment, dataset: Dataset) -> np.ndarray:
    """The input of the classifier head (n, D) float64 for `dataset` under the loaded adapter (in model_inputs)."""
    module, _, _ = head_linear(exp)
    found: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda _m, args: found.append(args[0].detach().double().cpu()))
    device = next(exp.model.parameters()).device
    exp.model.eval()
    try:
        for pixel_values, _ in DataLoader(dataset, batch_size=exp.settings.output.eval_batch_size):
            exp.model(pixel_values=pixel_values.to(device))
    finally:
        hook.remove()
    out = torch.cat(found).numpy()
    if out.ndim != 2:
        raise ValueError(f"--head-refit stats needs head inputs of shape (n, D), got {out.shape}")
    return out


def _labels(dataset: Dataset) -> np.ndarray:
    return np.asarray(dataset.tensors[1]).astype(np.int64)


def refit_head(exp: Experiment, say: Callable[[str], None] = print) -> dict | None:
    """Run the refit once (see the module docstring); returns its ledger entry (None: --head-refit none)."""
    settings, server = exp.settings, exp.server
    cfg, privacy = settings.refit, settings.privacy
    if cfg.head_refit == "none" or server.refit is not None:
        return server.refit
    if exp.client_data is None:
        raise ValueError("--head-refit stats needs the hospitals' features: the simulation only, for now")
    _, w_key, b_key = head_linear(exp)
    started = time.perf_counter()
    load_adapter_state(exp.model, server.global_state)
    with exp.model_inputs():
        val_x = head_features(exp, exp.val_data)
        hospitals = [(head_features(exp, d), _labels(d)) for d in exp.client_data]
    val_y = np.asarray(exp.data.splits.val.labels).astype(np.int64)
    num_classes = int(server.global_state[w_key].shape[0])
    before = validation_auc(val_y, val_x @ server.global_state[w_key].double().numpy().T
                            + server.global_state[b_key].double().numpy())  # fmt: skip
    projection = pca_projection(val_x, min(cfg.refit_dims, *val_x.shape))
    m = refit_multiplier(settings)
    entry: dict = {
        "level": privacy.dp,
        "released": f"per hospital and class: count, sum (k = {projection.dims}) and second moment (k x k) of its "
        "projected, clipped head-input features",
        "projection": projection.source,
        "dims": projection.dims,
        "clip": CLIP_RULE,
        "hospitals": len(hospitals),
    }
    if privacy.client_level and server.dp is not None and server.dp.target_epsilon is not None:
        eps = server.accountant.epsilon_after(m, 1.0, server.dp.delta, server.budget_accountant)
        if eps > server.dp.target_epsilon:
            entry.update(applied=False, note=f"skipped: the release would reach epsilon {eps:.3f} > target")
            say(f"head refit skipped: client-level epsilon would reach {eps:.3f} > {server.dp.target_epsilon}")
            server.refit = entry
            return entry
    stats = _released_statistics(exp, hospitals, projection, num_classes, entry)
    shrinkage, by_shrinkage = choose_shrinkage(stats, projection, val_x, val_y)
    head = head_in_input_space(fit_lda(stats, shrinkage), projection)
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
        val_auc_before=before,
        val_auc_after=after,
        applied_to="adapter/ (final); adapter-best/ keeps its trained head"
        if settings.federation.rounds
        else "adapter/ (statistics only, --rounds 0: no training, no adapter-best/)",
        seconds=time.perf_counter() - started,  # features, release and fit, wall time
    )
    server.refit = entry
    say(f"head refit: val auc {before:.4f} -> {after:.4f} (k {projection.dims}, shrinkage {shrinkage:g})")
    return entry


def _released_statistics(exp: Experiment, hospitals, projection, num_classes: int, entry: dict) -> ClassStats:
    """Every hospital's release, summed as the server receives it; steps the accountants; fills `entry`."""
    server, privacy = exp.server, exp.settings.privacy
    m = refit_multiplier(exp.settings)
    client, record = privacy.client_level, privacy.record_level
    distributed = client and server.dp is not None and server.dp.noise_placement == "distributed"
    total = None
    for c, (x, y) in enumerate(hospitals):
        if client and record:  # public weight 1 / s_h, clipped to the client bound
            weight, bound = 1.0 / server.record.dp.public_size(c, len(y)), CLIENT_SENSITIVITY
        elif client:
            weight, bound = 1.0 / len(y), None
        else:
            weight, bound = 1.0, None
        part = hospital_contribution(projection.clipped(x), y, num_classes, weight, bound)
        if record:
            part = gaussian_release(
                part, m * RECORD_SENSITIVITY * weight, server.randomness.stream("refit", "record", c)
            )
            server.record.accountants.step(c, m, 1.0, 1)
        if distributed:
            std = m * CLIENT_SENSITIVITY / math.sqrt(server.share_divisor(len(hospitals)))  # keeps sigma vs t colluders
            part = gaussian_release(part, std, server.randomness.stream("refit", "share", c))
        total = part if total is None else total + part
    if client:
        if not distributed:
            total = gaussian_release(total, m * CLIENT_SENSITIVITY, server.randomness.stream("refit", "client"))
        server.accountant.step(m, 1.0)
        entry["client"] = {
            "noise_multiplier": m,
            "sensitivity": CLIENT_SENSITIVITY,
            "sensitivity_derivation": "each hospital's vector [p_c, p_c mu_c, p_c M_c]_c has norm^2 <= "
            "3 sum_c p_c^2 <= 3 (clipped to sqrt(3) with public weights): add/remove one hospital",
            "noise_std_on_sum": m * CLIENT_SENSITIVITY,
            "noise_placement": server.dp.noise_placement,
            "accounting": "one more release (noise multiplier m, q = 1) in the client-level accountant",
            "epsilon_of_this_release": gaussian_epsilon([(m, 1.0, 1)], server.dp.delta),
        }
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
            "epsilon_of_this_release": gaussian_epsilon([(m, 1.0, 1)], server.record.dp.delta),
        }
    if not client and not record:
        entry["noise"] = "none: exact statistics (no DP)"
    return total


__all__ = ["head_features", "head_linear", "refit_head"]
