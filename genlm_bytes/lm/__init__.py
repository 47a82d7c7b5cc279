"""Token-level language models (backends): the AsyncLM interface and its implementations."""
