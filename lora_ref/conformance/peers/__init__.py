"""Other LoRA implementations wrapped for the conformance runner (imported lazily: torch, onnxruntime)."""
