"""The command-line drivers (`deer-fed`). Each imports nothing heavy at module level: the repository's
entry point `train/fed.py` loads it through `peft_deer.light_import`, so flags are checked before torch."""
