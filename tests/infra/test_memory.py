"""The memory plan at preview: presets' resources.memory follow from it; a stack whose memory cannot
hold the job is refused naming the key and the figure that would; one that needs gradient
checkpointing is warned about."""

import json

import pytest

from infra import config, memory
from infra.config import StackConfigError
from tests.infra.harness import ROOT, render, stack_config
from tests.trainer.test_memplan import LLAMA2_7B
from trainer.model import memplan

PRESETS = ["Pulumi.medical-meadow.yaml", "Pulumi.financial-chatbot.yaml"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_memory_follows_from_the_plan_of_llama2_7b(preset):
    raw = {**stack_config(ROOT / preset), "hfToken": "<secret>"}
    cfg = config.parse(raw, token_is_secret=True)
    plan = memory.plan_for(cfg.trainer, LLAMA2_7B, cfg.workers, cfg.procs_per_worker, cfg.resources.gpus)
    need = plan.peak * cfg.procs_per_worker
    limit = memory.quantity_bytes(cfg.resources.memory)
    # Enough for the plan with headroom for its ±20%, and not a guess far above it.
    assert 1.15 * need <= limit <= 1.5 * need, (plan.describe(), cfg.resources.memory)
    assert cfg.trainer.model.dtype == "bf16"
    assert memory.check(cfg, LLAMA2_7B, "test").warning is None
    # The presets expect nodes with fast bf16 (AMX); preview also says what an AVX2-only node needs:
    # fp32 compute doubles the activations, so the trainer turns on gradient checkpointing there.
    avx2 = memory.on_avx2(cfg, LLAMA2_7B)
    assert avx2.startswith("on CPUs without fast bf16 (AVX2-only: fp32 compute) ") and "does not fit" not in avx2
    slow = memplan.estimate(memplan.Shape.from_config(LLAMA2_7B),
                            memplan.replace(plan.setting, mixed=False, compute_bytes=4), plan.terms["runtime"])
    assert slow.terms["activations"] == 2 * plan.terms["activations"] and "widened weights" in slow.terms


LLAMA2_13B = {**LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
              "num_hidden_layers": 40, "num_key_value_heads": 40}


def test_the_13b_qlora_preset_fits_nodes_of_24_gb_by_its_plan():
    raw = {**stack_config(ROOT / "Pulumi.medical-meadow-13b-qlora.yaml"), "hfToken": "<secret>"}
    cfg = config.parse(raw, token_is_secret=True)
    assert cfg.trainer.lora.base_bits == 4 and not cfg.trainer.training.fsdp
    plan = memory.plan_for(cfg.trainer, LLAMA2_13B, cfg.workers, cfg.procs_per_worker, cfg.resources.gpus)
    limit = memory.quantity_bytes(cfg.resources.memory)
    assert limit < 22 * 2 ** 30  # what a node of 24 GB can give a pod
    assert plan.terms["quantized weights"] < 0.26 * LLAMA2_13B_PARAMS * 2  # about a quarter of the bf16 base
    assert memory.check(cfg, LLAMA2_13B, "test").warning is None
    avx2 = memory.on_avx2(cfg, LLAMA2_13B)
    assert "does not fit" not in avx2, avx2
    # Measured at the 13B shape (bench/results/scale-cpu-avx2.json) the plan was 18% under the peak: the
    # pod holds 20% over the larger (fp32-compute) plan, and is not wasteful beside the bf16 one.
    slow = float(avx2.split(" GiB per process")[0].rsplit(" ", 1)[1]) * 2 ** 30
    assert 1.2 * slow <= limit <= 1.7 * plan.peak, (plan.describe(), avx2, cfg.resources.memory)


LLAMA2_13B_PARAMS = memplan.Shape.from_config(LLAMA2_13B).params


def test_quantities():
    assert memory.quantity_bytes("46Gi") == 46 * 2 ** 30
    assert memory.quantity_bytes("512Mi") == 512 * 2 ** 20
    assert memory.quantity_bytes("2G") == 2 * 10 ** 9
    assert memory.quantity_bytes("1e9") == 10 ** 9
    for wrong in ("46GB", "16 Gi", "lots"):  # never read as a number of bytes
        with pytest.raises(ValueError, match="not a Kubernetes quantity"):
            memory.quantity_bytes(wrong)


def _stack(tmp_path, memory_value, **extra):
    model = tmp_path / "llama-2-7b-shape"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))  # shapes only: preview reads no weights
    return {"model": str(model), "modelDtype": "bf16", "workers": 1, "rendezvous": "c10d",
            "resources": {"cpu": "8", "memory": memory_value}, "storage": {"accessMode": "ReadWriteOnce"},
            "dataset": {"name": "some/dataset", "maxSeqLength": 512},
            "training": {"per_device_train_batch_size": 8}, **extra}


def _plans(raw):
    cfg = config.parse(raw, token_is_secret=None)
    plan = memory.plan_for(cfg.trainer, LLAMA2_7B, cfg.workers, cfg.procs_per_worker, 0)
    with_gc = memplan.estimate(memplan.Shape.from_config(LLAMA2_7B),
                               memplan.replace(plan.setting, gradient_checkpointing=True), plan.terms["runtime"])
    return plan, with_gc


def test_preview_plans_a_local_model_and_says_it_fits(tmp_path):
    out = render(_stack(tmp_path, "64Gi")).outputs["memoryPlan"]
    assert out.startswith("fits: ") and "frozen weights 12.55" in out


def test_preview_warns_when_only_gradient_checkpointing_fits(tmp_path):
    plan, with_gc = _plans(_stack(tmp_path, "1Gi"))
    between = f"{int((plan.peak + with_gc.peak) / 2 / 2 ** 20)}Mi"
    out = render(_stack(tmp_path, between)).outputs["memoryPlan"]
    assert "gradient checkpointing" in out and "resources.memory" in out


def test_preview_refuses_memory_that_nothing_makes_fit(tmp_path):
    with pytest.raises(StackConfigError) as err:
        render(_stack(tmp_path, "8Gi"))
    message = str(err.value)
    assert "resources.memory" in message and "Fix: pulumi config set --path resources.memory" in message
    assert message.count("Fix:") == 1


def test_preview_without_a_readable_config_plans_nothing(tmp_path):
    raw = {**stack_config(ROOT / "Pulumi.medical-meadow.yaml"), "hfToken": "hf_x"}
    out = render(raw).outputs["memoryPlan"]
    assert out.startswith("not planned at preview") and "the trainer plans before loading" in out


def test_a_gguf_model_is_rendered_and_planned_from_its_metadata(tmp_path, smollm2_gguf):
    """A GGUF file as the stack's model: planned at preview from the file's metadata (no tensor read);
    on the volume or the hub, rendered for the trainer (which dequantizes it once) and not planned here."""
    raw = {**_stack(tmp_path, "16Gi"), "model": str(smollm2_gguf), "modelDtype": "fp32"}
    rendered = render(raw)
    assert rendered.outputs["memoryPlan"].startswith("fits: ")
    cfg = config.parse(raw, token_is_secret=None)
    assert cfg.trainer.model.name_or_path == str(smollm2_gguf)
    on_volume = render({**raw, "model": "/data/models/smollm2.Q4_1.gguf"})
    assert "GGUF file on the volume or the hub" in on_volume.outputs["memoryPlan"]
