"""`python -m app --adapter RUN_DIR/adapter`: the repository's entry point of the Gradio demo, which lives in
`peft_deer.demo` (the `deer-app` console script)."""
