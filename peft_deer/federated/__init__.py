"""The engine-free DEeR core: schedule -> client update -> clip -> aggregate -> noise -> account.

Nothing here imports accelerate, flwr or gradio; drivers move data and call these pieces.
"""

from .accountant import PrivacyBudgetExceeded, ReleaseAccountant, calibrate_noise_multiplier, check_delta
from .adapter_state import (
    AdapterLayout,
    AdapterState,
    LoraFactors,
    adapter_layout,
    get_adapter_state,
    load_adapter_state,
)
from .aggregate import (
    InvalidClientUpdate,
    PhaseRelease,
    aggregate_phase,
    check_privatized_update,
    clip_client_update,
    privatize_update,
    validate_updates,
)
from .batched import BatchedEngine
from .client import ClientEngine, SequentialEngine, train_client
from .client_dp import ClientDP
from .local_training import ClientTask, ClientUpdate, LocalTraining, PhaseContext
from .mechanism import Whitener, build_whiteners, clip_update, factor_metric, metric_norm, sample_noise
from .randomness import DPRandomness
from .schedule import METHOD_SPECS, MethodSpec, Phase, iter_phases, method_spec
from .seeding import derive_seed
from .server import FederatedServer
from .server_optimizer import SERVER_OPTIMIZERS, ServerOptimizer

__all__ = [
    "METHOD_SPECS",
    "SERVER_OPTIMIZERS",
    "AdapterLayout",
    "AdapterState",
    "BatchedEngine",
    "ClientDP",
    "ClientEngine",
    "ClientTask",
    "DPRandomness",
    "ClientUpdate",
    "FederatedServer",
    "InvalidClientUpdate",
    "LocalTraining",
    "LoraFactors",
    "MethodSpec",
    "Phase",
    "PhaseContext",
    "PhaseRelease",
    "PrivacyBudgetExceeded",
    "ReleaseAccountant",
    "SequentialEngine",
    "ServerOptimizer",
    "Whitener",
    "adapter_layout",
    "aggregate_phase",
    "build_whiteners",
    "calibrate_noise_multiplier",
    "check_delta",
    "check_privatized_update",
    "clip_client_update",
    "clip_update",
    "derive_seed",
    "factor_metric",
    "get_adapter_state",
    "iter_phases",
    "load_adapter_state",
    "method_spec",
    "metric_norm",
    "privatize_update",
    "sample_noise",
    "train_client",
    "validate_updates",
]
