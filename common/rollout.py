"""Rollout: a colocated vLLM engine per rank (or a plain transformers fallback, --rollout hf) that
generates responses and receives the trainer's new weights after every update.

The engine lives in the trainer's own process (torchrun starts one process per rank; vLLM joins it
with the `external_launcher` executor), so nothing is started by hand. On GPU the engine sleeps while
the trainer updates (KV cache and weights released, `sleep`); `sync` wakes the weights, streams the new
values in, and only then wakes the KV cache, so the cache is not allocated while the gathered tensors
are. On CPU sleep/wake are no-ops (vLLM's CPU worker has no sleep mode). On CPU with several ranks on one machine
and a small model, rank 0's engine decodes every rank's prompts on all the cores (`pooled`, see Engine.generate).

Semantics shared by both backends: log-probs are those of the distribution actually sampled from
(temperature and top-p applied, vLLM's "processed_logprobs"); a greedy sample's are at temperature 1.
Sample j of prompt i is drawn with its own seed, a hash of (seed, i, j), so it does not depend on the
rest of the batch.
"""
import json
import math
import os
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.dist import RESHARD_CPU_PARAMS

# vLLM must run in this process (weights are pushed by reference). Its CPU KV cache is sized by the Engine from
# max_model_len x the sequences it runs at once (kv_cache_bytes), not a fixed budget; a VLLM_CPU_KVCACHE_SPACE (GiB)
# set by the user still overrides that.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # our handler (see _quiet_vllm), not vLLM's dictConfig
warnings.filterwarnings("ignore", message=".*reduce_op` is deprecated", category=FutureWarning)  # vLLM's Triton shim


@dataclass
class Sample:
    prompt_ids: list
    response_ids: list                            # EOS included when the sample stopped on it
    text: str
    finish: str                                   # "stop" (EOS) or "length" (max_new_tokens / max_model_len)
    logprobs: list = field(default_factory=list)  # the engine's sampling log-prob of each response token


@dataclass
class _Request:
    """One rank's generate call: what a pooled engine needs to draw that rank's samples."""
    prompts: list
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    greedy: bool
    ignore_eos: bool

    def jobs(self):
        """(prompt i, sample j) in output order; j == n is the greedy sample."""
        return [(i, j) for i in range(len(self.prompts)) for j in range(self.n + int(self.greedy))]


def sample_seed(seed, i, j):
    """Seed of sample j of prompt i: a 63-bit hash of the three (distinct triples never collide in practice,
    unlike seed + i * k + j schemes)."""
    return int(np.random.SeedSequence([seed % 2**63, i, j]).generate_state(1, np.uint64)[0]) % 2**63


MAX_SEQS = 256  # vLLM's default max_num_seqs on CPU: the most sequences an engine runs at once
KV_BLOCK = 128  # the KV cache is sized in whole blocks of this many tokens per sequence (vLLM's CPU blocks divide it)


