"""`seqpar eval`: sliding-window perplexity vs an independent HF-style loop, passkey prompts and exact-match
scoring, LoRA adapter folders, and the error messages for bad inputs."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

import seqpar.eval.passkey as passkey_mod
from seqpar.cli import main
from seqpar.eval import EvalError
from seqpar.eval.cli import load_model
from seqpar.eval.passkey import is_correct, passkey_accuracy, passkey_prompt
from seqpar.eval.perplexity import perplexity, read_text

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. Déjà vu: naïve café. ") * 3


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + <pad>, <s>, </s>, built on the spot (there is no hub here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_llama(path, tokenizer: PreTrainedTokenizerFast):
    """A tiny random Llama (GQA 4:2, 320 positions, seeded) and ``tokenizer`` saved in ``path``; returns it."""
    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=320,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), byte_level_tokenizer())


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def hf_doc_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The loop of transformers' "Perplexity of fixed-length models" guide; the loss is taken in float64 with
    cross_entropy (the model's own loss upcasts to float32 only)."""
    seq_len, nll_sum, n_tokens, prev_end = ids.shape[1], 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=-100)
        n_valid = (target[:, 1:] != -100).sum().item()  # labels shifted by one: the loss is a mean over these
        nll_sum += loss.item() * n_valid
        n_tokens += n_valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def test_perplexity_matches_independent_loop(model_dir, text_file, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    ids = torch.tensor([[tok.bos_token_id, *tok(TEXT, add_special_tokens=False)["input_ids"]]])
    assert ids.shape[1] > 300  # UTF-8 bytes: the accents are two tokens each
    for context, stride in ((32, 32), (64, 20), (48, 47)):
        got = perplexity(model, tok, read_text(text_file), context=context, stride=stride)
        want = hf_doc_perplexity(model, ids, context, stride)
        n_windows = math.ceil((ids.shape[1] - context) / stride) + 1
        assert got["tokens"] == ids.shape[1] - 1 - (n_windows - 1) * (stride == context), (got, n_windows)
        assert abs(got["ppl"] - want) / want < 1e-10, (context, stride, got, want)
    # The CLI end to end (float32 load), JSON and table agree with the direct computation.
    out = tmp_path / "res.json"
    assert main(["eval", str(model_dir), "--ppl", str(text_file), "--context", "32,64", "--stride", "16",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for row in res["perplexity"]:
        want = hf_doc_perplexity(model, ids, row["context"], 16)
        assert abs(row["ppl"] - want) / want < 1e-5
    assert "perplexity on" in capsys.readouterr().out


def test_lora_adapter_folder(model_dir, text_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([[tok.bos_token_id, *tok(TEXT, add_special_tokens=False)["input_ids"]]])
    plain = hf_doc_perplexity(base, ids, 64, 64)  # before get_peft_model wraps `base` in place
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")  # records base_model_name_or_path = model_dir
    model, tok, kind = load_model(str(tmp_path / "adapter"), dtype="float32", device="cpu")
    assert kind == "lora"
    want = hf_doc_perplexity(lora.eval(), ids, 64, 64)
    got = perplexity(model, tok, TEXT, context=64)["ppl"]
    assert abs(got - want) / want < 1e-5 and abs(plain - want) / want > 1e-3  # the adapter changes the model
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/not-here"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvalError, match="base_model_name_or_path='org/not-here'"):
        load_model(str(tmp_path / "adapter"))


def test_passkey_prompt_and_tiny_model(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    for depth in (0.0, 0.3, 0.8, 1.0):
        trial = passkey_prompt(tok, 300, depth, random.Random(5))
        assert trial["prompt"].numel() + len(trial["answer"]) < 300
        text = tok.decode(trial["prompt"], skip_special_tokens=True)
        key = trial["key"]
        assert re.fullmatch(r"\d{5}", key) and tok.decode(trial["answer"]).strip() == key
        assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
        assert text.rstrip().endswith("What is the pass key? The pass key is")
        info = f"The pass key is {key}. Remember it. {key} is the pass key."
        assert text.count(info) == 1
        before, after = text.split(info)
        intro = "I will quiz you about the important information there. "
        filler_before = len(before) - before.index(intro) - len(intro)
        filler_after = len(after) - len(" What is the pass key? The pass key is ")
        # byte tokens = characters here, so the depth is the share of filler before the key (to one token)
        assert abs(filler_before / (filler_before + filler_after) - depth) < 2 / (filler_before + filler_after)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    res = passkey_accuracy(model, tok, length=200, trials=2, seed=1)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["trials"] == 2 and len(res["results"]) == 2
    assert [r["depth"] for r in res["results"]] == [0.25, 0.75]


def test_passkey_exact_match_scoring(model_dir, monkeypatch, tmp_path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def oracle(shift):
        def generate(model, prompt, n_new, cache=None):
            key = re.search(r"The pass key is (\d+)\.", tok.decode(prompt)).group(1)
            ids = tok(str(int(key) + shift), add_special_tokens=False)["input_ids"]
            assert len(ids) == n_new
            return ids, None  # no cache: the row reports 0 KV tokens

        return generate

    monkeypatch.setattr(passkey_mod, "greedy_generate", oracle(0))
    assert passkey_accuracy(model, tok, length=200, trials=3)["accuracy"] == 1.0
    out = tmp_path / "pk.json"
    assert main(["eval", str(model_dir), "--passkey", "--lengths", "200,260", "--trials", "2", "--json", str(out)]) == 0
    assert [r["accuracy"] for r in json.loads(out.read_text())["passkey"]] == [1.0, 1.0]
    monkeypatch.setattr(passkey_mod, "greedy_generate", oracle(1))
    assert passkey_accuracy(model, tok, length=200, trials=3)["accuracy"] == 0.0
    assert is_correct(" 12345", "12345") and is_correct("12345.", "12345")
    assert not is_correct("1234", "12345") and not is_correct("123456", "12345") and not is_correct("none", "12345")


def test_errors(model_dir, text_file, tmp_path, capsys):
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("  \n")
    latin.write_bytes("café".encode("latin-1"))
    cases = [
        (["--ppl", str(tmp_path / "missing.txt")], r"--ppl '.*missing.txt': no such file"),
        (["--ppl", str(empty)], r"--ppl '.*empty.txt' is empty"),
        (["--ppl", str(latin)], r"--ppl '.*latin1.txt' is not UTF-8 text .*iconv"),
        (["--ppl", str(text_file), "--context", "64,1024"],
         r"--context 1024 exceeds the model's max_position_embeddings=320; use --context <= 320"),
        (["--passkey", "--lengths", "4096"], r"--lengths 4096 exceeds the model's max_position_embeddings=320"),
        (["--passkey", "--lengths", "40"], r"--lengths 40 is too short for a passkey prompt"),
        (["--ppl", str(text_file), "--context", "32", "--stride", "33"], r"--stride 33 with --context 32"),
        ([], r"nothing to evaluate"),
        (["--passkey", "--heavy", "4"], r"--heavy 4 sets the H2O budget: add --cache h2o"),
        (["--passkey", "--cache", "h2o", "--recent", "-1"], r"--recent -1: use a number of tokens >= 0"),
        (["--passkey", "--cache", "paged"], r"--cache 'paged': use --cache full"),
    ]
    for extra, pattern in cases:
        assert main(["eval", str(model_dir), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert re.search(pattern, err), (extra, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("seqpar eval: error:"), err
    assert main(["eval", str(tmp_path / "nope"), "--passkey"]) == 2
    assert "is not a local folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(model_dir), "--context", "12,x"])


def test_h2o_cache_equals_full_with_a_covering_budget_and_stays_within_a_small_one(model_dir, tmp_path):
    """`seqpar eval --cache h2o`: perplexity decoded token by token through the cache and passkey generation.
    A budget >= the length gives the full cache's numbers (float64: to rounding); a small one bounds the cache."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    short = tmp_path / "short.txt"  # 2 windows of 64 tokens and a bit: token-by-token decoding stays cheap
    short.write_text(TEXT[:140], encoding="utf-8")
    full_ppl = perplexity(model, tok, TEXT[:140], context=64)
    full_pk = passkey_accuracy(model, tok, length=200, trials=1)
    h2o_ppl = perplexity(model, tok, TEXT[:140], context=64, budget=(32, 32))  # 64 >= every window
    h2o_pk = passkey_accuracy(model, tok, length=200, trials=1, budget=(100, 100))  # 200 >= prompt + answer
    assert abs(h2o_ppl["nll"] - full_ppl["nll"]) < 1e-12 and h2o_ppl["tokens"] == full_ppl["tokens"]
    assert [r["output"] for r in h2o_pk["results"]] == [r["output"] for r in full_pk["results"]]
    assert (h2o_ppl["kv_tokens"], h2o_ppl["kv_bytes"]) == (full_ppl["kv_tokens"], full_ppl["kv_bytes"]) == (64, 32768)
    assert h2o_pk["kv_tokens"] == full_pk["kv_tokens"] == 198  # prompt + answer (< 200) - 1: the last is never fed
    out = tmp_path / "h2o.json"  # the command line, float32, a budget of 16 tokens per layer and kv head
    assert main(["eval", str(model_dir), "--ppl", str(short), "--context", "64", "--passkey", "--lengths", "200",
                 "--trials", "1", "--cache", "h2o", "--heavy", "6", "--recent", "10", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["cache"] == {"kind": "h2o", "heavy": 6, "recent": 10}
    for row in (*res["perplexity"], *res["passkey"]):  # 16 tokens x 2 layers x K,V x 2 kv heads x 8 dims x fp32
        assert (row["kv_tokens"], row["kv_bytes"]) == (16, 16 * 2 * 2 * 2 * 8 * 4), row
    assert res["perplexity"][0]["tokens"] == full_ppl["tokens"]
    assert abs(res["perplexity"][0]["nll"] - full_ppl["nll"]) > 1e-6  # eviction changed what the model saw
