"""The trust model as a table: for each adversary, the epsilon that holds against it (None: not protected).

Adversaries: the public (everything the run publishes), the server (what reaches it during the run),
another site (a participant: it sees the global adapters it is sent) and t colluding sites (sites that
pool what they know, their own updates and noise shares included). Each entry gives the client-level and
the record-level epsilon (whichever levels the run has) and why. `trust_model` takes the epsilon values as
inputs, so a mechanism whose epsilon against a party is computed elsewhere (distributed noise against the
server or against colluding sites) fills in its own; a value it is not given is None with the reason
"not computed". `trust_model_of(ledger)` reads the inputs from a privacy ledger. Engine-free.
"""

from __future__ import annotations

ADVERSARIES = ("public", "server", "another site", "t colluding sites")
NOT_COMPUTED = "not computed for this mechanism: no guarantee is claimed"


def _client_level(
    adversary: str,
    deployed: bool,
    placement: str,
    secure_aggregation: bool,
    epsilon: float | None,
    epsilon_vs_server: float | None,
    epsilon_vs_colluding: float | None,
    epsilon_vs_outsiders: float | None = None,
    epsilon_vs_one_site: float | None = None,
) -> tuple[float | None, str]:
    distributed = placement == "distributed"
    outsiders = epsilon_vs_outsiders if distributed and epsilon_vs_outsiders is not None else epsilon
    if adversary == "public":
        return outsiders, "every published file is post-processing of the noised releases"
    if not deployed:
        return None, "simulation: one process plays the server and every site, so its operator holds all the data"
    if adversary == "another site":
        if distributed:
            why = "distributed noise: a participating site knows its own noise share, so the rest carries less"
            return epsilon_vs_one_site, why if epsilon_vs_one_site is not None else f"{why}; {NOT_COMPUTED}"
        return epsilon, "a site receives only global adapters, post-processing of the noised releases"
    if adversary == "server":
        if placement == "central":
            return None, "central noise: the server receives each site's clipped, un-noised update and adds the noise"
        if secure_aggregation:
            return outsiders, "SecAgg+: the server sees only the sum of the privatized updates, carrying the full noise"
        why = "distributed noise without secure aggregation: the server sees each update with its own noise share"
        return epsilon_vs_server, why if epsilon_vs_server is not None else f"{why}; {NOT_COMPUTED}"
    if placement == "central":
        return epsilon, "colluding sites know their own updates but not the server's noise; the others keep epsilon"
    why = "distributed noise: colluding sites know their own noise shares, so the rest of each release carries less"
    return epsilon_vs_colluding, why if epsilon_vs_colluding is not None else f"{why}; {NOT_COMPUTED}"


def trust_model(
    level: str,
    deployed: bool,
    placement: str | None = None,
    secure_aggregation: bool = False,
    client_epsilon: float | None = None,
    record_epsilon: float | None = None,
    epsilon_vs_server: float | None = None,
    epsilon_vs_colluding: float | None = None,
    colluding: int | None = None,
    reproducible: bool = False,
    epsilon_vs_outsiders: float | None = None,
    epsilon_vs_one_site: float | None = None,
) -> dict:
    """The trust-model table of one run mode (see the module docstring).

    `level`: 'none', 'client', 'record' or 'client+record'; `deployed`: sites are separate parties (Flower),
    else a simulation; `placement`: the client-level noise placement ('central' or 'distributed');
    `client_epsilon` / `record_epsilon`: the run's epsilon at each level (record: the largest over sites);
    `epsilon_vs_server` / `epsilon_vs_colluding`: client-level epsilon under distributed noise against the
    server without secure aggregation / against `colluding` sites (None: not computed);
    `epsilon_vs_outsiders` / `epsilon_vs_one_site`: under distributed noise, against those who know no share (the
    public; the server under SecAgg+) / one participating site (its own share known).
    """
    if level not in ("none", "client", "record", "client+record"):
        raise ValueError(f"privacy level {level!r} is not none, client, record or client+record")
    client, record = level in ("client", "client+record"), level in ("record", "client+record")
    if client and placement not in ("central", "distributed"):
        raise ValueError(f"client-level noise placement {placement!r} is not 'central' or 'distributed'")
    against: dict[str, dict] = {}
    for adversary in ADVERSARIES:
        row: dict = {}
        if level == "none":
            row["why"] = (
                "no differential privacy: updates"
                + (" and the sites' training statistics flow un-noised" if deployed else " are averaged un-noised")
                + "; no guarantee is claimed"
            )
        elif reproducible:
            row["why"] = "reproducible noise derived from the public seed: anyone can remove it; no guarantee"
        whys = []
        if client:
            eps, why = _client_level(
                adversary, deployed, placement, secure_aggregation, client_epsilon, epsilon_vs_server,
                epsilon_vs_colluding, epsilon_vs_outsiders, epsilon_vs_one_site,
            )  # fmt: skip
            row["client_level_epsilon"] = None if reproducible else eps
            whys.append(f"client level: {why}")
        if record:
            if adversary != "public" and not deployed:
                why = "simulation: one process plays the server and every site, so its operator holds all the data"
                eps = None
            else:
                eps = record_epsilon
                why = "each site runs DP-SGD on its own records: all that leaves it is DP-SGD output"
            row["record_level_epsilon"] = None if reproducible else eps
            whys.append(f"record level: {why}")
        if "why" not in row:
            row["why"] = "; ".join(whys)
        against[adversary] = row
    return {
        "deployment": "flower" if deployed else "simulation",
        "level": level,
        "colluding_sites": colluding,
        "against": against,
        "legend": "epsilon None: not protected against that party (see why); sizes declared public are not protected",
    }


def trust_model_of(ledger: dict) -> dict:
    """`trust_model` with its inputs read from a privacy ledger (`FederatedServer.ledger()` plus a deployment's
    keys: transport, secure_aggregation and, when a mechanism computes them, epsilon_against_server and the
    distributed-noise table `epsilon_against` of `FederatedServer.adversary_epsilons`, read with the ledger's
    accountant)."""
    level = ledger["level"]
    record = ledger.get("record") or {}
    kind = ledger.get("accountant") if ledger.get("accountant") in ("rdp", "prv") else "rdp"
    against = ledger.get("epsilon_against") or {}

    def vs(label: str) -> float | None:
        entry = against.get(label) or {}
        return entry.get(kind) if entry.get(kind) is not None else entry.get("rdp")

    return trust_model(
        level,
        deployed=ledger.get("transport") == "flower",
        placement=ledger.get("trust_model") if level in ("client", "client+record") else None,
        secure_aggregation=bool(ledger.get("secure_aggregation")),
        client_epsilon=ledger.get("epsilon") if level in ("client", "client+record") else None,
        record_epsilon=record.get("epsilon_max"),
        epsilon_vs_server=ledger.get("epsilon_against_server"),
        epsilon_vs_colluding=vs("t_colluding_sites") if against else ledger.get("epsilon_against_colluding_sites"),
        colluding=(against.get("t_colluding_sites") or {}).get("t", ledger.get("colluding_sites")),
        reproducible=bool(ledger.get("reproducible_noise")),
        epsilon_vs_outsiders=vs("outsiders") if against else None,
        epsilon_vs_one_site=vs("one_participating_site") if against else None,
    )


__all__ = ["ADVERSARIES", "trust_model", "trust_model_of"]
