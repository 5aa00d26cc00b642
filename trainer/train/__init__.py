"""The fine-tune: built from its config (build.py: placement.py, net.py, optim.py), stepped by the loop
(loop.py: step.py, steplog.py, evaluator.py, saving.py over checkpoint.py and identity.py; state.py),
saved as final/ (final.py). finetune.py runs them in order inside the process group and output lock."""

from trainer.train.finetune import finetune, session
from trainer.train.loop import Trainer

__all__ = ["Trainer", "finetune", "session"]
