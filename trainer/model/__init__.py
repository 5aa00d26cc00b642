"""The model: loading it from its sources (hub, files, GGUF), LoRA and QLoRA, attention kernels and the
start-up probes, compute precision, the memory plan, merging adapters into final/."""
