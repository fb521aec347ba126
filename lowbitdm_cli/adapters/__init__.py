"""LoRA adapters on float, fake-quantized and integer models: `lora_file` reads and matches an adapter
file, `branch` runs it beside each layer or folds it into the weights."""
