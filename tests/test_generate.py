"""`seqpar generate`: H2O with a budget that covers everything decodes what the full cache decodes, a small budget
bounds the cache at every step, the CLI streams and reports tokens/s + the cache size, prompts come from the flag,
a file or stdin through the chat template (or raw), and every bad input is one line naming the fix."""

from __future__ import annotations

import io
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seqpar.cli import main
from seqpar.inference import H2O_ATTENTION, H2OCache, kv_footprint, new_cache
from seqpar.inference.generate import generate_text, render_prompt
from tests.test_eval import byte_level_tokenizer, save_tiny_llama

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPT = "Which module parses command-line options? Answer in one word."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (GQA 4:2, 320 positions) with the byte tokenizer and a small chat template."""
    tok = byte_level_tokenizer()
    tok.chat_template = TEMPLATE
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_chat"), tok)


def _load(path, dtype=torch.float64):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("seqpar generate"), err
    assert "Traceback" not in err
    return lines[0]


def test_h2o_with_a_covering_budget_equals_the_full_cache(model_dir, capsys):
    model, tok = _load(model_dir)
    ids, used_chat = render_prompt(tok, PROMPT, chat=True, system=None)
    assert used_chat and len(ids) == len(f"<s>user: {PROMPT}\nassistant:") - 2  # "<s>" is one token
    full = generate_text(model, tok, ids, max_new_tokens=30)
    assert model.config._attn_implementation != H2O_ATTENTION  # the full cache keeps the model's attention
    h2o = generate_text(model, tok, ids, max_new_tokens=30, budget=(64, 64))  # 128 >= 79 prompt tokens + 30
    assert model.config._attn_implementation == H2O_ATTENTION
    assert len(full["tokens"]) == 30 and h2o["tokens"] == full["tokens"] and h2o["text"] == full["text"]
    assert h2o["cache"]["tokens"] == full["cache"]["tokens"] == len(ids) + 29  # the last token is never fed
    assert h2o["cache"]["bytes"] == full["cache"]["bytes"] and h2o["cache"]["extra_bytes"] > 0
    # The same through the command line (float32 load): the answer on stdout is the same text for both caches.
    outs = []
    for flags in ([], ["--cache", "h2o", "--heavy", "64", "--recent", "64"]):
        assert main(["generate", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "30", *flags]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == full["text"] + "\n"


def test_small_budget_bounds_the_cache_at_every_step(model_dir):
    model, tok = _load(model_dir)
    heavy, recent = 5, 3
    sizes = []
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: sizes.append(kv_footprint(kwargs.get("cache") or kwargs["past_key_values"])),
        with_kwargs=True)
    ids, _ = render_prompt(tok, PROMPT * 2, chat=True, system=None)  # longer than the budget: evicts at prefill
    res = generate_text(model, tok, ids, max_new_tokens=40, budget=(heavy, recent))
    hook.remove()
    assert len(sizes) == len(res["tokens"]) == 40  # one forward per token (the last one is never fed)
    assert all(s["tokens"] == heavy + recent and s["layers"] == 2 for s in sizes), sizes
    # keys + values: 2 layers x 2 kv heads x 8 tokens x head dim 8 x float64, whatever the length generated
    assert {s["bytes"] for s in sizes} == {2 * 2 * 2 * (heavy + recent) * 8 * 8} == {res["cache"]["bytes"]}


def test_cli_streams_the_answer_and_reports_speed_and_cache(model_dir, capsys):
    model, tok = _load(model_dir, torch.float32)
    chunks: list[str] = []
    stream = type("Chunks", (), {"write": lambda self, s: chunks.append(s), "flush": lambda self: None})()
    ids, _ = render_prompt(tok, PROMPT, chat=True, system=None)
    res = generate_text(model, tok, ids, max_new_tokens=20, stream=stream)
    assert "".join(chunks) == res["text"] + "\n"  # TextStreamer's pieces add up to the answer
    assert 0 < res["first_token_s"] < res["seconds"]  # the first token was out before generation ended
    assert main(["generate", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    assert out == res["text"] + "\n"
    line = one_line(err)
    assert re.fullmatch(r"seqpar generate: 20 tokens in [\d.]+ s = [\d.]+ tokens/s \(first token after \d+ ms\); "
                        r"KV cache full: 98 tokens x 2 layers = 24\.5 KiB", line), line  # 79 + 19 tokens, fp32
    assert main(["generate", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "20", "--cache", "h2o",
                 "--heavy", "6", "--recent", "4"]) == 0
    line = one_line(capsys.readouterr().err)
    assert re.search(r"KV cache h2o \(heavy 6 \+ recent 4\): 10 tokens x 2 layers = 2\.5 KiB \+ \d+ B of H2O", line)


def test_prompt_sources_templates_and_sampling(model_dir, tmp_path, monkeypatch, capsys):
    model, tok = _load(model_dir, torch.float32)
    raw, used_chat = render_prompt(tok, "hi", chat=False, system=None)
    assert raw == [1, *tok("hi", add_special_tokens=False)["input_ids"]] and not used_chat
    with_system, _ = render_prompt(tok, "hi", chat=True, system="Be brief.")
    assert tok.decode(with_system) == "<s>system: Be brief.\n<s>user: hi\nassistant:"
    tok.chat_template = None  # no template: the text as is after BOS
    assert render_prompt(tok, "hi", chat=True, system=None) == (raw, False)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT + "\n")
    outs = []
    for flags in (["--prompt", PROMPT], ["--prompt-file", str(prompt_file)], ["--prompt", "-"]):
        monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))
        assert main(["generate", str(model_dir), *flags, "--max-new-tokens", "8"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2]
    sampled = [generate_text(model, tok, raw, max_new_tokens=12, sampling={"temperature": 1.5, "top_p": 1.0,
                                                                            "seed": s})["tokens"] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded; a high temperature on a random model differs by seed


def test_every_bad_input_is_one_line(model_dir, tmp_path, monkeypatch, capsys):
    empty, no_config = tmp_path / "empty.txt", tmp_path / "folder"
    empty.write_text(" \n")
    no_config.mkdir()
    m = str(model_dir)
    cases = [
        ([str(tmp_path / "nope"), "--prompt", "hi"], r"MODEL '.*nope' is not a local folder"),
        ([str(no_config), "--prompt", "hi"], r"holds no config.json"),
        ([m], r"no prompt: pass --prompt TEXT, --prompt-file FILE, or --prompt - to read stdin"),
        ([m, "--prompt", "hi", "--prompt-file", str(empty)], r"pass the prompt once"),
        ([m, "--prompt", "  "], r"the prompt \(--prompt\) is empty"),
        ([m, "--prompt-file", str(empty)], r"--prompt-file '.*empty.txt' is empty"),
        ([m, "--prompt-file", str(tmp_path / "missing.txt")], r"--prompt-file '.*missing.txt': no such file"),
        ([m, "--prompt", "-"], r"the prompt \(stdin\) is empty"),
        ([m, "--prompt", "hi", "--cache", "paged"], r"--cache 'paged': use --cache full .* or --cache h2o"),
        ([m, "--prompt", "hi", "--heavy", "4"], r"--heavy 4 sets the H2O budget: add --cache h2o, or drop --heavy"),
        ([m, "--prompt", "hi", "--cache", "h2o", "--recent", "-2"], r"--recent -2: use a number of tokens >= 0"),
        ([m, "--prompt", "hi", "--cache", "h2o", "--heavy", "0", "--recent", "0"], r"keeps no token.*--recent 1"),
        ([m, "--prompt", "hi", "--max-new-tokens", "0"], r"--max-new-tokens 0: use a positive number"),
        ([m, "--prompt", "hi", "--max-new-tokens", "many"], r"argument --max-new-tokens: invalid int value"),
        ([m, "--prompt", "x" * 400], r"the prompt is \d+ tokens and the model's context .* is 320: shorten"),
        ([m, "--prompt", "x" * 250, "--max-new-tokens", "100"],
         r"--max-new-tokens 100: the prompt \(\d+ tokens\) \+ 100 exceeds .* 320 positions; use --max-new-tokens <="),
        ([m, "--prompt", "hi", "--temperature", "0.5"], r"--temperature applies to sampling: add --sample"),
        ([m, "--prompt", "hi", "--sample", "--temperature", "0"], r"--temperature 0.0: use a temperature > 0"),
        ([m, "--prompt", "hi", "--sample", "--top-p", "1.5"], r"--top-p 1.5: use 0 < --top-p <= 1"),
        ([m, "--prompt", "hi", "--no-chat", "--system", "Be brief."], r"--system needs the chat template"),
        ([], r"the following arguments are required: model"),
    ]
    for argv, pattern in cases:
        monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
        try:
            rc = main(["generate", *argv])
        except SystemExit as exc:  # argparse's own errors, made one line
            rc = exc.code
        out, err = capsys.readouterr()
        assert rc == 2 and out == "", (argv, out)
        assert re.search(pattern, one_line(err)), (argv, err)


def test_new_cache_and_footprint(model_dir):
    model, _ = _load(model_dir, torch.float32)
    assert new_cache(model, None) is None  # the full cache: generate() builds the model's own
    assert isinstance(new_cache(model, (2, 3)), H2OCache) and model.config._attn_implementation == H2O_ATTENTION
    assert kv_footprint(None) == {"tokens": 0, "layers": 0, "bytes": 0, "extra_bytes": 0}
