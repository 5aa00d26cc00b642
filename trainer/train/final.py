"""final/ (the fine-tuned model, adapters merged, in the save dtype) and adapter/ (LoRA's adapters alone).

final/ must hold the base's own weights plus the merged adapters: where training held the base rounded
(a bf16 frozen base of an fp16/fp32 checkpoint) or quantized (QLoRA), it is re-read from its files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, cast

import torch

from trainer.config import TrainerConfig
from trainer.model import modeling
from trainer.runtime import distributed as D
from trainer.train.net import Net, Training
from trainer.train.placement import Placement


class FinalSaver:
    """Writes final/ and adapter/ once training is over, dropping the training model (`Training.release`)
    before final/ is rebuilt from the files. No reference to the model outlives the release: the
    trained weights are copied out first, in the frame that releases."""

    def __init__(self, cfg: TrainerConfig, d: D.Dist, log, model_path: str, tokenizer, placement: Placement):
        self.cfg, self.d, self.log, self.model_path, self.tokenizer = cfg, d, log, model_path, tokenizer
        self.placement = placement

    @property
    def adapter_dir(self) -> Optional[Path]:
        return self.cfg.adapter_dir if self.cfg.lora.enabled else None

    def save(self, training: Training) -> None:
        cfg, d, p = self.cfg, self.d, self.placement
        if not d.all_true(all(bool(torch.isfinite(q).all()) for q in training.net.trainable)):
            raise_not_finite(cfg)
        if cfg.training.fsdp and d.enabled:
            trained = _gathered(training.net, cfg.lora.enabled)  # every rank takes part; rank 0 holds them
            if d.is_main:
                training.release()
                self._rebuilt(trained, p.file_dtype if cfg.lora.enabled else p.precision.params)
        elif d.is_main:
            model = D.unwrap(training.net.base)
            if hasattr(model, "_orig_mod"):
                model = cast(torch.nn.Module, model._orig_mod)
            if cfg.lora.base_bits:
                merging = self._adapter_and_deltas(model)
                del model
                training.release()
                self._merged(*merging)
            elif cfg.lora.enabled and not modeling.exact_in(p.load_dtype, p.file_dtype):
                trained = {n: q.detach().float().clone() for n, q in model.named_parameters() if q.requires_grad}
                del model
                training.release()
                self._rebuilt(trained, p.file_dtype)
                self.log(
                    f"final/: the base's weights re-read from {self.model_path} in {D._short(p.file_dtype)} "
                    f"(training held them in {D._short(p.load_dtype)})"
                )
            else:  # the weights as trained are the weights to save
                modeling.save_final(
                    model, self.tokenizer, cfg.final_dir, self.adapter_dir, p.save_dtype, base_dir=self.model_path
                )
        d.barrier()
        self.log(
            f"saved fine-tuned model to {cfg.final_dir}" + (f" and adapter to {cfg.adapter_dir}" if cfg.lora.enabled else "")
        )

    def _rebuilt(self, trained: dict[str, Any], dtype: torch.dtype) -> None:
        """The model rebuilt unsharded on the CPU from the base's files with the trained weights, merged
        and saved the usual way."""
        cfg = self.cfg
        model = modeling.rebuild(self.model_path, dtype, cfg.lora if cfg.lora.enabled else None, trained)
        modeling.save_final(
            model, self.tokenizer, cfg.final_dir, self.adapter_dir, self.placement.save_dtype, base_dir=self.model_path
        )

    def _adapter_and_deltas(self, model: Any) -> tuple[dict, dict, Optional[dict]]:
        """QLoRA: adapter/ written; what final/ needs copied out of the model: the adapters' deltas and
        the whole trained modules, and (where the base's files cannot be streamed) every trained weight."""
        from trainer.model import merge

        deltas, whole = merge.trained(model)
        files = merge.names(self.model_path)
        streamed = files is not None and set(deltas) | set(whole) <= files
        trained = None if streamed else {n: q.detach().float().clone() for n, q in model.named_parameters() if q.requires_grad}
        model.save_pretrained(str(self.adapter_dir))
        self.tokenizer.save_pretrained(str(self.adapter_dir))
        return deltas, whole, trained

    def _merged(self, deltas: dict, whole: dict, trained: Optional[dict]) -> None:
        """QLoRA's final/: merged into the base re-read from its files (the base was held quantized:
        merging into it would round the base to its bits), streamed a tensor at a time where the files
        are safetensors holding every adapted weight under the model's names, else rebuilt whole."""
        from trainer.model import merge

        cfg, p = self.cfg, self.placement
        read = (
            f"final/: the base's weights re-read from {self.model_path} in {D._short(p.file_dtype)} "
            f"(training held them in {cfg.lora.base_bits} bits)"
        )
        if trained is None:
            count = merge.write_final(
                self.model_path, deltas, whole, p.save_dtype, self.tokenizer, cfg.final_dir, modeling.SOURCE_TOKENIZER_FILES
            )
            self.log(f"{read}, a tensor at a time: {count} adapted weights merged in fp32, saved as {D._short(p.save_dtype)}")
            return
        self.log(f"{read}, the whole model at once (its files are not safetensors under the model's names)")
        rebuilt = modeling.rebuild(self.model_path, p.file_dtype, cfg.lora, trained)
        modeling.save_final(rebuilt, self.tokenizer, cfg.final_dir, None, p.save_dtype, base_dir=self.model_path)


def _gathered(net: Net, lora: bool) -> dict[str, Any]:
    """FSDP2: the trained weights (all of them for a full fine-tune) gathered unsharded to rank 0's CPU,
    under the Hugging Face model's names; empty on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {n for n, q in net.loss_module.named_parameters() if q.requires_grad}
    return {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.") and (not lora or k in names)}


def raise_not_finite(cfg: TrainerConfig) -> None:
    from trainer.errors import UserError

    raise UserError(
        f"the trained weights are not finite (NaN/inf): {cfg.final_dir} was not written. Fix: a "
        f"lower training.learning_rate (now {cfg.training.learning_rate:g}) or training.max_grad_norm"
    )