def kv_cache_bytes(model, max_model_len, max_seqs, dtype="float32", trust_remote_code=False):
    """Bytes of KV cache for `max_seqs` sequences of `max_model_len` tokens (rounded up to KV_BLOCK): layers x 2 (K
    and V) x kv_heads x head_dim x dtype bytes per token. The engine allocates exactly this on CPU, so it never
    holds a cache the run cannot use (the fixed 1 GiB before was 11x what a 0.5B GRPO step of 8 sequences needs),
    and every sequence it admits at once fits whole (max_num_seqs = max_seqs): no preemption, no recompute."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    cfg = getattr(cfg, "text_config", None) or cfg
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * kv_heads * head_dim * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    return per_token * -(-max_model_len // KV_BLOCK) * KV_BLOCK * max_seqs


def context_limit(model, max_len, trust_remote_code=False):
    """Tokens (prompt + response) the engine accepts: min(max_len, the model's max_position_embeddings).
    The Engine clamps its max_model_len with this, and data.load_rows checks rows against it, so the two
    cannot disagree. `model` is a local folder or hub id (only its config is read)."""
    from transformers import AutoConfig
    positions = getattr(AutoConfig.from_pretrained(str(model), trust_remote_code=trust_remote_code),
                        "max_position_embeddings", None)
    return min(max_len, positions) if positions else max_len


class Engine:
    """generate(prompts, n, ...) -> [[Sample] * n (+1 greedy)] per prompt; sync(named tensors).
    After each generate: last_gen_tokens, last_gen_seconds, last_tokens_per_s, last_truncated (the
    fraction of samples cut at the length limit); after each sync: last_sync_seconds."""

    def __init__(self, model, backend="vllm", seed=0, max_model_len=1024, gpu_memory_utilization=0.3,
                 tensor_parallel_size=1, trust_remote_code=False, hf_model=None, tokenizer=None,
                 sleep_mode=None, hf_batch_size=64, max_seqs=None, dtype=None, lean_memory=None, pooled=None):
        """max_seqs: the most sequences one generate call of the run has (vLLM runs at most min(max_seqs, MAX_SEQS)
        at once, the rest wait; on CPU the KV cache holds exactly that many of max_model_len tokens). None (a caller
        that does not know): vLLM's default of MAX_SEQS at once, with a cache of at most 1 GiB (sequences that do
        not fit wait or are recomputed). dtype: the engine's weights and KV cache, default bfloat16 on GPU and
        float32 on CPU. lean_memory (vLLM on CPU): free the engine's weights while asleep and return freed heap pages
        to the system between phases; None: for models from RESHARD_CPU_PARAMS parameters (common/dist.py), where
        it keeps a 0.5B run's peak down. Below, the memory is not short and giving pages back costs time: each
        phase faults them in again (SmolLM2-135M: see `sleep`). pooled: one engine decodes for every rank (see
        `generate`); None: vLLM on CPU, several ranks, all on this machine, a model below RESHARD_CPU_PARAMS (rank 0's
        KV cache holds every rank's sequences, so a large model keeps one engine per rank and its memory down)."""
        max_model_len = context_limit(model, max_model_len, trust_remote_code)
        self.on_gpu = torch.cuda.is_available()
        shapes = _checkpoint_shapes(model)  # None: not a local safetensors checkpoint
        # the size from the checkpoint, not from the engine's modules: vLLM's CPU backend repacks its linear weights
        # outside the parameters it reports. Unknown size (a hub id): large
        n_params = None if shapes is None else sum(math.prod(s) for s in shapes.values())
        large = n_params is None or n_params >= RESHARD_CPU_PARAMS
        world = int(os.environ.get("WORLD_SIZE", "1"))
        one_machine = world == int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.pooled = (backend == "vllm" and not self.on_gpu and world > 1 and one_machine and not large) \
            if pooled is None else bool(pooled and world > 1 and backend == "vllm")
        self.rank = int(os.environ.get("RANK", "0"))
        if self.pooled and self.rank == 0 and max_seqs:  # rank 0 runs every rank's sequences at once
            max_seqs *= world
        self.dtype = dtype if dtype not in (None, "auto") else "bfloat16" if self.on_gpu else "float32"
        self.max_seqs = max(1, min(max_seqs or MAX_SEQS, MAX_SEQS))
        self.kv_bytes = 0
        self.backend, self.seed, self.max_model_len, self.hf_batch_size = backend, seed, max_model_len, hf_batch_size
        self.sleep_mode = backend == "vllm" if sleep_mode is None else sleep_mode
        self.asleep, self.weights_lost = set(), False  # released memory tags; weights discarded (level 2)
        self.lean_memory = False
        self.last_gen_tokens = self.last_gen_seconds = self.last_tokens_per_s = self.last_truncated = 0
        self.last_sync_seconds = 0.0
        self.ckpt_keys = None if shapes is None else set(shapes)
        if backend == "hf":  # the trainer's tokenizer and a plain transformers model (kept in sync)
            from common.model import load
            assert (hf_model is None) == (tokenizer is None), "pass hf_model and tokenizer together"
            self.model, self.tok = (hf_model, tokenizer) if hf_model is not None else \
                load(model, dtype=getattr(torch, self.dtype), trust_remote_code=trust_remote_code)
            if hf_model is None:
                self.model.to("cuda" if self.on_gpu else "cpu").eval()
            self.tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
            return
        from vllm import LLM
        _quiet_vllm()
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        # No chunked prefill on CPU. With it, the scheduler splits a prompt that does not fit the step's token
        # budget (max_num_batched_tokens, 4096 on CPU) over several steps; the sampler still runs for the
        # unfinished prefill, drawing from the request's seeded generator, and GPUModelRunner._bookkeeping_sync
        # (vllm/v1/worker/gpu_model_runner.py; the CPU runner inherits it) discards that token and rewinds the
        # generator with `gen.set_offset(gen.get_offset() - 4)`. Only CUDA's Philox generator has an offset: a
        # CPU torch.Generator raises "CPU Generator does not use offset", so every batch with more prompt tokens
        # than the budget crashed (GSM8K, k samples per prompt). Without chunking a prompt that does not fit
        # waits for the next step whole (vLLM then raises the budget to at least max_model_len), so no sample is
        # ever drawn and discarded, and each seeded generator draws exactly once per generated token: the same
        # (seed, i, j) gives the same tokens whatever the batch. GPU keeps chunked prefill (the rewind works).
        kv = {}
        if not self.on_gpu:
            self.kv_bytes = kv_cache_bytes(model, max_model_len, self.max_seqs, self.dtype, trust_remote_code)
            if max_seqs is None:
                self.kv_bytes = min(self.kv_bytes, 2**30)
            if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # the user's fixed budget (vLLM applies it over ours)
                self.kv_bytes = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30
            kv = dict(kv_cache_memory_bytes=self.kv_bytes, max_num_seqs=self.max_seqs)
        with _keep_process_state():  # the trainer keeps its RNG streams and thread control
            self.llm = LLM(model=str(model), seed=seed, dtype=self.dtype, **kv,
                           enforce_eager=not self.on_gpu, max_model_len=max_model_len,
                           gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                           distributed_executor_backend="external_launcher" if distributed else None,
                           enable_sleep_mode=self.sleep_mode and self.on_gpu, logprobs_mode="processed_logprobs",
                           trust_remote_code=trust_remote_code, enable_prefix_caching=True,
                           enable_chunked_prefill=self.on_gpu)
        self.tok = self.llm.get_tokenizer()
        if not self.on_gpu:
            self.llm.apply_model(_drop_unused_cpu_copies)
            self.lean_memory = large if lean_memory is None else lean_memory
            self._trim_heap()
        self.tied = bool(getattr(self.llm.llm_engine.model_config.hf_text_config, "tie_word_embeddings", False))

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256, seed=0, greedy=False,
                 ignore_eos=False, every_rank=True):
        """n samples per prompt at `temperature`/`top_p` (plus one greedy sample last when greedy=True).
        ignore_eos: always generate max_new_tokens (benchmarks). Pooled (see __init__) and every_rank: a collective,
        every rank calls it with its own prompts and seed, rank 0's engine decodes all of them on all the machine's
        cores, and each rank gets back its own samples, drawn with its own seeds. On CPU one engine on 2 threads decodes
        32 sequences in 0.87-0.93x the time two 1-thread engines take for 16 each (bench/decode.py): a decoding step's
        products are too small to keep a core busy. every_rank=False: this rank's engine alone, for a call the other
        ranks do not make (DAPO's later rounds)."""
        if self.asleep or self.weights_lost:
            raise RuntimeError("engine asleep: sync() before generate() (or wake_up() after sleep(level=1))")
        self._check_lengths(prompts)
        request = _Request(list(prompts), n, temperature, top_p, max_new_tokens, seed, greedy, ignore_eos)
        t0 = time.time()
        outs = self._pooled_generate(request) if self.pooled and every_rank else self._generate([request])[0]
        self.last_gen_seconds = time.time() - t0
        self.last_gen_tokens = sum(len(o.response_ids) for o in outs)
        self.last_tokens_per_s = self.last_gen_tokens / max(self.last_gen_seconds, 1e-9)
        self.last_truncated = sum(o.finish == "length" for o in outs) / max(len(outs), 1)
        grouped = [[] for _ in prompts]
        for (i, _), o in zip(request.jobs(), outs):
            grouped[i].append(o)
        return grouped

    def _pooled_generate(self, request):
        """Rank 0 gathers every rank's request, runs them in one engine call on the threads of all the ranks (the others
        wait in the scatter), and sends each rank its samples."""
        import torch.distributed as tdist
        everyone = [None] * tdist.get_world_size() if self.rank == 0 else None
        tdist.gather_object((request, torch.get_num_threads()), everyone, dst=0)
        per_rank = None
        if self.rank == 0:
            threads = torch.get_num_threads()
            torch.set_num_threads(sum(t for _, t in everyone))
            try:
                per_rank = self._generate([r for r, _ in everyone])
            finally:
                torch.set_num_threads(threads)
        mine = [None]
        tdist.scatter_object_list(mine, per_rank, src=0)
        return mine[0]

    def _generate(self, requests):
        """The samples of each request, in its jobs' order, from one engine call for all of them (vLLM)."""
        if self.backend == "hf":
            return [self._hf_generate(r) for r in requests]
        from vllm import SamplingParams
        texts, params, sizes = [], [], []
        for r in requests:
            jobs = r.jobs()
            texts += [r.prompts[i] for i, _ in jobs]
            params += [SamplingParams(n=1, max_tokens=r.max_new_tokens, logprobs=0, ignore_eos=r.ignore_eos,
                                      temperature=0.0 if j == r.n else r.temperature,
                                      top_p=1.0 if j == r.n else r.top_p, seed=sample_seed(r.seed, i, j))
                       for i, j in jobs]
            sizes.append(len(jobs))
        res = []
        if texts:
            with _keep_process_state():  # vLLM's sampler also draws from the global RNG, even for seeded rows
                res = self.llm.generate(texts, params, use_tqdm=False)
        outs = []
        for r in res:
            c = r.outputs[0]
            lps = [d[t].logprob for d, t in zip(c.logprobs or [], c.token_ids)]
            outs.append(Sample(list(r.prompt_token_ids), list(c.token_ids), c.text,
                               "length" if c.finish_reason == "length" else "stop", lps))
        ends = np.cumsum([0] + sizes)
        return [outs[a:b] for a, b in zip(ends[:-1], ends[1:])]

    def _check_lengths(self, prompts):
        """A prompt that leaves no room for one response token in max_model_len is a known bad input (data rows are
        checked before the engine starts; this catches the rest, e.g. built-in prompts under a tiny --max-len):
        config.InputError, one `error:` line and exit code 2 instead of vLLM's traceback on the rank that met it."""
        from common.config import InputError
        for i, p in enumerate(prompts):
            n = len(self.tok(p).input_ids)  # as vLLM (and _hf_generate) tokenize it
            if n >= self.max_model_len:
                raise InputError(f"a prompt of {n} tokens leaves no room for a response in the context limit "
                                 f"{self.max_model_len} (--max-len, capped by the model's max_position_embeddings): "
                                 f"{p[:60]!r}...", every_rank=False)

    @torch.no_grad()
    def _hf_generate(self, request):
        """Batched token-by-token sampling with transformers: left-padded rows of `hf_batch_size`, a KV
        cache, logits of the last position only. Each row samples with its own generator."""
        prompts, jobs, n, temperature, top_p = request.prompts, request.jobs(), request.n, request.temperature, \
            request.top_p
        max_new_tokens, seed, ignore_eos = request.max_new_tokens, request.seed, request.ignore_eos
        dev = next(self.model.parameters()).device
        eos = {self.tok.eos_token_id} | set(_as_list(self.model.generation_config.eos_token_id))
        eos = set() if ignore_eos else eos
        outs = []
        for b in range(0, len(jobs), self.hf_batch_size):
            chunk = jobs[b:b + self.hf_batch_size]
            enc = [self.tok(prompts[i]).input_ids for i, _ in chunk]
            B, L = len(enc), max(map(len, enc))
            if L >= self.max_model_len:
                raise ValueError(f"a prompt of {L} tokens leaves no room in max_model_len={self.max_model_len}")
            ids = torch.tensor([[self.tok.pad_token_id] * (L - len(e)) + e for e in enc], device=dev)
            attn = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc], device=dev)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            greedy = torch.tensor([j == n or temperature == 0 for _, j in chunk], device=dev)
            temp = torch.where(greedy, 1.0, float(temperature or 1.0))[:, None]
            # one generator per sample, on the model's device: sampling stays where the logits are (on a GPU, a
            # CPU multinomial over a 151,936-word vocabulary per row and token took 80 s of a 0.5B GRPO step)
            gens = [torch.Generator(device=dev).manual_seed(sample_seed(seed, i, j)) for i, j in chunk]
            limit = [min(max_new_tokens, self.max_model_len - len(e)) for e in enc]
            resp, lps, finish, live = [[] for _ in chunk], [[] for _ in chunk], ["length"] * B, [k > 0 for k in limit]
            past = None
            while any(live):
                out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past,
                                 use_cache=True, logits_to_keep=1)
                past, logits = out.past_key_values, out.logits[:, -1].float()
                logp = (logits / temp).log_softmax(-1)
                if top_p < 1.0:
                    logp = torch.where(greedy[:, None], logp, _top_p(logp, top_p))
                nxt = logits.argmax(-1)
                for r in range(B):
                    if live[r] and not greedy[r]:
                        nxt[r] = torch.multinomial(logp[r].exp(), 1, generator=gens[r])[0]
                nxt_lp = logp.gather(1, nxt[:, None])[:, 0].tolist()  # one transfer per token, not [B, V]
                nxt = nxt.cpu()
                for r in range(B):
                    if live[r]:
                        tok = int(nxt[r])
                        resp[r].append(tok)
                        lps[r].append(nxt_lp[r])
                        if tok in eos:
                            live[r], finish[r] = False, "stop"
                        elif len(resp[r]) >= limit[r]:
                            live[r] = False
                ids, pos = nxt[:, None].to(dev), pos[:, -1:] + 1
                attn = torch.cat([attn, attn.new_ones(B, 1)], 1)
            outs += [Sample(e, r, self.tok.decode(r, skip_special_tokens=True), f, lp)
                     for e, r, f, lp in zip(enc, resp, finish, lps)]
        return outs

    # ------------------------------------------------------------------ weights
    def sync(self, named_tensors):
        """Load new weights into the engine, one tensor at a time, then drop the prefix cache (its
        KV entries were computed by the old weights). `named_tensors` yields (hf_name, tensor), e.g.
        `dist.full_state_items(model)`, which streams the FSDP2 shards without a full copy. Every
        checkpoint tensor must come: a missing one would keep its stale value, so that raises.
        The model runner's `reload_weights` updates in place on CPU and GPU (plain `load_weights`
        fails on the CPU backend, which repacks linear weights at start-up). Asleep on GPU: the weights
        wake first, the KV cache only after loading."""
        t0 = time.time()
        seen = set()
        # CPU: the embedding's unused packed copy goes as soon as the embedding is reloaded, before the head's
        after_embedding = None if self.on_gpu or self.backend != "vllm" else \
            (lambda: self.llm.apply_model(_drop_unused_cpu_copies))
        stream = _tied_head(named_tensors, self.tied, seen, after_embedding, trim=self._trim_heap)
        if self.backend == "hf":
            state = self.model.state_dict()  # detached views of the parameters
            for name, t in stream:
                if name not in state:
                    raise KeyError(f"sync: the model has no weight {name!r}")
                state[name].copy_(t)
        else:
            self.wake_up(["weights"])
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
            self.weights_lost = False
            if not self.on_gpu:
                self.llm.apply_model(_drop_unused_cpu_copies)
                self._trim_heap()
            self.wake_up(["kv_cache"])
            assert self.llm.reset_prefix_cache(), "prefix cache not reset (requests still running?)"
        missing = (self.ckpt_keys or set()) - seen
        if missing:
            raise ValueError(f"sync: {len(missing)} weights were not sent, e.g. {sorted(missing)[:3]}; "
                             "the engine keeps stale values for them")
        self.last_sync_seconds = time.time() - t0

    def _trim_heap(self):
        if self.lean_memory:
            _trim_heap()

    def sleep(self, level=2):
        """Release memory while the trainer updates. GPU (vLLM's sleep mode): KV cache and weights; level 2
        discards the weights (the next `sync` reloads them all, no CPU copy), level 1 offloads them to CPU memory,
        so `wake_up()` alone brings the same weights back. CPU (vLLM's CPU worker has no sleep mode): level 2
        with lean_memory frees the weights here (_release_cpu_weights: the packed GEMM weights and the embedding),
        the next `sync` rebuilds them, which costs nothing extra (every sync repacks all weights anyway); without
        lean_memory (a small model) the weights stay, only marked stale (SmolLM2-135M, builtin setting of
        bench/rl_step.py: freeing them and trimming the heap made the update after it fault its memory in again,
        730k page faults per update instead of 200k); the KV cache, sized to the run, stays; level 1 keeps
        everything."""
        if self.backend == "vllm" and self.sleep_mode and not self.asleep:
            if self.on_gpu:
                self.llm.sleep(level=level)
                self.asleep, self.weights_lost = {"weights", "kv_cache"}, level >= 2
            elif level >= 2:
                if self.lean_memory:
                    self.llm.apply_model(_release_cpu_weights)
                    _trim_heap()
                self.asleep, self.weights_lost = {"weights"}, True

    def wake_up(self, tags=None):
        """Re-allocate the released memory: tags None (all), ["weights"] or ["kv_cache"]."""
        tags = [t for t in (tags or ["weights", "kv_cache"]) if t in self.asleep]
        if tags and self.on_gpu:
            self.llm.wake_up(tags=tags)
        elif "weights" in tags and self.lean_memory:
            _trim_heap()  # what the trainer's update freed goes back to the system before the weights come back
            self.llm.apply_model(_restore_cpu_weights)
        self.asleep -= set(tags)

    def shutdown(self):
        """Stop the engine; call it on every rank before `dist.cleanup()`. vLLM's teardown destroys its
        own process groups and also the default torch.distributed group, so nothing may use it after."""
        if self.backend == "vllm" and getattr(self, "llm", None) is not None:
            import gc
            import torch.distributed as tdist
            if tdist.is_initialized() and tdist.get_world_size() > 1:
                tdist.barrier()  # tear down together: no rank may still be inside a collective
            eng = getattr(self.llm.llm_engine, "engine_core", None)
            if eng is not None and hasattr(eng, "shutdown"):
                eng.shutdown()
            self.llm = None
            gc.collect()


