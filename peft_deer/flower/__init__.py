"""DEeR on Flower (flwr >= 1.42, `pip install "peft_deer[flower]"`): a `ServerApp`, a `ClientApp` and
the `DeerStrategy` between them. The Flower layer only moves messages; the algorithm is the core's.

    flwr run . <superlink-connection>   # from the repository root; see the README
"""

from typing import Any

__all__ = ["DeerStrategy", "TooFewClients"]


def __getattr__(name: str) -> Any:
    """`DeerStrategy`, `TooFewClients` on first use: `python -m peft_deer.flower.local` checks flwr before."""
    if name in __all__:
        from . import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
