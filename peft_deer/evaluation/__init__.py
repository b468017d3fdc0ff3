"""Scoring a classifier: `metrics.py` (logits, AUC/accuracy, the validation-chosen threshold or class offsets;
torch) and `calibration.py` (temperature scaling; numpy only, so the demo's light front checks a run's
temperature before torch loads). Import from the submodules: this file stays empty so that
`peft_deer.light_import` can load `peft_deer.evaluation.calibration` without torch."""
