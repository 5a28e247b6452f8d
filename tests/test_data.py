"""Data: the built-in task, validation errors that name file/row/field, real GSM8K/MATH rows."""
import json
import re
from pathlib import Path

import pytest

from common import data
from common.model import build_tokenizer
from common.rewards import score

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _value(expr):
    """Independent evaluation of a task expression (no eval): shunting-yard over + - * ( )."""
    out, ops = [], []
    prec = {"+": 1, "-": 1, "*": 2}

    def apply():
        b, a, op = out.pop(), out.pop(), ops.pop()
        out.append(a + b if op == "+" else a - b if op == "-" else a * b)
    for tok in re.findall(r"\d+|[-+*()]", expr):
        if tok.isdigit():
            out.append(int(tok))
        elif tok == "(":
            ops.append(tok)
        elif tok == ")":
            while ops[-1] != "(":
                apply()
            ops.pop()
        else:
            while ops and ops[-1] != "(" and prec[ops[-1]] >= prec[tok]:
                apply()
            ops.append(tok)
    while ops:
        apply()
    return out[0]


def test_builtin_answers_and_clean_demos_are_correct():
    rows = data.builtin_task(500, seed=3, difficulty=3)
    for r in rows:
        assert int(r["answer"]) == _value(r["question"][:-1])
        assert score(r["response"], r["answer"]) == 1.0, r
        # every written step is true arithmetic
        for a, op, b, c in re.findall(r"(-?\d+)([-+*])(-?\d+)=(-?\d+)", r["response"]):
            a, b, c = int(a), int(b), int(c)
            assert c == (a + b if op == "+" else a - b if op == "-" else a * b)


def test_flawed_fraction_and_heldout_split():
    train, held = data.builtin_split(4000, 200, difficulty=2, flawed_frac=0.25, seed=0)
    wrong = sum(score(r["response"], r["answer"]) == 0.0 for r in train) / len(train)
    assert 0.2 < wrong < 0.3
    assert not {r["question"] for r in held} & {r["question"] for r in train}
    train2, held2 = data.builtin_split(100, 200, difficulty=2, seed=7)
    assert held2 == held  # the held-out split is fixed, whatever the seed
    harder = data.builtin_task(50, seed=0, difficulty=4)
    assert all(r["question"].count("+") + r["question"].count("-") + r["question"].count("*") == 4 for r in harder)


def test_several_solution_paths():
    paths = data.solution_paths("7+5*3+2*4=")
    assert len(paths) >= 4
    assert all(score(p, "30") == 1.0 for p in paths)


def test_wording_variety_is_answer_neutral():
    """--wording-variety changes only the phrasing: same questions and answers, every clean demonstration still
    scores 1 with true arithmetic steps, several wordings occur; off, the one fixed format."""
    plain = data.builtin_task(400, seed=5, difficulty=3)
    varied = data.builtin_task(400, seed=5, difficulty=3, varied=True)
    assert [(r["question"], r["answer"]) for r in plain] == [(r["question"], r["answer"]) for r in varied]
    step = r"(-?\d+) ?([-+*]) ?(-?\d+) ?= ?(-?\d+)"
    for r in varied:
        assert score(r["response"], r["answer"]) == 1.0, r
        found = re.findall(step, r["response"])
        assert len(found) == 3, r  # one written step per operation, whatever the wording
        for a, op, b, c in found:
            a, b, c = int(a), int(b), int(c)
            assert c == (a + b if op == "+" else a - b if op == "-" else a * b)
    wordings = {re.sub(r"\d+", "N", re.sub(step, "S", r["response"])) for r in varied}
    assert len(wordings) >= 12  # 4 separators x 3 closings (spacing is inside S)
    assert {r["response"].count(" ") for r in varied} != {1}
    fixed = r"-?\d+[-+*]-?\d+=-?\d+(, -?\d+[-+*]-?\d+=-?\d+)*\. \\boxed\{-?\d+\}"
    assert all(re.fullmatch(fixed, r["response"]) for r in plain)


def _write(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_bad_rows_name_file_row_field(tmp_path):
    tok = build_tokenizer()
    good = {"question": "1+1=", "answer": "2", "response": "1+1=2. \\boxed{2}"}
    cases = [({"answer": "2"}, "missing field 'question'"),
             ({"question": "1+1=", "answer": ""}, "field 'answer' is empty"),
             ({"question": ["x"], "answer": "2"}, "field 'question' is empty or not text"),
             ({"question": "x" * 600, "answer": "2"}, "601 prompt tokens, leaving no room for a response in the "
                                                      "context limit 512 (--max-len 512)")]
    for bad, msg in cases:
        p = _write(tmp_path, [good, good, bad, good])
        with pytest.raises(ValueError) as e:
            data.load_rows(str(p), tokenizer=tok, max_len=512)
        assert str(p) in str(e.value) and "row 3" in str(e.value) and msg in str(e.value), str(e.value)
        rows, skipped = data.load_rows(str(p), tokenizer=tok, max_len=512, skip_bad_rows=True)
        assert len(rows) == 3 and skipped == 1
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match="row 2: not valid JSON"):
        data.load_rows(str(p))
    with pytest.raises(ValueError, match="missing field 'response'"):
        data.load_rows(str(_write(tmp_path, [{"question": "q", "answer": "1"}])), response_key="response")


