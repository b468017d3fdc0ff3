"""The results campaign (`deer-campaign`, `python bench/campaign.py`): deer-fed runs over a grid of settings and
seeds, kept in one table, with a centralized linear probe as the baseline.

One module per stage: `grid` (YAML grid -> runs and probes, stable ids), `store` (results.jsonl, run-dir states),
`execute` (running deer-fed and the probe, resume, retries, progress), `report` (RESULTS.md and the plot),
`probe` (the linear probe), `cli` (the command line). This file imports nothing, so `--help`, `--dry-run` and
`--report-only` stay light (no torch): only `execute` running a probe, and `probe`, load the heavy modules.
"""
