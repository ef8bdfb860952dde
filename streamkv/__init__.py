"""streamkv: KV-cache eviction experiments on decoder LLMs (StreamingLLM and beyond)."""

__version__ = "0.1.0"
