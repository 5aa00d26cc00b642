import json

import pytest
import torch

from trainer.config import DataConfig
from trainer.data import (IGNORE, check_columns, collate, label_tokens, llama2_chat_prompt, make_batches, prepare,
                          read_file, render, rows_of, shard, split_validation, tokenize)
from trainer.errors import UserError


def dc(**kw):
    return DataConfig(file="x.json", **kw)


# ---- templates ---------------------------------------------------------------------------

def test_alpaca_uses_the_seeds_two_prompts(tokenizer):
    with_input, out = render({"instruction": "Answer", "input": "What is X?", "output": "Y"}, dc(), tokenizer)
    assert "paired with an input" in with_input and "### Input:\nWhat is X?" in with_input
    assert with_input.endswith("### Response:\n") and out == "Y"
    no_input, _ = render({"instruction": "Answer", "input": "", "output": "Y"}, dc(), tokenizer)
    assert "### Input" not in no_input and no_input.startswith("Below is an instruction that describes a task.")


def test_alpaca_prompts_and_preamble_are_overridable(tokenizer):
    p, _ = render({"instruction": "I", "output": "O"}, dc(system_prompt="You are a finance assistant."), tokenizer)
    assert p.startswith("You are a finance assistant.\n\n### Instruction:\nI")
    p, _ = render({"instruction": "I", "input": "C", "output": "O"},
                  dc(prompt_with_input="Q: {instruction} / {input}\nA: "), tokenizer)
    assert p == "Q: I / C\nA: "


def test_chat_falls_back_to_llama2_inst_form(tokenizer):
    assert not tokenizer.chat_template
    p, r = render({"instruction": "Hi", "input": "", "output": "Hello"}, dc(template="chat", system_prompt="Be brief."),
                  tokenizer)
    assert p == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]" and r.strip() == "Hello"
    assert llama2_chat_prompt("Q", None) == "[INST] Q [/INST]"


def test_chat_uses_the_tokenizers_own_template(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    p, r = render({"instruction": "Hi", "output": "Hello"}, dc(template="chat", system_prompt="S"), tok)
    assert p == "<|system|>S\n<|user|>Hi\n<|assistant|>" and r.startswith("Hello")


# ---- masking and truncation ----------------------------------------------------------------

def test_prompt_tokens_are_masked_unless_train_on_prompt(tokenizer):
    rec = [{"instruction": "Answer this", "input": "What is aspirin?", "output": "It inhibits platelets."}]
    (ex,) = tokenize(rec, dc(), tokenizer)
    prompt_len = len(tokenizer(render(rec[0], dc(), tokenizer)[0], add_special_tokens=False)["input_ids"]) + 1
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
    assert all(x == IGNORE for x in ex.labels[:prompt_len])
    assert ex.labels[prompt_len:] == ex.input_ids[prompt_len:]
    (ex2,) = tokenize(rec, dc(train_on_prompt=True), tokenizer)
    assert ex2.labels[0] == IGNORE and ex2.labels[1:] == ex2.input_ids[1:]


def test_long_examples_are_truncated_and_counted(tokenizer):
    from trainer.data import DataStats

    stats = DataStats()
    rec = [{"instruction": "I", "input": "", "output": "word " * 400}, {"instruction": "I", "output": "short"}]
    exs = tokenize(rec, dc(max_seq_length=64, prompt_no_input="{instruction}: "), tokenizer, stats)
    assert len(exs[0].input_ids) == 64 and stats.truncated == 1 and stats.examples == 2


def test_max_seq_length_too_small_for_the_prompt(tmp_path, tiny_model, tokenizer, flashcards_records):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(flashcards_records[:20]))
    with pytest.raises(UserError, match=r"data.max_seq_length=16 is too small .* set data.max_seq_length to"):
        prepare(DataConfig(file=str(f), max_seq_length=16), tokenizer)


# ---- packing -----------------------------------------------------------------------------

