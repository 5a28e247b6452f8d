"""Prompt sources: the built-in arithmetic task, local jsonl/parquet files, or a hub data set.

Every source yields rows {"question", "answer", ["response"]}: `answer` is the gold final answer the
verifier compares against, `response` (SFT only) the demonstration to imitate. Rows are validated
before step 1: a bad row stops the run with the file, the row number and the field in the message
(or is skipped and counted with --skip-bad-rows).

The built-in task: integer arithmetic expressions such as `(7+5)*3-4=` with worked solutions that
reduce one operation at a time and end in `\\boxed{N}`. Several solution paths are valid per problem
(the order in which independent sub-expressions are reduced, and the operand order of + and *),
so output diversity is meaningful; a settable fraction of demonstrations contain an arithmetic
slip, so a model cloned from them is imperfect and RL has room to improve.
"""
import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from common.config import InputError
from common.dist import print0
from common.rewards import extract_answer

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
HELDOUT_SEED = 1234  # the held-out split is fixed: same problems for every run and every seed


# ----------------------------------------------------------------------------- built-in task
def _random_tree(rng, n_ops, max_num):
    """A random expression tree with n_ops binary operations: leaves are ints in [1, max_num]."""
    if n_ops == 0:
        return rng.randint(1, max_num)
    left = rng.randint(0, n_ops - 1)
    return (rng.choice("+-*"), _random_tree(rng, left, max_num), _random_tree(rng, n_ops - 1 - left, max_num))


def _value(t):
    if isinstance(t, int):
        return t
    op, a, b = t
    a, b = _value(a), _value(b)
    return a + b if op == "+" else a - b if op == "-" else a * b


def _text(t, parent_op=None, right=False):
    """Infix text with only the parentheses that precedence requires."""
    if isinstance(t, int):
        return str(t)
    op, a, b = t
    s = _text(a, op, False) + op + _text(b, op, True)
    prec = {"+": 1, "-": 1, "*": 2}
    if parent_op and (prec[op] < prec[parent_op] or (right and prec[op] == prec[parent_op])):
        s = "(" + s + ")"
    return s


SEPARATORS, CLOSINGS = [", ", "; ", " then ", ", so "], [". ", ". So ", ". Answer: "]  # answer-neutral wording


def _solution(rng, tree, slip_prob=0.0, wording=None):
    """One worked solution: repeatedly reduce a random ready operation (both operands are numbers),
    writing `a op b = c`; + and * may be written with swapped operands. A slip (prob. per step) writes
    a wrong result that then propagates, like a real arithmetic mistake. wording: (step separator, closing
    phrase, space around operators) -- choices that never change the answer, like the free phrasing of real
    chain-of-thought (default: the one fixed format). Returns (text, final, slipped)."""
    steps, slipped = [], False
    sep, close, sp = wording or (", ", ". ", "")

    def ready(t, path=()):
        if isinstance(t, int):
            return []
        op, a, b = t
        if isinstance(a, int) and isinstance(b, int):
            return [path]
        return ready(a, path + (1,)) + ready(b, path + (2,))

    def replace(t, path, new):
        if not path:
            return new
        t = list(t)
        t[path[0]] = replace(t[path[0]], path[1:], new)
        return tuple(t)

    while not isinstance(tree, int):
        path = rng.choice(ready(tree))
        node = tree
        for i in path:
            node = node[i]
        op, a, b = node
        c = _value(node)
        if slip_prob and rng.random() < slip_prob:
            c += rng.choice([-10, -2, -1, 1, 2, 10])
            slipped = True
        if op in "+*" and rng.random() < 0.5:
            a, b = b, a
        steps.append(f"{a}{sp}{op}{sp}{b}{sp}={sp}{c}")
        tree = replace(tree, path, c)
    return sep.join(steps) + f"{close}\\boxed{{{tree}}}", tree, slipped


