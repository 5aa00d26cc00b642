"""Several fine-tunes in one torchrun launch, on one process group (the architecture tests):

    torchrun --nproc-per-node 2 -m tests.integration.zoo_driver a.yaml b.yaml ...

Starting torchrun and importing torch/transformers costs more than a few steps of a tiny model, so
the architectures share one launch; each fine-tune is the product's own `finetune`.
"""

import sys

from trainer.runtime import distributed as D
from trainer.config import load_config
from trainer.train import finetune


def main(paths: list[str]) -> int:
    d = D.init(None)
    try:
        for path in paths:
            if d.is_main:
                print(f"=== {path}", file=sys.stderr, flush=True)
            finetune(load_config(path), dist=d)
            d.barrier()
    finally:
        d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
