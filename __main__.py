"""llm-finetune: one `pulumi up` deploys a distributed fine-tuning job (see README.md).

pulumi stack select dev && pulumi up
"""

import pulumi

from infra import config, memory
from infra.component import FineTuneJob, FineTuneJobArgs

cfg = config.load()
plan = memory.preview(cfg)  # the trainer's memory plan against resources.memory (raises when nothing fits)
if plan.warning:
    pulumi.log.warn(plan.warning)
pulumi.export("memoryPlan", plan.summary if not plan.warning else f"{plan.summary} -- {plan.warning}")
job = FineTuneJob(
    cfg.job_name,
    FineTuneJobArgs(
        config=cfg,
        hf_token=config.load_token() if cfg.has_token else None,
        tracker_credentials={key: config.load_secret(key) for key in cfg.tracker_secrets},
    ),
)
for key, value in job.outputs.items():
    pulumi.export(key, value)