def test_length_limit_rl_prompt_and_sft_row(tmp_path):
    """One token per character (built-in tokenizer): an RL prompt is question + newline and must leave one
    token for the response; an SFT row is prompt + response + EOS and must fit."""
    tok, L = build_tokenizer(), 40
    rl = [{"question": "q" * (L - 2), "answer": "1"}, {"question": "q" * (L - 1), "answer": "1"}]  # L-1, L tokens
    rows, skipped = data.load_rows(str(_write(tmp_path, rl)), tokenizer=tok, max_len=L, skip_bad_rows=True)
    assert [len(r["question"]) for r in rows] == [L - 2] and skipped == 1
    with pytest.raises(ValueError, match=f"row 2: field 'question' is {L} prompt tokens"):
        data.load_rows(str(_write(tmp_path, rl)), tokenizer=tok, max_len=L)
    q = "q" * 9  # 10 prompt tokens
    sft = [{"question": q, "answer": "1", "response": "r" * (L - 11)}, {"question": q, "answer": "1", "response": "r" * (L - 10)}]
    with pytest.raises(ValueError, match=f"row 2: field 'question' \\+ 'response' \\+ EOS is {L + 1} tokens"):
        data.load_rows(str(_write(tmp_path, sft)), response_key="response", tokenizer=tok, max_len=L)
    rows, skipped = data.load_rows(str(_write(tmp_path, sft)), response_key="response", tokenizer=tok, max_len=L,
                                   skip_bad_rows=True)
    assert len(rows) == 1 and skipped == 1


def test_rows_checked_against_the_engine_limit(tmp_path):
    """--max-len above the model's positions: rows are checked against what the engine accepts (the
    model's max_position_embeddings, read here from its config.json), and the message names both limits."""
    from types import SimpleNamespace

    from common.model import build_tiny
    from common.rollout import Engine, context_limit
    model = build_tiny(tmp_path / "tiny", max_len=64)
    positions = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    assert positions == 64
    assert context_limit(model, 4096) == positions and context_limit(model, 32) == 32
    assert Engine(model, "hf", max_model_len=4096).max_model_len == positions  # the same limit as the engine's
    rows = [{"question": "q" * 50, "answer": "1"}, {"question": "q" * 70, "answer": "1"}]
    args = SimpleNamespace(data=str(_write(tmp_path, rows)), prompt_key="question", answer_key="answer",
                           skip_bad_rows=False, max_len=4096, eval_size=0)
    with pytest.raises(ValueError) as e:
        data.load_split(args, build_tokenizer(), context_limit(model, args.max_len))
    assert str(e.value) == (f"{args.data}: row 2: field 'question' is 71 prompt tokens, leaving no room for a "
                            "response in the context limit 64 (--max-len 4096, the model's max_position_embeddings 64)")
    args.skip_bad_rows = True
    train, _ = data.load_split(args, build_tokenizer(), context_limit(model, args.max_len))
    assert [len(r["question"]) for r in train] == [50]
    with pytest.raises(ValueError, match=r"context limit 32 \(--max-len 32, the model's max_position_embeddings "
                                         r"is not lower\)"):
        args.skip_bad_rows, args.max_len = False, 32
        data.load_split(args, build_tokenizer(), context_limit(model, args.max_len))


def test_non_utf8_row_is_named_and_skippable(tmp_path):
    p = tmp_path / "latin1.jsonl"
    good = json.dumps({"question": "1+1=", "answer": "2"}).encode()
    p.write_bytes(good + b"\n" + b'{"question": "caf\xe9", "answer": "3"}\n' + good + b"\n")  # \xe9: Latin-1 e-acute
    with pytest.raises(ValueError) as e:
        data.load_rows(str(p))
    assert str(e.value).startswith(f"{p}: row 2: not UTF-8 text (byte 0xe9"), str(e.value)
    rows, skipped = data.load_rows(str(p), skip_bad_rows=True)
    assert rows == [{"question": "1+1=", "answer": "2"}] * 2 and skipped == 1
    (tmp_path / "bad.json").write_bytes(b'[{"question": "caf\xe9", "answer": "3"}]')
    with pytest.raises(ValueError, match="bad.json: not UTF-8 text"):
        data.load_rows(str(tmp_path / "bad.json"), skip_bad_rows=True)


def test_real_gsm8k_rows_load_into_prompts_and_targets():
    tok = build_tokenizer()
    rows, skipped = data.load_rows(str(SHARED / "gsm8k_train.jsonl"), response_key="answer", tokenizer=tok,
                                   max_len=2048)
    assert len(rows) == 7473 and skipped == 0
    r = rows[0]
    assert r["answer"] == "72" and "####" in r["response"]  # Natalia's clips
    assert all(re.fullmatch(r"-?[\d.]+", x["answer"]) for x in rows)
    ids, mask, targets = data.collate([(tok(data.format_prompt(tok, r["question"])).input_ids
                                        + tok(r["response"]).input_ids, len(tok(r["question"] + "\n").input_ids))],
                                      tok.pad_token_id)
    n_prompt = len(tok(r["question"] + "\n").input_ids)
    assert (targets[0, :n_prompt - 1] == -100).all() and (targets[0, n_prompt - 1:-1] != -100).all()
    assert tok.decode(targets[0][targets[0] != -100]) == r["response"]


def test_chat_template_prompt():
    tok = build_tokenizer()
    assert data.format_prompt(tok, "2+2=") == "2+2=\n"
    tok.chat_template = "{% for m in messages %}<{{m.role}}>{{m.content}}\n{% endfor %}<assistant>"
    p = data.format_prompt(tok, "2+2=")
    assert p.startswith("<system>" + data.SYSTEM_PROMPT) and p.endswith("<user>2+2=\n<assistant>")


def test_math500_rows_load():
    rows, _ = data.load_rows(str(SHARED / "math500_test.jsonl"))
    assert len(rows) == 500
    assert sum(score("\\boxed{" + r["answer"] + "}", r["answer"]) for r in rows[:50]) >= 49
