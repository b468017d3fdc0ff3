"""Gradio demo of a finished peft_deer run: ``python -m app --adapter RUN_DIR/adapter`` (or ``deer-app``).

Modules: `run` (reading a run directory, no torch), `decode` (uploads and DICOM), `predict` (the
classifier), `batch` (many files, CSV), `uploads` (the private upload cache), `ui` (the Gradio app).

Runs offline: Gradio analytics off and the Hugging Face hub offline unless set otherwise.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