def builtin_task(n, seed, difficulty=2, max_num=9, flawed_frac=0.0, exclude=(), varied=False):
    """n problems of the built-in task. difficulty = number of operations per problem.
    flawed_frac: fraction of demonstrations that contain an arithmetic slip (wrong final answer).
    varied: demonstrations with answer-neutral variety of wording (see _solution), drawn from a second
    random stream so the problems and solution paths are those of varied=False.
    Problems whose question is in `exclude` (the held-out split) are never generated."""
    rng, wording_rng = random.Random(seed), random.Random(f"wording-{seed}")
    rows, seen, rejected = [], set(exclude), 0
    while len(rows) < n:
        tree = _random_tree(rng, difficulty, max_num)
        question = _text(tree) + "="
        if question in seen:
            rejected += 1
            if rejected > 100_000:
                raise ValueError(f"the built-in task with --difficulty {difficulty} --max-num {max_num} has too few "
                                 f"distinct problems left after the {len(seen)}-problem held-out split: "
                                 f"lower --eval-size or raise --max-num")
            continue
        answer = _value(tree)
        flawed = rng.random() < flawed_frac
        wording = (wording_rng.choice(SEPARATORS), wording_rng.choice(CLOSINGS), wording_rng.choice(["", " "])) \
            if varied else None
        response, final, _ = _solution(rng, tree, slip_prob=1.0 / difficulty if flawed else 0.0, wording=wording)
        if flawed and final == answer:  # make sure a flawed demonstration is really wrong
            response, final = response.replace(f"\\boxed{{{final}}}", f"\\boxed{{{final + 1}}}"), final + 1
        rows.append({"question": question, "answer": str(answer), "response": response})
    return rows


def builtin_split(n_train, n_eval, difficulty=2, max_num=9, flawed_frac=0.0, seed=0, varied=False):
    """Train rows (seeded) and the fixed held-out rows; no held-out question appears in train."""
    heldout = builtin_task(n_eval, HELDOUT_SEED + difficulty, difficulty, max_num)
    train = builtin_task(n_train, seed, difficulty, max_num, flawed_frac, exclude={r["question"] for r in heldout},
                         varied=varied)
    return train, heldout


def solution_paths(question, n=50, seed=0):
    """Distinct correct worked solutions of one built-in question (to show that several exist)."""
    tree = _parse_expr(question.rstrip("="))
    rng = random.Random(seed)
    return sorted({_solution(rng, tree)[0] for _ in range(n)})


def _parse_expr(s):
    """Parse the task's infix text back into a tree (only + - * ( ) and integers)."""
    toks = re.findall(r"\d+|[-+*()]", s)
    pos = 0

    def atom():
        nonlocal pos
        t = toks[pos]; pos += 1
        if t == "(":
            e = expr(); pos += 1
            return e
        return int(t)

    def term():
        nonlocal pos
        e = atom()
        while pos < len(toks) and toks[pos] == "*":
            pos += 1; e = ("*", e, atom())
        return e

    def expr():
        nonlocal pos
        e = term()
        while pos < len(toks) and toks[pos] in "+-":
            op = toks[pos]; pos += 1; e = (op, e, term())
        return e
    return expr()


# ----------------------------------------------------------------------------- batches
def batch_indices(n_rows, step, per_step, seed, rank, world):
    """Row indices of this rank's share of global batch `step`: one seeded permutation of the rows per epoch
    (the same on every rank), the step's `per_step` consecutive rows, and this rank's equal contiguous share."""
    assert per_step % world == 0, f"a batch of {per_step} is not divisible by {world} ranks"
    epoch, pos = divmod(step, n_rows // per_step)
    perm = np.random.default_rng(seed + epoch).permutation(n_rows)
    mine = per_step // world
    return perm[pos * per_step + rank * mine:pos * per_step + (rank + 1) * mine]


def collate(seqs, pad_id, device="cpu"):
    """Right-padded ids, attention mask and next-token targets (-100 on prompt and padding)."""
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, n_prompt) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        targets[i, n_prompt - 1:len(s) - 1] = torch.tensor(s[n_prompt:])
    return ids.to(device), mask.to(device), targets.to(device)


