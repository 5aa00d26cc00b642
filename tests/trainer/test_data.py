"""Data: formats, exactly-labelled tokens, record-by-record validation, files, the tokenize-once cache,
batching and packing."""

import gzip
import json

import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data import IGNORE, collate, prepare, shard
from trainer.data.batches import BatchOrder
from trainer.data.encode import Dropped, Encoder, llama2_chat_prompt
from trainer.data.formats import Invalid, Pair, detect, normalize
from trainer.errors import UserError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Like Qwen3's: earlier assistant turns lose their reasoning; the latest keeps it.
REWRITES = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] | trim }}"
            "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = {"chatml": ["<|im_start|>", "<|im_end|>"], "llama3": ["<|start_header_id|>", "<|end_header_id|>",
                                                                 "<|eot_id|>"]}


def dc(**kw):
    return DataConfig(file="x.jsonl", **kw)


def cfg(**kw):
    """Files the tests read were written a moment ago: a short settle (the product waits 3 s)."""
    return DataConfig(**{"file_settle_seconds": 0.2, **kw})


@pytest.fixture
def chat_tokenizer(tmp_path, tokenizer):
    def make(template, specials):
        path = tmp_path / f"tok-{len(list(tmp_path.iterdir()))}"
        tokenizer.save_pretrained(str(path))
        tok = type(tokenizer).from_pretrained(str(path))
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.chat_template = template
        return tok
    return make


def trained_text(tok, encoded) -> list[str]:
    """The trained tokens of an example, decoded, one string per contiguous trained span."""
    spans, current = [], []
    for token, m in zip(encoded.ids.tolist(), encoded.mask.tolist()):
        if m:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tok.decode(s) for s in spans]


CONVERSATION = {"messages": [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": "What does insulin do?"},
                             {"role": "assistant", "content": "It lowers blood glucose."},
                             {"role": "user", "content": "And heparin?"},
                             {"role": "assistant", "content": "It prevents clotting."}]}


# ---- conversations: only the assistant's tokens, every turn, exactly ------------------------------

@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_every_assistant_turn_and_only_those_tokens_are_trained(chat_tokenizer, style):
    tok = chat_tokenizer(CHATML if style == "chatml" else LLAMA3, SPECIALS[style])
    sample = normalize(CONVERSATION, "messages", dc())
    (encoded,) = Encoder(tok, dc(max_seq_length=512)).encode([sample])[0:1][0]
    end = "<|im_end|>" if style == "chatml" else "<|eot_id|>"
    assert trained_text(tok, encoded) == [f"It lowers blood glucose.{end}", f"It prevents clotting.{end}"]
    # The whole sequence is the template's rendering, nothing appended after its end-of-turn token.
    full = tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert tok.decode(encoded.ids.tolist()) == full
    assert encoded.ids[-1] != tok.eos_token_id


def test_a_turn_marked_not_to_train_is_context_only(chat_tokenizer):
    tok = chat_tokenizer(CHATML, SPECIALS["chatml"])
    record = json.loads(json.dumps(CONVERSATION))
    record["messages"][2]["train"] = False
    (encoded,) = Encoder(tok, dc()).encode([normalize(record, "messages", dc())])[0]
    assert trained_text(tok, encoded) == ["It prevents clotting.<|im_end|>"]
    record["messages"][4]["weight"] = 0
    with pytest.raises(Invalid, match="no assistant turn to train on"):
        normalize(record, "messages", dc())


def test_a_template_that_rewrites_earlier_turns_gives_one_exact_example_per_turn(chat_tokenizer):
    tok = chat_tokenizer(REWRITES, SPECIALS["chatml"])
    record = {"messages": [{"role": "user", "content": "Q1"},
                           {"role": "assistant", "content": "<think>hmm</think>A1"},
                           {"role": "user", "content": "Q2"},
                           {"role": "assistant", "content": "<think>so</think>A2"}]}
    encoder = Encoder(tok, dc())
    first, second = encoder.encode([normalize(record, "messages", dc())])[0]
    # Each assistant turn is trained as the template renders it when it is the latest turn.
    assert trained_text(tok, first) == ["<think>hmm</think>A1<|im_end|>"]
    assert tok.decode(first.ids.tolist()) == tok.apply_chat_template(record["messages"][:2], tokenize=False)
    assert trained_text(tok, second) == ["<think>so</think>A2<|im_end|>"]
    assert "hmm" not in tok.decode(second.ids.tolist())  # its history as the template rewrites it
    assert encoder.split_conversations == 1


