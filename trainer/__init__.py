"""llm-finetune trainer: distributed fine-tuning, evaluation and quantization (python -m trainer --help)."""

import logging

# torchao (pulled in by Intel Neural Compressor) warns at import that its CUDA kernels do not load on
# a CPU-only torch, and torch warns about its enum registrations: noise in every log, not a problem.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