def test_packing_keeps_examples_whole_and_labels_right_at_boundaries(tokenizer, flashcards_records):
    cfg = dc(max_seq_length=512)
    examples = tokenize(flashcards_records[:200], cfg, tokenizer)
    rows = rows_of(examples)
    batches = make_batches(rows, 4, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))  # every example once
    assert all(len(b) == 4 for b in batches[:-1])
    seen = []
    for b in batches:
        t, real = collate([rows[i] for i in b], tokenizer.pad_token_id)
        ids, labels, pos = (t[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
        assert t["input_ids"].shape[0] == 1 and real == len(ids)  # one sequence, not a token of padding
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        assert len(starts) - 1 == len(b)
        for a, z in zip(starts, starts[1:]):
            seen.append(tuple(ids[a:z]))
            assert labels[a] == IGNORE  # no example learns its first token from its neighbour
            assert pos[a:z] == list(range(z - a))
    assert sorted(seen) == sorted(tuple(e.input_ids) for e in examples)
    assert label_tokens(rows) == sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in examples)


def test_packed_examples_do_not_attend_to_each_other(tiny_model, tokenizer, flashcards_records):
    """Logits of an example are the same alone and packed behind another one (SDPA mask from position_ids)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation="sdpa").eval()
    a, b = rows_of(tokenize(flashcards_records[:2], dc(), tokenizer))
    t, _ = collate([a, b], tokenizer.pad_token_id)
    split = len(a)
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for packing.
        packed = model(input_ids=t["input_ids"], position_ids=t["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits[0]
        leaky = model(input_ids=t["input_ids"], use_cache=False).logits[0]  # no restarts: plain causal
    assert torch.allclose(packed[split:], alone, atol=1e-5)
    assert not torch.allclose(leaky[split:], alone, atol=1e-3)


def test_unpacked_batches_pad_in_an_isolated_segment(tokenizer, flashcards_records):
    rows = rows_of(tokenize(flashcards_records[:50], dc(max_seq_length=512), tokenizer))
    longest, shortest = max(rows, key=len), min(rows, key=len)
    assert len(longest) > len(shortest)
    t, real = collate([longest, shortest], tokenizer.pad_token_id, packing=False)
    short = len(shortest)
    assert real == len(longest) + len(shortest) and t["input_ids"].shape == (2, len(longest))
    assert (t["labels"][1, short:] == IGNORE).all()
    assert t["position_ids"][1, short].item() == 0  # the pad segment starts its own sequence


def test_sharding_gives_every_rank_the_same_count():
    order = list(range(11))
    parts = [shard(order, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3] and not set(parts[0]) & set(parts[1])


def test_validation_split_is_held_out_deterministically():
    recs = [{"i": i} for i in range(100)]
    train, val = split_validation(recs, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90 and not {r["i"] for r in val} & {r["i"] for r in train}
    assert split_validation(recs, 0.1, seed=3) == (train, val)


# ---- files and bad data ----------------------------------------------------------------------

def test_malformed_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(UserError, match=rf"{f}:2: malformed JSON line"):
        read_file(f)


def test_malformed_json_array_names_line(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]')
    with pytest.raises(UserError, match=rf"{f}:3: malformed JSON"):
        read_file(f)


def test_empty_dataset_is_refused(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text("\n")
    with pytest.raises(UserError, match="has no examples"):
        prepare(DataConfig(file=str(f)), tokenizer)


def test_missing_columns_name_the_columns_found(tokenizer):
    with pytest.raises(UserError, match=r"needs column\(s\) instruction, output but the data has question, answer"):
        check_columns([{"question": "q", "answer": "a"}], dc())


def test_missing_file_is_refused_after_waiting(tmp_path):
    with pytest.raises(UserError, match="does not exist after waiting 1s"):
        read_file(tmp_path / "later.json", wait_seconds=1)


def test_csv_parquet_and_text_files(tmp_path):
    import pandas as pd

    df = pd.DataFrame([{"instruction": "i", "input": "", "output": "o"}] * 3)
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("line one\nline two\n")
    assert read_file(tmp_path / "d.csv")[0]["instruction"] == "i"
    assert len(read_file(tmp_path / "d.parquet")) == 3
    assert [r["text"] for r in read_file(tmp_path / "d.txt")] == ["line one", "line two"]


def test_finance_alpaca_schema_prepares(finance_file, tokenizer):
    prepared = prepare(DataConfig(file=str(finance_file), template="chat", system_prompt="Finance."), tokenizer)
    assert prepared.train_rows and prepared.val_rows
    assert prepared.train_stats.trained_tokens > 0


def test_unreachable_hub_dataset_is_refused_clearly(tokenizer):
    with pytest.raises(UserError, match=r"data.dataset 'org/no-such-dataset' \(split 'train'\) cannot be loaded.*Fix"):
        prepare(DataConfig(dataset="org/no-such-dataset"), tokenizer)