def test_sharegpt_is_the_same_conversation(chat_tokenizer):
    tok = chat_tokenizer(CHATML, SPECIALS["chatml"])
    sharegpt = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                   "value": m["content"]} for m in CONVERSATION["messages"]]}
    a = Encoder(tok, dc()).encode([normalize(CONVERSATION, "messages", dc())])[0][0]
    b = Encoder(tok, dc()).encode([normalize(sharegpt, "sharegpt", dc())])[0][0]
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask)


def test_instruction_records_through_a_chat_template_end_once(chat_tokenizer):
    tok = chat_tokenizer(CHATML, SPECIALS["chatml"])
    cfg = dc(template="chat", system_prompt="S")
    (encoded,) = Encoder(tok, cfg).encode([normalize({"instruction": "Hi", "output": "Hello"}, "instruction", cfg)])[0]
    text = tok.decode(encoded.ids.tolist())
    assert text.endswith("Hello<|im_end|>\n") and "<|im_end|>\n<|im_end|>" not in text
    assert trained_text(tok, encoded) == ["Hello<|im_end|>"]


def test_without_a_chat_template_conversations_take_the_llama2_form(tokenizer):
    assert not tokenizer.chat_template
    (encoded,) = Encoder(tokenizer, dc()).encode([normalize(CONVERSATION, "messages", dc())])[0]
    text = tokenizer.decode(encoded.ids.tolist())
    assert text.startswith("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat does insulin do? [/INST]")
    assert "</s><s>[INST] And heparin? [/INST]" in text and text.endswith("It prevents clotting. </s>")
    assert [t.strip() for t in trained_text(tokenizer, encoded)] == ["It lowers blood glucose. </s>",
                                                                     "It prevents clotting. </s>"]
    assert llama2_chat_prompt("Q", None) == "[INST] Q [/INST]"


def test_the_log_names_the_llama2_fallback_only_where_it_is_taken(tokenizer, chat_tokenizer, tiny_model, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(CONVERSATION) + "\n")
    card = tmp_path / "card.jsonl"
    card.write_text(json.dumps({"instruction": "Answer", "input": "What does insulin do?", "output": "Lowers glucose."})
                    + "\n")
    chatml = chat_tokenizer(CHATML, SPECIALS["chatml"])
    cases = [(chat, {}, tokenizer, True), (chat, {}, chatml, False),  # conversations
             (card, {"template": "chat"}, tokenizer, True), (card, {"template": "chat"}, chatml, False),
             (card, {}, tokenizer, False)]  # instruction records through the Alpaca prompts: no chat at all
    for i, (f, kw, tok, fallback) in enumerate(cases):
        lines = []
        prepare(cfg(file=str(f), validation_fraction=0.0, **kw), tok, str(tiny_model), cache_root=tmp_path / f"c{i}",
                log=lines.append)
        assert any("no chat template" in m and "[INST]" in m for m in lines) is fallback, (i, lines)


# ---- prompt-completion, instruction, text -------------------------------------------------------------

def test_prompt_completion_is_byte_exact_and_trains_the_completion(tokenizer):
    record = {"prompt": "What does insulin do?", "completion": " Insulin lowers blood glucose."}
    (encoded,) = Encoder(tokenizer, dc()).encode([normalize(record, "prompt-completion", dc())])[0]
    text = tokenizer.decode(encoded.ids.tolist(), skip_special_tokens=True)
    assert text == record["prompt"] + record["completion"]  # not "insulin?Insulin"
    assert trained_text(tokenizer, encoded) == [" Insulin lowers blood glucose.</s>"]


def test_alpaca_prompts_and_masking(tokenizer):
    record = {"instruction": "Answer this", "input": "What is aspirin?", "output": "It inhibits platelets."}
    sample = normalize(record, "instruction", dc())
    assert isinstance(sample, Pair) and "paired with an input" in sample.prompt and sample.prompt.endswith(
        "### Response:\n")
    (encoded,) = Encoder(tokenizer, dc()).encode([sample])[0]
    assert encoded.ids[0] == tokenizer.bos_token_id and encoded.ids[-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, encoded) == ["It inhibits platelets.</s>"]
    (everything,) = Encoder(tokenizer, dc(train_on_prompt=True)).encode([sample])[0]
    assert everything.mask[0] == 0 and everything.mask[1:].all()
    custom = normalize({"instruction": "I", "input": "C", "output": "O"}, "instruction",
                       dc(prompt_with_input="Q: {instruction} / {input}\nA: "))
    assert custom.prompt == "Q: I / C\nA: "