# vLLM warnings that are expected here and say nothing about the run (without this filter they were 32 of the 59
# lines of a short run): rotary caches have no checkpoint weights to reload (recomputed); _keep_process_state
# restores torch.set_num_threads and the RNG state that an in-process engine takes over; the CPU build's
# performance hints (LD_PRELOAD, Triton, Inductor, model runner V2: enforce_eager on CPU is deliberate); no
# SSM layers; chunked prefill is disabled on CPU on purpose (Engine.__init__ says why).
HARMLESS_VLLM_WARNINGS = ("Failed to load weights", "doesn't allow to use `torch.set_num_threads`",
                          "is not found in LD_PRELOAD", "The global random seed is set to", "Reset SSM cache type",
                          "does not officially support disabling chunked prefill", "Triton is not installed",
                          "Model Runner V2 requires Triton", "Inductor compilation was disabled", "Enforce eager set")


class _HarmlessFilter:
    def filter(self, record):
        return not any(h in record.getMessage() for h in HARMLESS_VLLM_WARNINGS)


def _quiet_vllm():
    """vLLM's records (WARNING and up) through one stderr handler that drops HARMLESS_VLLM_WARNINGS. vLLM's own
    logging set-up is off (VLLM_CONFIGURE_LOGGING=0): it would replace the handlers when an engine starts."""
    import logging
    import sys
    log = logging.getLogger("vllm")
    if not any(isinstance(f, _HarmlessFilter) for h in log.handlers for f in h.filters):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s [vllm] %(message)s"))
        h.addFilter(_HarmlessFilter())
        log.addHandler(h)
        log.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
        log.propagate = False


