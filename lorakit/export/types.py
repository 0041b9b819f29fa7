"""The GGUF tensor types lorakit writes (light: the run config and the CLI read the choices from here)."""

GGUF_TYPES = ("f16", "q8_0", "q4_0", "q5_0", "q5_1")
DEFAULT_GGUF_TYPE = "q8_0"  # `lorakit export --type`: near lossless (sizes and perplexities: bench/README.md, ## export)