def test_long_examples_are_truncated_and_prompts_too_long_dropped(tokenizer):
    cfg = dc(max_seq_length=64, prompt_no_input="{instruction}: ")
    long = normalize({"instruction": "I", "output": "word " * 400}, "instruction", cfg)
    (encoded,) = Encoder(tokenizer, cfg).encode([long])[0]
    assert len(encoded.ids) == 64 and encoded.truncated
    huge = normalize({"instruction": "word " * 100, "output": "o"}, "instruction", cfg)
    (dropped,) = Encoder(tokenizer, cfg).encode([huge])[0]
    assert isinstance(dropped, Dropped) and dropped.reason == "prompt too long"


@pytest.mark.parametrize("record,fmt", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"prompt": "p", "completion": "c"}, "prompt-completion"),
    ({"instruction": "i", "input": "", "output": "o"}, "instruction"),
    ({"text": "t"}, "text"),
])
def test_the_format_is_detected_from_the_columns(record, fmt):
    assert detect(record, dc()) == fmt


def test_unknown_columns_are_refused_with_what_would_work():
    with pytest.raises(UserError, match=r"columns answer, question\. Expected one of: messages .*Fix: rename"):
        detect({"question": "q", "answer": "a"}, dc())


@pytest.mark.parametrize("record,fmt,words", [
    ({"instruction": "i", "input": ""}, "instruction", "field 'output': is missing"),
    ({"instruction": None, "output": "o"}, "instruction", "field 'instruction': is null"),
    ({"instruction": "i", "output": "  "}, "instruction", "field 'output': is empty"),
    ({"text": [{"role": "user"}]}, "text", "field 'text': must be text, got list"),
    ({"messages": "hello"}, "messages", "field 'messages': must be a list of turns"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "has no assistant turn to train on"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "messages", r"messages\[0\].role': must be one of"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", r"conversations\[0\].from': must be one of"),
    ({"prompt": "p", "completion": 3}, "prompt-completion", "field 'completion': must be text, got int"),
])
def test_every_record_is_checked(record, fmt, words):
    with pytest.raises(Invalid, match=words):
        normalize(record, fmt, dc())


# ---- files: validated as read, located by file and line -------------------------------------------------

def _cards(n, start=0):
    return [{"instruction": "Answer this question truthfully", "input": f"What is card {i}?",
             "output": f"It is card number {i}."} for i in range(start, start + n)]


def _prep(path, tokenizer, tiny_model, tmp_path, **kw):
    return prepare(cfg(file=str(path), **kw), tokenizer, str(tiny_model), cache_root=tmp_path / "cache")


def test_a_bad_record_anywhere_is_refused_with_file_line_and_field(tmp_path, tokenizer, tiny_model):
    records = _cards(50)
    records[37] = {"instruction": "x", "input": ""}  # a later record with no output
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(UserError, match=rf"{f}:38: field 'output' is missing\. Fix: correct the record, or "
                                        r"data.skip_invalid: true"):
        _prep(f, tokenizer, tiny_model, tmp_path)
    prepared = _prep(f, tokenizer, tiny_model, tmp_path, skip_invalid=True)
    assert sum(prepared.stats.invalid.values()) + sum(prepared.val_stats.invalid.values()) == 1
    assert len(prepared.train) + len(prepared.val) == 49


def test_non_utf8_bytes_are_named_by_line(tmp_path, tokenizer, tiny_model):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps(r).encode() for r in _cards(10)]
    lines[4] = b'{"instruction": "caf\xe9", "output": "o"}'
    f.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(UserError, match=rf"{f}:5: not UTF-8 text \(byte 0xe9 at column 21\)"):
        _prep(f, tokenizer, tiny_model, tmp_path)
    csv = tmp_path / "d.csv"
    csv.write_bytes(b"instruction,input,output\ni,,o\ncaf\xe9,,o\n")
    with pytest.raises(UserError, match=rf"{csv}:3 \(row 2\): not UTF-8 text \(byte 0xe9"):
        _prep(csv, tokenizer, tiny_model, tmp_path)


