"""SecAgg+ for DEeR (`secure-aggregation=true`): each phase's updates reach the server only as their sum.

Flower 1.42 ships SecAgg+ as a legacy fit workflow (`SecAggPlusWorkflow`, the `fit_workflow` of a
`DefaultWorkflow`) that drives a legacy `flwr.server.strategy.Strategy` through `FitIns` / `FitRes`,
with `secaggplus_mod` on the ClientApp. `SecAggDeerStrategy` is that legacy strategy over the same core
as `DeerStrategy` (whose sampling, noise floor k and drop log it reuses): `configure_fit` sends the
global adapter, the phase and the mechanism's `NoiseTerms` (sigma, C, lambda, noise kind: the same
train instruction as a plain phase, in the FitIns config); the sites check those terms against their
own settings, clip in the metric and add their noise share sigma C / sqrt(d), d = k - t (t =
collusion-threshold: t colluding sites still face sigma, outsiders sigma sqrt(k / d)) before the mod quantizes
and masks; `aggregate_fit` receives only the unmasked sum of the survivors'
updates and hands it to `FederatedServer.finish_summed_phase`. Each phase runs the workflow once (what
`DefaultWorkflow` does per round) inside the phase loop of `peft_deer.run.run_experiment`, where
`FlowerTransport.release_phase` hands it in: the run keeps its budget check, validation, checkpoints
and resume.

Per phase: reconstruction threshold k (the noise floor: fewer than k survivors cannot be unmasked, and
would carry less noise than sigma), every sampled site a neighbour of every other (num_shares = all),
weight 1 for everyone (`max_weight` 1, so SecAgg+ does not scale the updates), and the entry range
`clipping_range` from C, sigma, d and the frozen factor (`peft_deer.federated.quantization`). Masks are
drawn from the whole 32-byte keys on both sides (`mask_hardening.keyed_masks`): flwr 1.42 seeds
them with 32 bits only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from types import SimpleNamespace

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import FitIns, FitRes, Parameters
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from ..federated import ClientUpdate, Phase, PhaseRelease, build_whiteners
from ..federated.quantization import (
    DEFAULT_TAIL,
    check_quantization_range,
    clipping_range,
    range_clipping_probability,
    sum_error_bound,
)
from ..federated.skellam import SkellamPlan, decode_skellam_sum, plan_skellam, skellam_ledger
from .mask_hardening import harden_secaggplus_masks
from .protocol import NoiseTerms, RecordReport, TrainInstruction
from .secagg_protocol import fit_ins, read_fit_res_client, read_fit_res_report, summed_update
from .strategy import DeerStrategy, TooFewClients

logger = logging.getLogger("flwr")


class FitOnlyStrategy(LegacyStrategy):
    """A legacy `Strategy` for one SecAgg+ fit run: no initial parameters, no federated evaluation (the ServerApp
    validates on its own held-out split). Subclasses give `configure_fit` and `aggregate_fit`."""

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round, parameters, client_manager) -> list:
        return []

    def aggregate_evaluate(self, server_round, results, failures) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class SecAggDeerStrategy(FitOnlyStrategy):
    """The legacy `Strategy` SecAgg+ drives, one phase (release) of `deer.server` per workflow run.

    `release_phase(grid, context)` gives the ServerApp's `release_phase` callable. `last_summed` is what the
    last `aggregate_fit` received: the survivors' client ids and the parameters each FitRes carried.
    """

    def __init__(self, deer: DeerStrategy, grid: Grid, run_id: int) -> None:
        server = deer.server
        if server.dp is None or server.dp.noise_placement != "distributed":
            raise ValueError("secure aggregation needs client-level DP with noise-placement='distributed'")
        harden_secaggplus_masks()  # the mask generator both sides share: from the whole key, not 32 bits
        self.deer = deer
        self.clients: ClientManager = SimpleClientManager()
        self.proxies = {c: GridClientProxy(node, grid, run_id) for c, node in deer.nodes.items()}
        for proxy in self.proxies.values():
            self.clients.register(proxy)
        self.last_summed: tuple[list[int], list[Parameters]] | None = None
        self._phase: tuple[Phase, list[int], int, float] | None = None  # phase, participants, k, rho
        self._release: PhaseRelease | None = None
        self._plan: SkellamPlan | None = None  # the phase's integer mechanism (secagg-noise='skellam')
        if deer.options.secagg_noise == "skellam":  # the budget stop accounts what is released: the integer sum
            server.budget_probe = self.skellam_epsilon_after
            server.refit_budget_probe = self.refit_epsilon_after

    # -- the ServerApp's phase loop -------------------------------------------------------------------
    def release_phase(self, grid: Grid, context: Context) -> Callable:
        """The `release_phase` callable for `peft_deer.run.run_phases`: one SecAgg+ run per phase."""

        def release(phase: Phase, participants: list[int]) -> tuple[list[ClientUpdate], PhaseRelease]:
            server_round = self.deer.phases.index(phase) + 1
            sent = [c for c in participants if c in self.deer.nodes]
            for c in participants:
                if c not in self.deer.nodes:
                    self.deer._drop(phase, c, "no SuperNode holds this client")
            k = self.deer.noise_shares(len(participants))
            if len(sent) < max(k, 2):
                raise TooFewClients(
                    f"{_name(phase)}: {len(sent)} reachable sites of {len(participants)} sampled, fewer than "
                    f"SecAgg+ and the noise floor k={max(k, 2)} need; nothing released. Resume with resume=true "
                    "once the SuperNodes are back."
                )
            self._plan = self.phase_skellam_plan(phase, k, len(sent))
            if self._plan is None:
                rho, levels = self.phase_clipping_range(phase, self.deer.server.share_divisor(k)), None
            else:  # integers in [-rho, rho] with Q = 2 rho levels: flwr's quantization maps them exactly
                rho, levels = float(self._plan.bound), 2 * self._plan.bound
                check_quantization_range(levels, self.deer.server.num_clients)
            self._phase, self._release = (phase, sent, k, rho), None
            levels = levels or self.deer.options.quantization_range
            threshold = self.run_workflow(self, grid, context, server_round, k, rho, levels, len(sent))
            if self._release is None:
                raise TooFewClients(
                    f"{_name(phase)}: SecAgg+ stopped before unmasking: fewer than the threshold {threshold} (noise "
                    f"floor k={k}) of {len(sent)} sites "
                    "completed the protocol (failed or timed out), and a sum of fewer than k updates carries less "
                    "noise than sigma; nothing released. Resume with resume=true once the SuperNodes are back."
                )
            return [], self._release

        return release

    def run_workflow(
        self,
        strategy: LegacyStrategy,
        grid: Grid,
        context: Context,
        server_round: int,
        k: int,
        rho: float,
        levels: int,
        sites: int,
    ) -> int:
        """One SecAgg+ run driving `strategy` (this one for a phase, `secagg_refit.SecAggStatistics` for the head
        refit) over `sites` sites: every site a neighbour of every other, weight 1, entry range rho, `levels` steps,
        and reconstruction threshold max(k, sites // 2 + 1), which it returns: at least the noise floor k, and above
        half the sites, which the sites require (`secagg_guard.check_unmask`: no two halves can each unmask)."""
        threshold = max(k, sites // 2 + 1)
        workflow = SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled site holds a share of every other's keys
            reconstruction_threshold=threshold,
            max_weight=1.0,
            clipping_range=rho,
            quantization_range=levels,
            timeout=self.deer.options.reply_timeout_s,
        )
        legacy = LegacyContext(context, ServerConfig(len(self.deer.phases) + 1), strategy, self.clients)
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
        legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # the adapter travels in FitIns
        workflow(grid, legacy)
        return threshold

    def phase_skellam_plan(self, phase: Phase, noise_floor: int, sites: int) -> SkellamPlan | None:
        """With secagg-noise='skellam', the phase's integer mechanism (`plan_skellam`: scale, share variance
        sigma^2 (sC)^2 / d, entry range); None with Gaussian shares."""
        if self.deer.options.secagg_noise != "skellam":
            return None
        server = self.deer.server
        dim = sum(server.global_state[key].numel() for key in server.trained_keys(phase))
        dp = server.dp
        return plan_skellam(dp.noise_multiplier, dp.clip_norm, dim, server.share_divisor(noise_floor), sites)

    def skellam_epsilon_after(self, phase: Phase) -> tuple[float, str]:
        """The Skellam epsilon (the ledger's: against t colluding sites, range failures out of delta) if `phase`
        were released too: its plan for k = the noise floor of clients-per-phase and a range sized for all
        num-clients sites (against t colluders the summed variance (sigma s C)^2 does not depend on k)."""
        server = self.deer.server
        releases = [r for r in server.releases if "skellam" in r.get("secure_aggregation", {})]
        plans = [r["secure_aggregation"]["skellam"] for r in releases]
        shares = [(r["noise_shares"], r["share_divisor"]) for r in releases]
        k = self.deer.noise_shares(server.clients_per_phase)
        plan = self.phase_skellam_plan(phase, k, server.num_clients)
        plans.append(dataclasses.asdict(plan))
        shares.append((k, server.share_divisor(k)))
        against = skellam_ledger(plans, server.dp.delta, shares, server.collusion_threshold)
        return against["t_colluding_sites"], "Skellam"

    def refit_epsilon_after(self, size: int, multiplier: float, share_divisor: int | None) -> tuple[float, str]:
        """The Skellam epsilon (against t colluding sites, as the ledger's) if the head refit's release of `size`
        entries, noise multiplier m and share divisor d were made after the training's releases."""
        from .secagg_refit import refit_plan  # (that module builds on this one)

        server = self.deer.server
        releases = [r for r in server.releases if "skellam" in r.get("secure_aggregation", {})]
        plans = [r["secure_aggregation"]["skellam"] for r in releases]
        shares = [(r["noise_shares"], r["share_divisor"]) for r in releases]
        k = self.deer.noise_shares(server.num_clients)
        request = SimpleNamespace(multiplier=multiplier, size=size, share_divisor=share_divisor)
        plans.append(dataclasses.asdict(refit_plan(request, server.num_clients)))
        shares.append((k, share_divisor))
        against = skellam_ledger(plans, server.dp.delta, shares, server.collusion_threshold)
        return against["t_colluding_sites"], "Skellam"

    def phase_clipping_range(self, phase: Phase, noise_shares: int) -> float:
        """rho for `phase`: the entry range holding any privatized update (noise share sigma^2 C^2 / d, d =
        `noise_shares`) but with probability `DEFAULT_TAIL`."""
        server = self.deer.server
        keys = server.trained_keys(phase)
        ridge = server.dp.regulator_ridge
        whiteners = build_whiteners(server.layout, server.global_state, keys, server.spec.noise, ridge)
        shapes = {k: server.global_state[k].shape for k in keys}
        return clipping_range(whiteners, shapes, server.spec.noise, server.dp, noise_shares)

    # -- the legacy Strategy interface (fit; `FitOnlyStrategy` has the rest) ------------------------------
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """One `FitIns` per reachable sampled site: the server's global adapter, the phase, the share divisor
        d = k - t (`FederatedServer.share_divisor`) and the noise terms."""
        phase, sent, k, _ = self._current(server_round)
        server = self.deer.server
        d, scale = server.share_divisor(k), None if self._plan is None else self._plan.scale
        state, run_key, noise = server.global_state, self.deer.run_key, NoiseTerms.of(server.dp, server.spec.noise)
        return [
            (self.proxies[c], fit_ins(TrainInstruction(state, phase.round, phase.index, c, d, run_key, noise, scale)))
            for c in sent
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict]:
        """Release the unmasked sum of the survivors' privatized updates through the core (nothing else is seen).

        Every FitRes carries the same parameters, SecAgg+'s mean over the n survivors; the survivors are
        known (who sent a masked update), their updates are not.
        """
        phase, sent, k, rho = self._current(server_round)
        client_of_node = {proxy.node_id: c for c, proxy in self.proxies.items()}
        survivors = sorted(client_of_node[proxy.node_id] for proxy, _ in results)
        self.last_summed = (survivors, [res.parameters for _, res in results])
        for c in sent:
            if c not in survivors:
                self.deer._drop(phase, c, "no masked update in the SecAgg+ round (failed or timed out)")
        if len(survivors) < k:
            raise TooFewClients(
                f"{_name(phase)}: {len(survivors)} SecAgg+ survivors of {len(sent)} (< the noise floor k={k}): the "
                "sum would carry less noise than sigma; nothing released. Resume with resume=true."
            )
        claimed = sorted(read_fit_res_client(res) for _, res in results)
        if claimed != survivors:
            raise ValueError(f"{_name(phase)}: SecAgg+ replies name clients {claimed}, sent by {survivors}")
        server = self.deer.server
        if server.record is not None:  # a missing report cannot be dropped from the sum: refuse the release
            reports: dict[int, RecordReport] = {
                client_of_node[proxy.node_id]: read_fit_res_report(res, client_of_node[proxy.node_id])
                for proxy, res in results
            }
            server.record.expect(reports)
        shapes = {key: server.global_state[key].shape for key in server.trained_keys(phase)}
        plan = self._plan
        total = summed_update(results[0][1].parameters, len(survivors), shapes, integers=plan is not None)
        q = self.deer.options.quantization_range if plan is None else 2 * plan.bound
        facts = {
            "secure_aggregation": {
                "clipping_range": rho,
                "quantization_range": q,
                "survivors": len(survivors),
                "sum_error_bound": sum_error_bound(rho, q, len(survivors)) if plan is None else 0.0,
            }
        }
        if plan is not None:  # the exact integer sum: divided by s, coloured back
            keys = list(shapes)
            ridge = server.dp.regulator_ridge
            whiteners = build_whiteners(server.layout, server.global_state, keys, server.spec.noise, ridge)
            total = decode_skellam_sum(total, whiteners, plan.scale)
            facts["secure_aggregation"]["skellam"] = dataclasses.asdict(plan)
        self._release = server.finish_summed_phase(phase, total, survivors, server.share_divisor(k), facts, k)
        self._plan = None
        logger.info(
            "%s: released the SecAgg+ sum of %d sites (rho %.4g, error <= %.3g per entry of the sum)",
            _name(phase),
            len(survivors),
            rho,
            facts["secure_aggregation"]["sum_error_bound"],
        )
        return None, {}

    # -- the ledger -----------------------------------------------------------------------------------
    def deployment_ledger(self) -> dict:
        """`DeerStrategy.deployment_ledger` for a SecAgg+ run: what the server sees, and the quantization error
        next to epsilon (the bound uses num-clients, not who survived, which stays server-private)."""
        ledger = self.deer.deployment_ledger()
        server = self.deer.server
        k = self.deer.noise_shares(server.clients_per_phase)
        q = self.deer.options.quantization_range
        ranges = [r["secure_aggregation"]["clipping_range"] for r in server.releases if "secure_aggregation" in r]
        bounds = [sum_error_bound(rho, q, server.num_clients) for rho in ranges]
        denominator = server.sample_rate * server.num_clients
        ledger["secure_aggregation"] = True
        ledger["note_distributed"] = (
            "SecAgg+: the server receives only the sum of the surviving sites' privatized updates (each with 1/"
            f"{server.share_divisor(k)} of the noise variance), never one update; the SuperLink and the server still "
            "see metadata: which sites take part in each phase, message sizes and timing"
        )
        ledger["secure_aggregation_protocol"] = {
            "protocol": "SecAgg+ (flwr SecAggPlusWorkflow / secaggplus_mod), one run per release",
            "reconstruction_threshold": f"max(k = {k} (min-clients-per-phase), half the sites + 1): fewer survivors "
            "are neither unmasked nor released",
            "quantization_range": q,
            "clipping_range_rule": "C ||L^-1|| (1 + t sigma / sqrt(d)) per release (d = k - collusion-threshold), "
            f"t the Gaussian quantile for a {DEFAULT_TAIL:g} chance that any entry of an update is clipped",
            "clipping_range_per_release": ranges,
            "sum_error_bound_per_entry": bounds,
            "sum_error_bound_per_entry_max": max(bounds, default=None),
            "adapter_error_bound_per_entry_max": None if not bounds else max(bounds) / denominator,
            "error_note": "stochastic rounding moves each entry of each update by less than one step 2 rho / Q, "
            "so the sum of n <= num-clients updates is within n * 2 rho / Q per entry",
            "noise": "gaussian (secagg-noise='gaussian', opt-in): float shares, quantized by the mod after the noise",
            "analysis_gap": "NO proof: quantization after noise. epsilon accounts the Gaussian sum before "
            "quantization; the released sum is sum_i Q(x_i + z_i), which is not a post-processing of it, so that "
            "epsilon is not a proof for the quantized sum (the exact construction, integer Skellam noise on rounded "
            "updates, is secagg-noise='skellam', the default)",
            "range_clipping_probability_per_release": range_clipping_probability(server.num_clients),
            "delta_with_range_clipping": server.dp.delta + len(ranges) * range_clipping_probability(server.num_clients),
        }
        skellam = [r for r in server.releases if "skellam" in r.get("secure_aggregation", {})]
        refit = (server.refit or {}).get("secure_aggregation") if (server.refit or {}).get("applied") else None
        if refit is not None:  # the head refit's statistics: one more Skellam release, composed with the phases'
            ledger["secure_aggregation_protocol"]["head_refit"] = refit
            shares = {key: refit[key] for key in ("noise_shares", "share_divisor")}
            skellam = [*skellam, {"secure_aggregation": refit, **shares}]
        if skellam and len(skellam) == len(ranges) + (refit is not None):
            ledger.update(self._skellam_ledger(skellam, ledger["secure_aggregation_protocol"]))
        return ledger

    def _skellam_ledger(self, releases: list[dict], protocol: dict) -> dict:
        """What a run with integer (Skellam) shares states instead: the exact sum, and its Skellam epsilon."""
        server = self.deer.server
        plans = [r["secure_aggregation"]["skellam"] for r in releases]
        shares = [(r["noise_shares"], r["share_divisor"]) for r in releases]
        against = skellam_ledger(plans, server.dp.delta, shares, server.collusion_threshold)
        for key in ("analysis_gap", "range_clipping_probability_per_release", "delta_with_range_clipping"):
            protocol.pop(key)
        protocol.update(
            noise="skellam: each site sends round(s * its update clipped in the metric to C - sqrt(d)/s) plus integer "
            "Skellam noise of variance (sigma s C)^2 / d; clipping_range rho and quantization_range 2 rho make flwr's "
            "quantization the identity on integers, so the sum is exact (error 0); the server divides it by s and "
            "colours it back",
            skellam_plans=plans,
            range_failure_in_delta="the chance that any entry of any message leaves [-rho, rho] (Chernoff) is taken "
            "out of delta for each release",
        )
        return {
            "epsilon": against["t_colluding_sites"],
            "epsilon_gaussian_limit": server.epsilon()[server.budget_accountant],
            "epsilon_skellam": {
                "outsiders": against["outsiders"],
                "t_colluding_sites": against["t_colluding_sites"],
                "t": server.collusion_threshold,
            },
            "epsilon_note": "epsilon: Skellam RDP (Agarwal et al. 2021, Cor. 3.6; integer orders, no sampling "
            "amplification) of the integer sum against t colluding sites (k - t shares); the budget stop used the "
            "Skellam epsilon too (epsilon_gaussian_limit: the Gaussian sum's, for comparison)",
        }

    def private_ledger(self) -> dict:
        return self.deer.private_ledger()

    def _current(self, server_round: int) -> tuple[Phase, list[int], int, float]:
        if self._phase is None or self.deer.phase_of(server_round) != self._phase[0]:
            raise RuntimeError(f"server round {server_round} is not the phase being released")
        return self._phase


def _name(phase: Phase) -> str:
    return f"round {phase.round + 1} phase {''.join(phase.factors)}"


__all__ = ["FitOnlyStrategy", "SecAggDeerStrategy"]
