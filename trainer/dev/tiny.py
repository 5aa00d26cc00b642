"""Tiny Llama-architecture models and seed-schema datasets, written locally (no network).

Used by the demo, the tests and the benchmarks. The model has random weights and a real BPE
tokenizer trained with the `tokenizers` library on the dataset's text; both load through the
normal `from_pretrained(path)` path.

    python -m trainer.dev.tiny /tmp/tiny        # writes /tmp/tiny/model and /tmp/tiny/flashcards.json
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

# Medical-flavoured vocabulary so the synthetic flashcards look like the seed data and are learnable:
# answers follow from the question by fixed rules the model can pick up in a few hundred steps.
_TERMS = [
    "insulin",
    "aspirin",
    "heparin",
    "warfarin",
    "metformin",
    "amoxicillin",
    "ibuprofen",
    "morphine",
    "digoxin",
    "lisinopril",
    "atropine",
    "naloxone",
    "prednisone",
    "albuterol",
    "furosemide",
    "statin",
]
_ORGANS = ["liver", "kidney", "heart", "lung", "pancreas", "brain", "stomach", "thyroid", "spleen", "skin"]
_EFFECTS = [
    "lowers blood glucose",
    "inhibits platelets",
    "prevents clotting",
    "reduces inflammation",
    "relieves pain",
    "treats infection",
    "slows the heart rate",
    "dilates the airways",
    "removes excess fluid",
    "reverses opioid overdose",
    "suppresses the immune response",
    "lowers blood pressure",
    "reduces cholesterol",
]
_FILLER = [
    "in most adults",
    "at standard doses",
    "according to current guidelines",
    "when given early",
    "with careful monitoring",
    "in the acute setting",
    "over several days",
    "in elderly patients",
]


def flashcards(n: int, seed: int = 0, long_tail: bool = True) -> list[dict[str, str]]:
    """Records in the Medical Meadow flashcards schema: instruction, input, output.

    Lengths are long-tailed like the real flashcards: mostly one-sentence answers, a few long ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        term, organ = _TERMS[i % len(_TERMS)], rng.choice(_ORGANS)
        effect = _EFFECTS[(i * 7) % len(_EFFECTS)]
        question = f"What is the main effect of {term} on the {organ}?"
        answer = f"{term.capitalize()} {effect} {rng.choice(_FILLER)}."
        if long_tail and rng.random() < 0.08:  # the long tail
            extra = rng.randint(4, 14)
            answer += " " + " ".join(
                f"It also {rng.choice(_EFFECTS)} {rng.choice(_FILLER)} in the {rng.choice(_ORGANS)}." for _ in range(extra)
            )
        out.append({"instruction": "Answer this question truthfully", "input": question, "output": answer})
    return out


def finance_alpaca(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Records in the finance-alpaca schema: instruction, input, output, text."""
    rng = random.Random(seed)
    topics = [
        "an index fund",
        "a bond ladder",
        "a Roth IRA",
        "dollar-cost averaging",
        "an emergency fund",
        "a high-yield savings account",
        "a mortgage refinance",
        "diversification",
    ]
    out = []
    for i in range(n):
        topic = topics[i % len(topics)]
        instruction = f"Explain {topic} to a new investor."
        output = f"{topic.capitalize()} helps manage risk and cost {rng.choice(_FILLER)}."
        out.append({"instruction": instruction, "input": "", "output": output, "text": f"{instruction} {output}"})
    return out


def conversations(fmt: str, n: int, seed: int = 0) -> list[dict]:
    """Flashcard facts as multi-turn conversations (messages or ShareGPT) or prompt-completion pairs."""
    cards = flashcards(n * 2, seed=seed, long_tail=False)
    out: list[dict[str, Any]] = []
    for i in range(n):
        a, b = cards[2 * i], cards[2 * i + 1]
        turns = [("user", a["input"]), ("assistant", a["output"]), ("user", b["input"]), ("assistant", b["output"])]
        if fmt == "messages":
            out.append(
                {
                    "messages": [{"role": "system", "content": "Answer truthfully."}]
                    + [{"role": r, "content": c} for r, c in turns]
                }
            )
        elif fmt == "sharegpt":
            out.append({"conversations": [{"from": "human" if r == "user" else "gpt", "value": c} for r, c in turns]})
        else:
            out.append({"prompt": f"Q: {a['input']}\nA:", "completion": f" {a['output']}"})
    return out


def corpus(records: Iterable[dict]) -> list[str]:
    return [" ".join(str(v) for v in r.values()) for r in records]


def build_tokenizer(texts: list[str], vocab_size: int = 512, chat_template: Optional[str] = None):
    """A byte-level BPE tokenizer trained on `texts`, with Llama's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    from trainer.data.formats import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT

    # The prompt scaffolding is part of the corpus so templated prompts tokenize to realistic lengths.
    scaffold = [
        ALPACA_PREAMBLE,
        ALPACA_PREAMBLE_INPUT,
        "[INST] <<SYS>> <</SYS>> [/INST]",
        "### Instruction: ### Input: ### Response:",
    ] * 20
    tok.train_from_iterator(texts + scaffold, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def sentencepiece_tokenizer(texts: list[str], directory: str | Path, vocab_size: int = 512):
    """A Llama-2-style SentencePiece BPE tokenizer (byte fallback, <unk> <s> </s> = 0 1 2) trained on
    `texts`, written to `directory` as tokenizer.model: the form llama.cpp's GGUF converter reads (it
    refuses byte-level BPE tokenizers whose pre-tokenizer it does not know)."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
            }
        )
    )
    return AutoTokenizer.from_pretrained(str(directory))


def write_model(
    path: str | Path,
    texts: list[str],
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: Optional[int] = None,
    vocab_size: int = 512,
    seed: int = 0,
    max_positions: int = 2048,
    chat_template: Optional[str] = None,
    initializer_range: float = 0.02,
    sentencepiece: bool = False,
) -> Path:
    """Write a random-weight LlamaForCausalLM and its tokenizer to `path` (byte-level BPE, or with
    `sentencepiece` a Llama-2-style tokenizer.model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if sentencepiece:
        tokenizer = sentencepiece_tokenizer(texts, path, vocab_size)
    else:
        tokenizer = build_tokenizer(texts, vocab_size, chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def write_json(path: str | Path, records: list[dict], lines: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def main(argv: Optional[list[str]] = None) -> int:
    out = Path((argv or sys.argv[1:] or ["tiny"])[0])
    records = flashcards(2000)
    write_json(out / "flashcards.json", records)
    write_model(out / "model", corpus(records))
    print(f"wrote {out / 'model'} and {out / 'flashcards.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