def test_wrapped_json_compressed_files_csv_parquet_and_text(tmp_path, tokenizer, tiny_model):
    import pandas as pd
    import zstandard

    cards = _cards(40)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": cards}, indent=2))  # pretty-printed, records under "data"
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"train": cards, "test": cards[:3]}))
    gz = tmp_path / "cards.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in cards).encode()))
    zst = tmp_path / "cards.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in cards).encode()))
    pd.DataFrame(cards).to_csv(tmp_path / "cards.csv", index=False)
    pd.DataFrame(cards).to_parquet(tmp_path / "cards.parquet")
    (tmp_path / "lines.txt").write_text("line one\n\nline two\n")
    counts = {}
    for name, kw in (("wrapped.json", {}), ("keyed.json", {"field": "train"}), ("cards.jsonl.gz", {}),
                     ("cards.jsonl.zst", {}), ("cards.csv", {}), ("cards.parquet", {}), ("lines.txt", {})):
        p = _prep(tmp_path / name, tokenizer, tiny_model, tmp_path, validation_fraction=0.0, **kw)
        counts[name] = (p.format, len(p.train))
    assert counts == {"wrapped.json": ("instruction", 40), "keyed.json": ("instruction", 40),
                      "cards.jsonl.gz": ("instruction", 40), "cards.jsonl.zst": ("instruction", 40),
                      "cards.csv": ("instruction", 40), "cards.parquet": ("instruction", 40),
                      "lines.txt": ("text", 2)}
    with pytest.raises(UserError, match=r"keyed.json: a JSON object with 2 list-valued keys \(train, test\).*data.field"):
        _prep(keyed, tokenizer, tiny_model, tmp_path)


def test_malformed_json_names_the_line(tmp_path, tokenizer, tiny_model):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(UserError, match=rf"{f}:2: malformed JSON line"):
        _prep(f, tokenizer, tiny_model, tmp_path)
    arr = tmp_path / "d.json"
    arr.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]')
    with pytest.raises(UserError, match=rf"{arr}:3: malformed JSON"):
        _prep(arr, tokenizer, tiny_model, tmp_path)


def test_empty_missing_and_unreachable_data_are_refused(tmp_path, tokenizer, tiny_model):
    f = tmp_path / "d.jsonl"
    f.write_text("\n")
    with pytest.raises(UserError, match="has no records"):
        _prep(f, tokenizer, tiny_model, tmp_path)
    with pytest.raises(UserError, match="does not exist after waiting 1s"):
        prepare(cfg(file=str(tmp_path / "later.json"), file_wait_seconds=1), tokenizer, str(tiny_model),
                cache_root=tmp_path / "cache")
    with pytest.raises(UserError, match=r"data.dataset 'org/no-such-dataset' \(split 'train'\) cannot be loaded.*Fix"):
        prepare(cfg(dataset="org/no-such-dataset"), tokenizer, str(tiny_model), cache_root=tmp_path / "c")


def test_max_seq_length_too_small_for_the_prompts(tmp_path, tiny_model, tokenizer, flashcards_records):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(flashcards_records[:20]))
    with pytest.raises(UserError, match=r"data.max_seq_length=16 is too small .* set data.max_seq_length to"):
        _prep(f, tokenizer, tiny_model, tmp_path, max_seq_length=16)


def test_a_validation_file_is_used_whole(tmp_path, tokenizer, tiny_model):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _cards(60)))
    val.write_text("".join(json.dumps(r) + "\n" for r in _cards(7, start=100)))
    p = _prep(train, tokenizer, tiny_model, tmp_path, validation_file=str(val))
    assert len(p.train) == 60 and len(p.val) == 7
    held = _prep(train, tokenizer, tiny_model, tmp_path, validation_fraction=0.1)
    assert len(held.train) == 54 and len(held.val) == 6


# ---- the cache: tokenize once, map it ------------------------------------------------------------------

def test_the_cache_is_built_once_and_never_used_partial_or_damaged(tmp_path, tokenizer, tiny_model):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _cards(80)))
    first = _prep(f, tokenizer, tiny_model, tmp_path)
    again = _prep(f, tokenizer, tiny_model, tmp_path)
    assert not first.hit and again.hit and first.cache == again.cache
    assert all(np.array_equal(first.train.example(i)[0], again.train.example(i)[0]) for i in range(len(first.train)))
    assert isinstance(again.train.parts[0]["ids"], np.memmap)  # mapped, not loaded
    other = _prep(f, tokenizer, tiny_model, tmp_path, max_seq_length=128)
    assert other.cache != first.cache  # another setting, another cache
    (first.cache / "COMPLETE").unlink()  # a cache whose build did not finish
    rebuilt = _prep(f, tokenizer, tiny_model, tmp_path)
    assert not rebuilt.hit and (rebuilt.cache / "COMPLETE").exists()
    shard_file = next((rebuilt.cache / "train").glob("*.ids"))
    data = bytearray(shard_file.read_bytes())
    data[8] ^= 0xFF
    shard_file.write_bytes(bytes(data))  # damaged on the volume
    assert not _prep(f, tokenizer, tiny_model, tmp_path).hit
    f.write_text("".join(json.dumps(r) + "\n" for r in _cards(81)))  # new content: new cache
    assert _prep(f, tokenizer, tiny_model, tmp_path).cache != first.cache