def _asleep_linear(*a, **kw):
    raise RuntimeError("engine weights released (Engine.sleep): sync() before generate()")


def _release_cpu_weights(model):
    """Level-2 sleep for vLLM's CPU backend (run on the worker by apply_model). Its linear layers keep their
    weights only inside a packed GEMM handle (the `cpu_linear` closure; `weight` is an empty placeholder), the
    embedding keeps `weight` and a packed handle for the head. Drop every handle and free the storage of the
    weights that keep one; `_restore_cpu_weights` gives the storage back (contents undefined) and the next
    reload_weights fills it and packs new handles, layer by layer. A layer the reload missed would raise on its
    first use (_asleep_linear), never compute with stale weights."""
    released = getattr(model, "_released_storage", [])
    for m in model.modules():
        if hasattr(m, "cpu_linear"):
            m.cpu_linear = _asleep_linear
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.untyped_storage().nbytes() > 0:
                released.append((w, w.untyped_storage().nbytes()))
                w.untyped_storage().resize_(0)
    model._released_storage = released
    return sum(n for _, n in released)


def _drop_unused_cpu_copies(model):
    """After vLLM's CPU backend (re)loads a model with a head module of its own (ParallelLMHead; Qwen2 has one even
    when tied, sharing the embedding's weight), the input embedding still packs a GEMM copy of itself that only a
    head would use: [V x D], 0.54 GB for a 0.5B model in fp32. Drop it (its lookups read `weight`); the next reload
    packs it again and this runs again. (The head's own `weight` must stay: its GEMM handle may point into it.)"""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    if not any(isinstance(m, ParallelLMHead) for m in model.modules()):
        return 0
    dropped = 0
    for m in model.modules():
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead) \
                and getattr(m, "cpu_linear", None) not in (None, _asleep_linear):
            m.cpu_linear = _asleep_linear  # a call would raise, never compute with something stale
            dropped += 1
    return dropped


