"""The privacy ledger's wording (`privacy.json`): what a `FederatedServer` released, under which mechanism,
trust model and neighbouring relation, and its epsilon (with the record-level part and the head refit merged in).

The server keeps the facts (accountants, releases, settings); this module only puts them into words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .record_dp import merge_ledgers
from .schedule import NoiseKind

if TYPE_CHECKING:
    from .server import FederatedServer

MECHANISMS = {
    NoiseKind.REGULATED: "regulated-gaussian (metric clipping, noise sigma^2 C^2 M^-1)",
    NoiseKind.PLAIN: "gaussian (factor-space clipping, isotropic noise)",
    NoiseKind.REFERENCE: "authors' mechanism (per-matrix clipping, unscaled (Y^T Y)^-1 noise)",
}

TRUST_MODELS = {
    "central": "the server is trusted with each client's raw update; it clips, sums and adds the noise, and the "
    "released adapter (and everything published with it) is DP",
    "distributed": "each client clips its update and adds its share of the noise before sending it; the sum "
    "carries the full noise. Without secure aggregation the server still sees each update with only its share",
}


def privacy_ledger(server: FederatedServer) -> dict:
    """The privacy ledger (`privacy.json`): what was released, under which mechanism, and its epsilon.

    It names the neighbouring relation and trust model, and where the noise came from: with
    reproducible randomness (`DPRandomness.from_seed`) it states that there is no guarantee.
    """
    ledger = _client_ledger(server)
    ledger = ledger if server.record is None else merge_ledgers(ledger, server.record)
    if server.refit is not None:
        ledger["head_refit"] = server.refit
    if ledger["level"] != "none":
        ledger["noise_randomness"] = server.randomness.guarantee_note
        ledger["reproducible_noise"] = server.randomness.reproducible
        if server.randomness.reproducible:
            ledger["guarantee"] = (
                "NONE: the noise is reproducible from the public seed; the epsilon values say what a "
                "secret noise source would have given"
            )
        else:
            ledger["guarantee"] = "holds as stated (secret noise, opacus accounting)"
    return ledger


def _client_ledger(server: FederatedServer) -> dict:
    base = {
        "method": server.method,
        "num_clients": server.num_clients,
        "releases": len(server.releases),
        "releases_per_round": server.spec.releases_per_round,
        "stopped_by_budget": server.stopped_by_budget,
    }
    if server.dp is None:
        return {
            **base,
            "level": "none",
            "mechanism": None,
            "epsilon": None,
            "note": "no differential privacy: updates are averaged without clipping or noise",
        }
    eps = server.epsilon()
    ledger = {
        **base,
        "level": "client",
        "mechanism": MECHANISMS[server.spec.noise],
        "trust_model": server.dp.noise_placement,
        "trust_model_description": TRUST_MODELS[server.dp.noise_placement],
        "neighbouring_relation": (
            "add/remove one client's entire data (client-level); Poisson sampling of clients at rate q "
            "(q = 1: every client in every release); the total noise does not depend on who takes part, "
            "except with distributed noise and t >= 1 (see accounting_sample_rate)"
        ),
        "noise_multiplier": server.dp.noise_multiplier,
        "clip_norm": server.dp.clip_norm,
        "regulator_ridge": server.dp.regulator_ridge,
        "sample_rate": server.sample_rate,
        "sampling": "all clients" if server.sample_rate == 1 else "poisson",
        "accounting_sample_rate": server.accounting_rate,
        "delta": server.dp.delta,
        "target_epsilon": server.dp.target_epsilon,
        "epsilon": eps[server.budget_accountant],
        "epsilon_rdp": eps["rdp"],
        "epsilon_prv": eps["prv"],
        "accountant": server.budget_accountant,
        "accountant_description": f"opacus {server.budget_accountant.upper()} (sigma calibration, budget stop, "
        "'epsilon'); RDP and PRV (PRV: its upper bound, eps_error included) both shown",
        "effective_noise_multipliers": [r["effective_noise_multiplier"] for r in server.releases],
    }
    if server.dp.noise_placement == "distributed":
        ledger["collusion_threshold"] = server.collusion_threshold
        ledger["epsilon_against"] = server.adversary_epsilons()
        ledger["distributed_noise_note"] = (
            "each release sums >= k noise shares of variance sigma^2 C^2 / d, d = k - t: outsiders face "
            "sigma sqrt(k/d), t colluding sites (who subtract their own shares) sigma sqrt((k-t)/d); 'epsilon' "
            "is accounted at sigma. The per-release [k, d] are server-private (k is the participant count)"
        )
        if server.accounting_rate != server.sample_rate:
            ledger["amplification_note"] = (
                f"no amplification by subsampling: every epsilon is accounted at q = 1, not q = "
                f"{server.sample_rate:g}, since with t >= 1 a release's total noise k/(k-t) sigma^2 C^2 reveals "
                "its number of participants k, so a client's participation is not secret; sigma was "
                "calibrated at q = 1 too"
            )
    if server.spec.noise == NoiseKind.REFERENCE:
        ledger["nominal_epsilon"] = server.nominal_accountant.epsilon(server.dp.delta, server.budget_accountant)
        ledger["epsilon_semantics"] = "running tally"
        ledger["note"] = (
            "reproduction only: 'epsilon' composes the effective multiplier of each release as it was made "
            "(a running tally, not a budget fixed in advance: each multiplier depends on the frozen factor, "
            "which earlier releases shaped); 'nominal_epsilon' is what sigma alone would suggest, and does "
            "not hold"
        )
    return ledger