def test_parallel_parts_give_the_same_examples_as_one(tmp_path, tokenizer, tiny_model):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _cards(300)))
    one = prepare(cfg(file=str(f)), tokenizer, str(tiny_model), cache_root=tmp_path / "one", parts=1)
    three = prepare(cfg(file=str(f)), tokenizer, str(tiny_model), cache_root=tmp_path / "three", parts=3)
    assert len(three.train.parts) == 3 and len(one.train) == len(three.train)
    for split in ("train", "val"):
        a, b = getattr(one, split), getattr(three, split)
        assert all(np.array_equal(a.example(i)[0], b.example(i)[0]) for i in range(len(a)))


# ---- batching and packing --------------------------------------------------------------------------------

@pytest.fixture
def cards(tmp_path, tokenizer, tiny_model, flashcards_records):
    f = tmp_path / "cards.json"
    f.write_text(json.dumps(flashcards_records[:200]))
    return prepare(cfg(file=str(f), max_seq_length=512, validation_fraction=0.0), tokenizer, str(tiny_model),
                   cache_root=tmp_path / "cache")


def test_packing_keeps_examples_whole_and_labels_right_at_boundaries(cards, tokenizer):
    split = cards.train
    order = BatchOrder(len(split), 4, seed=0)
    assert sorted(int(i) for b in range(len(order)) for i in order[b]) == list(range(len(split)))
    seen = []
    for b in range(len(order)):
        t, real = collate([split.labels(int(i)) for i in order[b]], tokenizer.pad_token_id)
        ids, labels, pos = (t[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
        assert t["input_ids"].shape[0] == 1 and real == len(ids)
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        assert len(starts) - 1 == len(order[b])
        for a, z in zip(starts, starts[1:]):
            seen.append(tuple(ids[a:z]))
            assert labels[a] == IGNORE  # no example learns its first token from its neighbour
            assert pos[a:z] == list(range(z - a))
    assert sorted(seen) == sorted(tuple(split.example(i)[0].tolist()) for i in range(len(split)))
    assert int(order.counts(split.trained).sum()) == int(split.trained.sum())


def test_packed_examples_do_not_attend_to_each_other(tiny_model, tokenizer, cards):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation="sdpa").eval()
    a, b = cards.train.labels(0), cards.train.labels(1)
    t, _ = collate([a, b], tokenizer.pad_token_id)
    split = len(a[0])
    with torch.no_grad():
        packed = model(input_ids=t["input_ids"], position_ids=t["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.from_numpy(b[0])[None], use_cache=False).logits[0]
        leaky = model(input_ids=t["input_ids"], use_cache=False).logits[0]  # no restarts: plain causal
    assert torch.allclose(packed[split:], alone, atol=1e-5)
    assert not torch.allclose(leaky[split:], alone, atol=1e-3)


def test_unpacked_batches_pad_in_an_isolated_segment(cards, tokenizer):
    lengths = cards.train.lengths
    longest, shortest = int(lengths.argmax()), int(lengths.argmin())
    t, real = collate([cards.train.labels(longest), cards.train.labels(shortest)], tokenizer.pad_token_id,
                      packing=False)
    short = int(lengths[shortest])
    assert real == int(lengths[longest]) + short and t["input_ids"].shape == (2, int(lengths[longest]))
    assert (t["labels"][1, short:] == IGNORE).all()
    assert t["position_ids"][1, short].item() == 0


def test_sharding_gives_every_rank_the_same_count():
    parts = [shard(list(range(11)), r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3] and not set(parts[0].tolist()) & set(parts[1].tolist())


def test_a_token_budget_fills_micro_batches_with_whole_examples():
    lengths = np.array([300, 20, 20, 20, 400, 30, 30, 500, 10, 10])
    order = BatchOrder(len(lengths), 4, seed=1, lengths=lengths, token_budget=512)
    batches = [order[b] for b in range(len(order))]
    assert sorted(int(i) for b in batches for i in b) == list(range(len(lengths)))  # every example once
    for b in batches:
        assert len(b) == 1 or lengths[b].sum() <= 512  # whole examples, at most the budget unless alone
    assert int(order.counts(lengths).sum()) == int(lengths.sum())
    assert len(order) < len(BatchOrder(len(lengths), 1, seed=1))  # short ones share micro-batches