def _restore_cpu_weights(model):
    for w, nbytes in getattr(model, "_released_storage", []):
        w.untyped_storage().resize_(nbytes)
    model._released_storage = []


def _trim_heap():
    """Give the heap's free pages back to the system (glibc malloc_trim): freed tensors below the mmap threshold
    otherwise stay in this process's RSS, and the next phase (engine weights, gathered tensors) adds to them."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _tied_head(named_tensors, tied, seen, after_embedding=None, trim=None):
    """Pass (name, tensor) through, recording names in `seen`. Tied models: the embedding is also sent as
    `lm_head.weight` right after it (vLLM's CPU backend packs a separate copy of the head, which would
    otherwise stay stale), and any other `lm_head.weight` in the stream is dropped."""
    for k, (name, t) in enumerate(named_tensors):
        if tied and name == "lm_head.weight":
            continue
        seen.add(name)
        yield name, t
        if k % 16 == 15 and trim is not None:
            trim()  # the gathered tensors already loaded (freed) leave the heap, not just the tensors
        if name == "model.embed_tokens.weight" and after_embedding is not None:
            after_embedding()  # the consumer asked for the next tensor: the embedding is loaded (and repacked)
        if tied and name == "model.embed_tokens.weight":
            seen.add("lm_head.weight")
            yield "lm_head.weight", t


def _top_p(logp, p):
    """Renormalised log-probs over the smallest set of most likely tokens with mass >= p (nucleus)."""
    probs, order = logp.exp().sort(-1, descending=True)
    drop = probs.cumsum(-1) - probs >= p
    return logp.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf")).log_softmax(-1)


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _checkpoint_shapes(path):
    """{tensor name: shape} of a local transformers safetensors checkpoint, from its files' headers (None otherwise,
    e.g. a hub id): the names are what `sync` must receive, the shapes give the model's size."""
    path = Path(str(path))
    if (path / "model.safetensors.index.json").exists():
        files = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        return None
    from safetensors import safe_open
    shapes = {}
    for name in files:
        with safe_open(path / name, "pt") as f:
            shapes |= {k: f.get_slice(k).get_shape() for k in f.keys()}
    return shapes


@contextmanager
def _keep_process_state():
    """An in-process vLLM reseeds the global RNGs and disables `torch.set_num_threads` (meant for its own
    worker processes): restore the python, numpy and torch (CPU, current GPU) RNG states and the function."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state(), \
        torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    set_num_threads = torch.set_num_threads
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state(state[3])
        torch.set_num_threads = set_num_threads
