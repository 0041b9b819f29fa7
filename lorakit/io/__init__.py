"""File handling shared by every step: atomic outputs, digests and streaming safetensors I/O."""
