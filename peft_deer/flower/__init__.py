"""DEeR on Flower (flwr >= 1.42, `pip install "peft_deer[flower]"`): a `ServerApp`, a `ClientApp` and
the `DeerStrategy` between them. The Flower layer only moves messages; the algorithm is the core's.

    flwr run . <superlink-connection>   # from the repository root; see the README
"""

from .strategy import DeerStrategy, TooFewClients

__all__ = ["DeerStrategy", "TooFewClients"]
