"""SFT data (issue 25): labels are exactly the response tokens (Alpaca and multi-turn chat, hand-checked on small
templates), packed conversations never see each other (perturb one: the others' logits stay bit-equal), the
over-long policy and its counts, packing refused where the attention takes no documents, bad columns and
messages in one line, the quick chat set is deterministic. One process, no launcher: a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seqpar.train.data import batch_at, byte_tokenizer, eval_batch
from seqpar.train.recipe import RecipeError, recipe_from_dict
from seqpar.train.sft import (
    BYTE_CHAT_TEMPLATE,
    IGNORE_INDEX,
    LLAMA2_SYSTEM,
    Counts,
    fit,
    pack,
    render,
    sft_dataset,
    stdlib_qa,
)
from tests.test_recipe import ROOT

TOK = byte_tokenizer()
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, é"}]


def targets(ids: list[int], labels: list[int]) -> list[str]:
    """The labelled runs of a conversation, decoded (one string per response)."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t  # labels are unshifted input ids
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return [TOK.decode(r) for r in [*runs, cur] if r]


def recipe(**data) -> object:
    base = {"model": {"from_config": {"model_type": "llama", "vocab_size": 260, "hidden_size": 32,
                                      "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                      "num_key_value_heads": 1, "max_position_embeddings": 128}},
            "attention": {"name": "ring", "sp_size": 1}, "trainer": {"micro_batch": 2}}
    return recipe_from_dict({**base, "data": {"source": "sft", "seq_len": 64, **data}})


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_alpaca_labels_are_the_response_and_eos_with_longlora_and_alpaca_templates():
    no_input = [{"role": "user", "content": "Say hi", "input": ""}, {"role": "assistant", "content": "hi"}]
    ids, labels = render(TOK, no_input, "longlora-llama2")
    assert TOK.decode(ids) == "<s>[INST]Say hi[/INST]hi</s>"  # LongLoRA's prompt_llama2 + output + eos
    assert targets(ids, labels) == ["hi</s>"]
    assert labels[-3:] == ids[-3:] and labels[-4] == IGNORE_INDEX  # exactly "h", "i", "</s>"
    with_input = [{"role": "user", "content": "Sum", "input": "1 2"}, {"role": "assistant", "content": "3"}]
    ids, labels = render(TOK, with_input, "longlora-llama2")
    assert TOK.decode(ids) == f"<s>[INST] <<SYS>>\n{LLAMA2_SYSTEM}<</SYS>> \n\n Sum \n1 2 [/INST]3</s>"
    assert targets(ids, labels) == ["3</s>"]
    ids, labels = render(TOK, with_input, "alpaca")
    assert TOK.decode(ids).endswith("### Instruction:\nSum\n\n### Input:\n1 2\n\n### Response:3</s>")
    assert targets(ids, labels) == ["3</s>"]


def test_chat_labels_are_every_assistant_turn_with_generation_markers_and_prefix_rendering():
    ids, labels = render(TOK, CHAT, "tokenizer")  # the byte template's {% generation %} markers
    assert TOK.decode(ids) == "<s>system: Be brief.\nuser: 2+2?\nassistant: 4</s>user: And 3+3?\nassistant: 6, é</s>"
    assert targets(ids, labels) == ["4</s>", "6, é</s>"]
    responses = TOK("4</s>6, é</s>", add_special_tokens=False)["input_ids"]
    assert sum(lab != IGNORE_INDEX for lab in labels) == len(responses)
    plain = byte_tokenizer()  # the same template without markers: found by rendering prefix by prefix
    plain.chat_template = BYTE_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert render(plain, CHAT, "tokenizer") == (ids, labels)
    chatml = byte_tokenizer()  # a ChatML-style template: the turn's end marker and newline are targets too
    chatml.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert targets(*render(chatml, CHAT, "tokenizer")) == ["4<|im_end|>\n", "6, é<|im_end|>\n"]
    ids, labels = render(TOK, CHAT, "longlora-llama2")  # a named template: the Llama-2 chat turns
    assert TOK.decode(ids) == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>> \n\n 2+2? [/INST]4</s><s>[INST]And 3+3?[/INST]"
                               "6, é</s>")
    assert targets(ids, labels) == ["4</s>", "6, é</s>"]


def test_packing_keeps_conversations_apart_bit_for_bit():
    """The trainer's path (local_batch -> shard_batch -> cu_seqlens) into a tiny Llama patched with ring attention:
    perturbing the middle conversation changes none of the other conversations' logits; without the boundaries
    (the same tokens as one document) it would."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpar.models import patch_model
    from seqpar.train.trainer import local_batch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    patch_model(model.eval(), "ring", None)
    r = recipe()
    convs = [render(TOK, m, "tokenizer") for m in stdlib_qa(3, seed=1)]
    (sample,) = pack(convs, 512, TOK.pad_token_id, True)
    a, b = len(convs[0][0]), len(convs[0][0]) + len(convs[1][0])
    assert sample["doc_lens"] == [len(c[0]) for c in convs] + [512 - sum(len(c[0]) for c in convs)]
    other = sample["input_ids"].clone()
    other[a + 1:b] = torch.randint(3, 259, (b - a - 1,), generator=torch.Generator().manual_seed(0))

    def logits(ids: torch.Tensor, docs: list[int]) -> torch.Tensor:
        batch = local_batch({"input_ids": ids[None], "labels": sample["labels"][None], "doc_lens": [docs]}, r, None,
                            torch.device("cpu"), "zigzag")
        batch.pop("labels")
        with torch.no_grad():
            return model(**batch, use_cache=False).logits[0]

    before, after = logits(sample["input_ids"], sample["doc_lens"]), logits(other, sample["doc_lens"])
    assert not torch.equal(before[a + 1:b], after[a + 1:b])  # the perturbed conversation changed
    assert torch.equal(before[:a], after[:a]) and torch.equal(before[b:], after[b:])  # no other logit moved
    joined = logits(sample["input_ids"], [512]), logits(other, [512])  # one document: the third sees the second
    assert not torch.equal(joined[0][b:], joined[1][b:])


def test_pack_pads_with_a_document_and_unpacked_rows_are_right_padded():
    convs = [([1, 5, 6, 2], [-100, -100, 6, 2]), ([1, 7, 2], [-100, 7, 2]), ([1, 8, 9, 10, 2], [-100] * 3 + [10, 2])]
    packed = pack(convs, 8, 0, True)
    assert [s["doc_lens"] for s in packed] == [[4, 3, 1], [5, 3]]
    assert packed[0]["input_ids"].tolist() == [1, 5, 6, 2, 1, 7, 2, 0]
    assert packed[0]["labels"].tolist() == [-100, -100, 6, 2, -100, 7, 2, -100]
    single = pack(convs, 8, 0, False)
    assert [s["doc_lens"] for s in single] == [[8]] * 3  # one conversation per row: no documents to pass
    assert single[1]["input_ids"].tolist() == [1, 7, 2, 0, 0, 0, 0, 0] and single[1]["labels"][3:].eq(-100).all()
    samples = [{**s, "input_ids": s["input_ids"]} for s in single]
    r = recipe()
    for batch in (batch_at(samples, r, 0, 0, 0, 1), eval_batch(samples, r, 0, 0, 1)):
        assert batch["labels"].shape == batch["input_ids"].shape == (2, 8)


def test_overlong_policy_counts_and_never_cuts_a_response(tmp_path, capsys):
    ids, labels = [1, *range(10, 30), 50, 51, 2], [-100] * 21 + [50, 51, 2]  # 21 prompt tokens, response of 3
    counts = Counts()
    assert fit(ids, labels, 24, "truncate_prompt", counts) == (ids, labels)  # fits: untouched
    cut = fit(ids, labels, 10, "truncate_prompt", counts)
    assert cut == ([1, *range(24, 30), 50, 51, 2], [-100] * 7 + [50, 51, 2])  # oldest prompt tokens gone, <s> kept
    assert fit(ids, labels, 3, "truncate_prompt", counts) is None  # the response alone needs more: dropped
    assert fit(ids, labels, 10, "drop", counts) is None
    assert fit([1, 2], [-100, -100], 10, "drop", counts) is None  # nothing to learn
    assert (counts.kept, counts.truncated, counts.dropped, counts.empty) == (2, 1, 2, 1)
    rows = [{"instruction": "q" * n, "output": "a" * k} for n, k in ((5, 1), (100, 1), (5, 70))]  # 64 tokens max
    files = [write_jsonl(tmp_path / "rows.jsonl", rows)]
    samples = sft_dataset(TOK, recipe(files=files, sft={"template": "longlora-llama2"}).data, 0)
    assert capsys.readouterr().out.strip() == ("seqpar: sft: kept 2 conversations, truncated 1 from the prompt side, "
                                               "dropped 1 longer than data.seq_len=64 (truncate_prompt) and 0 without "
                                               "an assistant response")
    assert [targets(s["input_ids"].tolist(), s["labels"].tolist()) for s in samples] == [["a</s>"], ["a</s>"]]
    assert samples[1]["doc_lens"] == [64]  # the truncated one fills its sequence exactly
    sft_dataset(TOK, recipe(files=files, pack=False, sft={"overlong": "drop"}).data, 0)
    assert "kept 1 conversations, truncated 0 from the prompt side, dropped 2" in capsys.readouterr().out


def test_bad_columns_and_messages_are_one_line(tmp_path):
    files = [write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])]
    with pytest.raises(RecipeError) as err:
        sft_dataset(TOK, recipe(files=files).data, 0)
    msg = str(err.value)
    assert "data.sft.instruction_field='instruction' is not a column" in msg and "['answer', 'question']" in msg
    assert "\n" not in msg
    files = [write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])]
    with pytest.raises(RecipeError, match=r"row 0 of data.files=.*needs role in \['system', 'user', 'assistant'\]"):
        sft_dataset(TOK, recipe(files=files).data, 0)
    strict = byte_tokenizer()
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(RecipeError, match=r"row 0 of .*chat template refused it \(Conversation roles must alternate"):
        render(strict, CHAT, "tokenizer")
    with pytest.raises(RecipeError, match=r"data\.sft\.shap: unknown key \(did you mean data\.sft\.shape\?"):
        recipe(sft={"shap": "alpaca"})


def test_recipe_checks_name_the_key():
    from seqpar.train.validate import validate

    with pytest.raises(RecipeError, match=r"data\.files=\[\]: data\.source=sft needs .* data\.sft\.make=stdlib-qa"):
        validate(recipe())
    with pytest.raises(RecipeError, match=r"data\.sft\.make=stdlib-qa and data\.files=\['a.jsonl'\]: choose one"):
        validate(recipe(files=["a.jsonl"], sft={"make": "stdlib-qa"}))
    with pytest.raises(RecipeError, match=r"data\.format=text with data\.source=sft"):
        validate(recipe(files=["a.txt"], format="text"))
    validate(recipe(sft={"make": "stdlib-qa"}))


def test_packing_with_s2_is_refused_in_one_line(capsys):
    from seqpar.cli import main

    assert main(["train", str(ROOT / "recipes" / "sft-cpu.yaml"), "attention.name=s2", "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqpar: error: ")
    assert "data.pack=true with attention.name=s2: s2 takes no document boundaries" in lines[0]
    assert "set data.pack=false" in lines[0]
    assert main(["train", str(ROOT / "recipes" / "sft-cpu.yaml"), "attention.name=s2", "data.pack=false",
                 "--dry-run"]) == 0  # one conversation per sequence, right-padded: LongLoRA's SFT


def test_quick_chat_set_is_deterministic_and_answers_from_the_quoted_line():
    first, again, other = stdlib_qa(50, 3), stdlib_qa(50, 3), stdlib_qa(50, 4)
    assert first == again and first != other
    assert any(len(c) == 4 for c in first) and any(len(c) == 2 for c in first)  # one or two turns
    for conv in first:
        quoted = conv[0]["content"].split("\n")[1]  # "def name(signature):"
        for m in conv[1::2]:
            assert m["role"] == "assistant" and m["content"]
            assert all(p.lstrip("*") in quoted for p in m["content"].split(", ")) or m["content"] in conv[0]["content"]


def test_byte_tokenizer_saves_its_chat_template(tmp_path):
    from transformers import AutoTokenizer

    TOK.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.chat_template == BYTE_CHAT_TEMPLATE
    prompt = back.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>user: 2+2?\nassistant: "
