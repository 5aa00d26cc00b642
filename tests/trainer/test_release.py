"""Training.release() drops the training model for real: final/ is rebuilt and quantization runs in the
same process, and at 7B a model kept alive by a stray reference doubles the peak."""

import gc
import weakref

import pytest

from tests.conftest import write_config
from trainer.config import load_config


@pytest.mark.parametrize("after_training", [False, True])
def test_release_leaves_no_reference_to_the_model_or_optimizer(tmp_path, tiny_model, flashcards_file, after_training):
    from trainer.train import session

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, tmp_path / "out",
                                   training={"max_steps": 2, "save_steps": 2, "logging_steps": 1}))
    with session(cfg) as trainer:
        if after_training:
            trainer.train()
        base = weakref.ref(trainer.training.net.base)
        optimizer = weakref.ref(trainer.training.optimizer)
        trainer.training.release()
        gc.collect()
        assert base() is None and optimizer() is None
        with pytest.raises(RuntimeError, match="released"):
            trainer.evaluator.loss()