# ----------------------------------------------------------------------------- files and hub
def _read_rows(src):
    """(row number, row) of a local .jsonl/.json/.parquet file, or of a hub data set `name[:split]`.
    .jsonl rows are numbered by line (1-based, blank lines skipped); a line that is not UTF-8 or not JSON
    comes as (line, ValueError naming the file and line), so load_rows can raise it or skip and count it."""
    p = Path(src)
    if p.suffix == ".jsonl":
        rows = []
        with open(p, "rb") as f:  # decode line by line: a bad byte then names its line, not the whole file
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                    if line.strip():
                        rows.append((i, json.loads(line)))
                except UnicodeDecodeError as e:
                    rows.append((i, ValueError(f"{p}: row {i}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                                               f"column {e.start + 1})")))
                except json.JSONDecodeError as e:
                    rows.append((i, ValueError(f"{p}: row {i}: not valid JSON ({e.msg})")))
        return rows
    if p.suffix == ".json":
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:  # one JSON document: there is no row to skip
            raise ValueError(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
        return list(enumerate(json.loads(text), 1))
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq
        return list(enumerate(pq.read_table(p).to_pylist(), 1))
    if p.exists():
        raise ValueError(f"{p}: unsupported file type (use .jsonl, .json or .parquet)")
    import datasets  # a hub id, e.g. openai/gsm8k:train (needs network access)
    name, _, split = src.partition(":")
    return list(enumerate(datasets.load_dataset(name, split=split or "train"), 1))


def gold_answer(text):
    """Final answer of a reference solution: the part after GSM8K's `####`, else the last \\boxed{}
    (MATH), else the text itself."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return extract_answer(text) or text.strip()


def load_rows(src, prompt_key="question", answer_key="answer", response_key=None, tokenizer=None,
              max_len=None, skip_bad_rows=False, limit_note=None, limit=0):
    """Validated rows {"question","answer"[, "response"]} of a file or hub data set. A line that is not
    UTF-8 or not JSON, a missing key, an empty or non-text field, or a row too long for max_len raises
    ValueError naming the file, the row (1-based; the line of a .jsonl) and the field; with skip_bad_rows
    such rows are skipped and counted. Returns (rows, n_skipped).

    max_len is the context the engine accepts (rollout.context_limit: --max-len capped by the model's
    positions); limit_note says where it comes from in the message (default "--max-len N"). Lengths count
    what the run feeds the engine: an RL prompt (no response_key) is format_prompt(question) and must leave
    room for one generated token (<= max_len - 1); an SFT row is prompt + response + EOS, as gem_sft.encode
    builds it, and must fit (<= max_len). limit: stop after that many usable rows (0 = all), so rows that
    will not be used are not checked."""
    out, skipped = [], 0
    keys = [("question", prompt_key), ("answer", answer_key)] + ([("response", response_key)] if response_key else [])
    note = limit_note or f"--max-len {max_len}"
    for i, row in _read_rows(src):
        if limit and len(out) >= limit:
            break
        try:
            if isinstance(row, ValueError):
                raise row
            if not isinstance(row, dict):
                raise ValueError(f"{src}: row {i}: not a JSON object")
            r = {}
            for name, key in keys:
                if key not in row:
                    raise ValueError(f"{src}: row {i}: missing field '{key}' (set --{name.replace('question', 'prompt')}-key)")
                v = row[key]
                if isinstance(v, (int, float)) and not isinstance(v, bool) and name == "answer":
                    v = str(v)
                if not isinstance(v, str) or not v.strip():
                    raise ValueError(f"{src}: row {i}: field '{key}' is empty or not text")
                r[name] = v
            r["answer"] = gold_answer(r["answer"])
            if max_len and tokenizer is not None:
                prompt = format_prompt(tokenizer, r["question"])
                if response_key:
                    n = len(tokenizer(prompt, add_special_tokens=False).input_ids) + 1 + \
                        len(tokenizer(r["response"], add_special_tokens=False).input_ids)
                    if n > max_len:
                        raise ValueError(f"{src}: row {i}: field '{prompt_key}' + '{response_key}' + EOS is {n} "
                                         f"tokens, longer than the context limit {max_len} ({note})")
                else:
                    n = len(tokenizer(prompt).input_ids)  # as vLLM tokenizes the prompt
                    if n >= max_len:
                        raise ValueError(f"{src}: row {i}: field '{prompt_key}' is {n} prompt tokens, leaving no "
                                         f"room for a response in the context limit {max_len} ({note})")
            out.append(r)
        except ValueError:
            if not skip_bad_rows:
                raise
            skipped += 1
    if not out:
        raise ValueError(f"{src}: no usable rows")
    return out, skipped


def limit_kwargs(max_len_arg, limit=None):
    """load_rows' max_len and limit_note for `--max-len max_len_arg` and the engine's context limit
    (rollout.context_limit): the note names both, so a too-long row says which one it hit."""
    if limit is None:  # the model's positions were not consulted
        return dict(max_len=max_len_arg, limit_note=f"--max-len {max_len_arg}")
    positions = f"the model's max_position_embeddings {limit}" if limit < max_len_arg else \
        "the model's max_position_embeddings is not lower"
    return dict(max_len=limit, limit_note=f"--max-len {max_len_arg}, {positions}")


def format_prompt(tokenizer, question, system_prompt=SYSTEM_PROMPT):
    """The prompt text for a question: the tokenizer's chat template when it has one (with the system
    prompt the authors used), else the bare question on a line (the built-in model)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return question + "\n"


def load_split(args, tokenizer, max_len=None):
    """(train_rows, eval_rows) for a trainer's args: the built-in task when --data builtin, else the
    file/hub rows with the last --eval-size rows (or --eval-data) held out. max_len: the context limit
    the engine will accept, rollout.context_limit(model, args.max_len) (default args.max_len)."""
    try:
        return _load_split(args, tokenizer, max_len)
    except ValueError as e:  # a bad row or file: one `error:` line, exit code 2 (config.one_line_errors)
        raise InputError(str(e)) from None


def _load_split(args, tokenizer, max_len):
    if args.data == "builtin":
        train, heldout = builtin_split(args.train_size, args.eval_size, args.difficulty, args.max_num,
                                       getattr(args, "flawed_frac", 0.0), args.seed,
                                       getattr(args, "wording_variety", False))
        if max_len and tokenizer is not None:  # its prompts must leave the engine room for a response, as file rows
            note = limit_kwargs(args.max_len, max_len)["limit_note"]
            for split, rows in (("train", train), ("held-out", heldout)):
                lengths = [len(x) for x in tokenizer([format_prompt(tokenizer, r["question"]) for r in rows]).input_ids]
                i = max(range(len(rows)), key=lengths.__getitem__, default=None)
                if i is not None and lengths[i] >= max_len:
                    raise ValueError(f"built-in task: {split} row {i + 1}: the prompt is {lengths[i]} tokens, leaving "
                                     f"no room for a response in the context limit {max_len} ({note})")
        return train, heldout
    kw = dict(prompt_key=args.prompt_key, answer_key=args.answer_key, tokenizer=tokenizer,
              skip_bad_rows=args.skip_bad_rows, response_key=getattr(args, "response_key", None),
              **limit_kwargs(args.max_len, max_len))
    rows, skipped = load_rows(args.data, **kw)
    if skipped:
        print0(f"[data] skipped {skipped} bad rows of {args.data}")
    if getattr(args, "eval_data", None):
        kw["response_key"] = None
        return rows, load_rows(args.eval_data, **kw)[0][:args.eval_size]
    n_eval = min(args.eval_size, len(rows) // 10)
    return rows[:len(rows) - n_eval], rows[len(rows) - n_eval:]
