"""Gradio demo of a finished peft_deer run: ``python -m app --adapter RUN_DIR/adapter``.

Runs offline: Gradio analytics off and the Hugging Face hub offline unless set otherwise.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
