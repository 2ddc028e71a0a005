"""lora_ref.export: ONNX graphs with LoRA adapters (merged, dynamic, batched). Imports onnx."""
