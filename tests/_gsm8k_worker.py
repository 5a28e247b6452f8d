"""torchrun helper for tests/test_rollout.py::test_two_ranks_gsm8k_long_prompts: every rank samples real
GSM8K test prompts through its colocated vLLM engine (the built-in model: one token per character, so the
prompts are 100-500 tokens) and writes what it saw to OUT_DIR/rank{r}.json.

The rank's batch holds more prompt tokens than one engine step may schedule (max_num_batched_tokens),
so the scheduler must either split a prefill across steps or defer whole prompts (see Engine.__init__).

    torchrun --standalone --nproc_per_node 2 tests/_gsm8k_worker.py MODEL_DIR DATA_FILE OUT_DIR
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import data, dist  # noqa: E402
from common.rollout import Engine  # noqa: E402

MAX_LEN, NEW, N = 512, 8, 2  # context (the model's positions), new tokens per sample, samples per prompt


def main(model_dir, data_file, out_dir):
    d = dist.setup(seed=0)
    engine = Engine(model_dir, seed=0, max_model_len=MAX_LEN)
    tok = engine.tok
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    rows, _ = data.load_rows(data_file, tokenizer=tok, max_len=MAX_LEN - NEW, skip_bad_rows=True)
    rows = rows[d.rank::d.world]  # rank-strided, as evaluate() shards
    prompts, total = [], 0
    for r in rows:  # distinct prompts until one batch holds 1.5x the step budget (prefix caching can't help)
        prompts.append(data.format_prompt(tok, r["question"]))
        total += len(tok(prompts[-1]).input_ids)
        if total > 1.5 * budget:
            break
    gen = lambda ps, seed: engine.generate(ps, n=N, temperature=1.0, max_new_tokens=NEW, seed=seed, greedy=True)
    full = gen(prompts, 3)
    head = gen(prompts[:3], 3)     # a different batch: the same (seed, i, j) must give the same tokens
    other = gen(prompts[:3], 4)
    ids = lambda groups: [[s.response_ids for s in g] for g in groups]
    res = {"rank": d.rank, "budget": budget, "prompt_tokens": total, "n_prompts": len(prompts),
           "group_sizes": [len(g) for g in full],
           "prompt_ids_ok": all(s.prompt_ids == tok(p).input_ids for p, g in zip(prompts, full) for s in g),
           "lens": [[len(s.response_ids), len(s.logprobs), len(s.prompt_ids), s.finish,
                     bool(s.response_ids) and s.response_ids[-1] == tok.eos_token_id] for g in full for s in g],
           "same_seed_equal": ids(full)[:3] == ids(head), "other_seed_differs": ids(head) != ids(other)}
    Path(out_dir, f"rank{d.rank}.json").write_text(json.dumps(res))
    engine.shutdown()
    dist.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:4])
