"""llm-finetune: one `pulumi up` deploys a distributed fine-tuning job (see README.md).

    pulumi stack select dev && pulumi up
"""

import pulumi

from infra import config
from infra.component import FineTuneJob, FineTuneJobArgs

cfg = config.load()
job = FineTuneJob(cfg.job_name, FineTuneJobArgs(config=cfg, hf_token=config.load_token() if cfg.has_token else None))
for key, value in job.outputs.items():
    pulumi.export(key, value)
