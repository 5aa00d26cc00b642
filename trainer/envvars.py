"""The environment contract: every variable one part of the product sets and another reads, named once.

Who sets what (readers in parentheses):
- the stack, on the worker container (infra/jobs/pod.py): LOG_FORMAT (metrics.plain_logs),
  GRACE_SECONDS and LAUNCH_ATTEMPTS (launch.Supervisor), TOKEN_PATH (modeling.read_token: a path, never
  the token), the trackers' credential paths (config.CREDENTIAL_FILES, tracking);
- the launcher, for the torchrun workers it starts (trainer/runtime/launch.py): STOP_FILE (preemption),
  INPUT_ERROR_FILE (cli: a refused input is not retried);
- a developer or a test: RUN_DIR (where the launcher keeps its marker files; /tmp in a pod), DEVICE
  (distributed.device: cpu or cuda), REQUIRE_ETCD (the etcd tests fail instead of skipping), CPU_BF16
  (compute.measure: fast or slow states how this CPU's bf16 matmul compares with fp32 instead of measuring
  it; the tests set it so that nothing depends on the machine's CPU);
- the job's operator: torchrun's PET_* variables (launch) and, with Kubeflow Trainer's TrainJobStatus
  gate, the status endpoint (trainer/monitor/kubeflow_status.py names those, as the Trainer does).
"""

from __future__ import annotations

LOG_FORMAT = "LLM_FINETUNE_LOG_FORMAT"
GRACE_SECONDS = "LLM_FINETUNE_GRACE_SECONDS"
LAUNCH_ATTEMPTS = "LLM_FINETUNE_LAUNCH_ATTEMPTS"
TOKEN_PATH = "HF_TOKEN_PATH"  # huggingface_hub's own name
STOP_FILE = "LLM_FINETUNE_STOP_FILE"
INPUT_ERROR_FILE = "LLM_FINETUNE_INPUT_ERROR_FILE"
RUN_DIR = "LLM_FINETUNE_RUN_DIR"
DEVICE = "LLM_FINETUNE_DEVICE"
REQUIRE_ETCD = "LLM_FINETUNE_REQUIRE_ETCD"
CPU_BF16 = "LLM_FINETUNE_CPU_BF16"
