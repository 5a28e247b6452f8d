"""common/metrics.py: rl_step_metrics on a hand-made step (each quantity written out here from the batch), the
console line, samples.jsonl and read(). The Logger's rules for resumed and reused run folders are in test_faults.py."""
import json
import math

import pytest
import torch

import grpo
from common import metrics
from common.batch import Batch
from common.rollout import Sample


def _step(tis_cap=2.0):
    """2 prompts x 2 responses of 3, 2, 1 and 2 tokens (T = 4); known engine/trainer log-prob gaps."""
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    old = -torch.arange(1, 17, dtype=torch.float32).view(4, 4) / 10 * mask
    gap = torch.tensor([[0, 0.0, math.log(3), -math.log(2)], [0, 0.1, 0.0, 0], [0, 0, math.log(2.5), 0],
                        [-0.2, 0.0, 0, 0]])
    engine = (old - gap) * mask  # so old - engine = gap on the response tokens
    ref = old - 0.5 * mask  # k1 = log pi_old - log pi_ref = 0.5 on every response token
    adv = torch.tensor([[1.0], [-1.0], [0.0], [0.0]]) * mask
    b = Batch(ids=torch.zeros(4, 4, dtype=torch.long), attn=torch.ones(4, 4, dtype=torch.long), targets=torch.zeros(4, 4),
              mask=mask, adv=adv, in_loss=torch.tensor([True, True, False, True]), engine_logp=engine, old_logp=None,
              ref_logp=ref)
    samples = [Sample([1], [2] * int(n), "x", "length" if i == 0 else "stop", engine[i][mask[i].bool()].tolist())
               for i, n in enumerate(mask.sum(-1).tolist())]
    update = {"loss": 0.6, "clip_frac": 0.2, "entropy": 4.0, "grad_norm": 3.0, "updates": 2}
    times = {"start": 10.0, "generate": 12.0, "logprob": 12.5, "update": 14.0, "sync": 14.25}
    m = metrics.rl_step_metrics(b, old, rewards=torch.tensor([[1.0, 0.0], [1.0, 1.0]]), samples=samples, update=update,
                                times=times, args=grpo.Args(tis_cap=tis_cap, kl_estimator="k1"), world=1,
                                gen_tokens=16, rounds=3, kept=3, reward_failures=2)
    return m


def test_rl_step_metrics_by_hand():
    m = _step()
    n_tok = 8
    assert m["reward"] == m["accuracy"] == 0.75 and m["zero_var_groups"] == 0.5
    assert m["response_len"] == 2.0 and m["truncated"] == 0.25 and m["in_loss"] == 0.75
    assert m["adv_mean"] == pytest.approx((3 - 2) / n_tok) and m["nonzero_adv"] == 0.5
    assert m["adv_std"] == pytest.approx(math.sqrt(5 / n_tok - (1 / n_tok) ** 2))
    assert m["entropy"] == 0.5 and m["kl_ref"] == pytest.approx(0.5)
    gaps = [0.0, math.log(3), -math.log(2), 0.1, 0.0, math.log(2.5), -0.2, 0.0]  # the 8 response tokens
    assert m["logprob_gap"] == pytest.approx(sum(abs(g) for g in gaps) / n_tok)
    assert m["tis_ratio_mean"] == pytest.approx(sum(math.exp(g) for g in gaps) / n_tok)
    assert m["tis_ratio_max"] == pytest.approx(3.0) and m["tis_capped"] == pytest.approx(2 / n_tok)  # 3 and 2.5 > 2
    assert _step(tis_cap=2.6)["tis_capped"] == pytest.approx(1 / n_tok)
    assert _step(tis_cap=0.0)["tis_capped"] == pytest.approx(2 / n_tok)  # off: the share C = 2 would cap
    assert m["gen_rounds"] == 3 and m["dropped_groups"] == 0.5  # 3 rounds of 2 groups, 3 kept
    assert m["reward_failures"] == 2 and m["loss"] == 0.3 and m["clip_frac"] == 0.1 and m["grad_norm"] == 1.5
    assert m["gen_tokens_per_s"] == 8.0 and m["time_generate"] == 2.0 and m["time_sync"] == 0.25


def test_no_kl_ref_without_pi_ref():
    b = Batch(ids=torch.zeros(1, 2, dtype=torch.long), attn=torch.ones(1, 2), targets=torch.zeros(1, 2),
              mask=torch.ones(1, 2), adv=torch.zeros(1, 2), in_loss=torch.ones(1, dtype=torch.bool),
              engine_logp=torch.zeros(1, 2), old_logp=None, ref_logp=None)
    m = metrics.rl_step_metrics(b, torch.zeros(1, 2), rewards=torch.ones(1, 1), samples=[Sample([1], [2, 3], "", "stop")],
                                update={"loss": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0, "updates": 1},
                                times={"start": 0.0, "generate": 1.0}, args=grpo.Args(), world=1, gen_tokens=2,
                                rounds=1, kept=1, reward_failures=0)
    assert "kl_ref" not in m and m["tis_ratio_mean"] == 1.0 and m["logprob_gap"] == 0.0


def test_logger_line_samples_and_read(tmp_path, capsys):
    log = metrics.Logger(tmp_path, 4, run_name="x")
    log.log(1, {"train/loss": 0.123456, "train/note": "text", "train/nan": float("nan")}, ["train/loss", "train/nan"])
    line = capsys.readouterr().out
    assert line.startswith("[#####...............] 1/4") and "loss=0.1235 nan=nan" in line
    metrics.log_samples(log, 1, ["p0", "p1"], [Sample([1], [2], f"r{i}", "stop") for i in range(4)], [1, 0, 0, 1], k=3)
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["response"], r["reward"]) for r in rows] == [("p0", "r0", 1.0), ("p0", "r1", 0.0),
                                                                           ("p1", "r2", 0.0)]
    assert metrics.read(tmp_path / "metrics.jsonl")[0]["train/loss"] == 0.123456
    metrics.Logger(tmp_path / "other", 4, main=False).log(1, {"a": 1.0})  # not rank 0: writes nothing
    assert not (tmp_path / "other" / "metrics.jsonl").exists()
