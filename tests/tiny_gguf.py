"""Tiny random-weight GGUF models for fast tests and overhead benchmarks.

The vocabulary is a working SentencePiece-style ("llama") one: <unk>/<s>/</s>, all 256 byte
fallback tokens, printable ASCII characters and a few hundred English words, so llama.cpp's
real tokenizer and detokenizer run on it. Weights are random (seeded), so text is gibberish but
every code path of a llama model runs.
"""
from __future__ import annotations

import string
from pathlib import Path

import numpy as np

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or "
    "has had one first new after who their also its two have but been other when there all during into "
    "time more most only over city such may some these would can world year then than about school "
    "many between up under three state through where people known both so while being well including "
    "him team since began history later used part called until each national she because during made "
    "same before great water light sky blue red green color colors primary three France Paris capital "
    "country language model token test hello world small large number"
).split()


def vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types (1 normal, 2 unknown, 3 control, 6 byte)."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)
    pieces = ["▁"] + [c for c in string.ascii_letters + string.digits + string.punctuation]
    seen = set(pieces)
    for w in WORDS:  # every prefix too, so SentencePiece merges can reach whole words
        for p in [w[:k] for k in range(2, len(w) + 1)] + ["▁" + w[:k] for k in range(1, len(w) + 1)]:
            if p not in seen:
                seen.add(p)
                pieces.append(p)
    tokens += pieces
    types += [1] * len(pieces)
    # longer pieces win in SPM merges: score by length
    scores = [0.0] * (3 + 256) + [-100.0 + len(p) for p in pieces]
    return tokens, scores, types


def vocab_bpe() -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE ("gpt2") vocabulary: the 256 byte symbols, merges that build the words
    (with the leading-space symbol), and <|endoftext|> as the control token. Tokens, types, merges."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):  # GPT-2's bytes_to_unicode
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    sym = {b: chr(c) for b, c in zip(bs, cs)}
    tokens = [sym[b] for b in range(256)]
    seen = set(tokens)
    merges: list[str] = []
    for w in WORDS:
        s = "".join(sym[b] for b in (" " + w).encode())
        for k in range(2, len(s) + 1):
            if s[:k] not in seen:
                seen.add(s[:k])
                tokens.append(s[:k])
                merges.append(f"{s[:k - 1]} {s[k - 1]}")
    types = [1] * len(tokens) + [3]
    tokens.append("<|endoftext|>")
    return tokens, types, merges


def write_tiny_llama(path: Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2,
                     n_ff: int = 128, n_ctx: int = 512, n_vocab: int | None = None, f16: bool = False,
                     seed: int = 0, truncate_to: int | None = None, causal: bool = True,
                     arch: str = "llama", tokenizer: str = "llama", n_expert: int = 0,
                     n_expert_used: int = 2, long_piece: int = 0, chat_template: str | None = None,
                     tied: bool = False, special_tokens: tuple[tuple[str, int], ...] = (),
                     eos: str | None = None) -> Path:
    """Write a GGUF with random weights (f32, or f16 for big shapes) of a llama architecture, or
    with arch="gemma3" of Gemma 3's (QK norms, post norms, sliding-window layers), or with
    arch="mamba" a Mamba (a recurrent state per sequence instead of a KV cache; n_head and n_ff unused).

    n_vocab pads the vocabulary with unused tokens to that size (e.g. 128256 for Llama 3 shapes).
    causal=False writes llama.attention.causal = false (bidirectional attention, as embedding models).
    tokenizer="gpt2" writes a byte-level BPE vocabulary with merges instead of SentencePiece's.
    long_piece > 0 adds a last token whose text is that many bytes ("▁" and x's; no merge reaches it).
    chat_template writes tokenizer.chat_template. tied leaves output.weight out (llama.cpp then uses
    token_embd.weight for the output too, as Gemma's files do). special_tokens adds (text, type)
    tokens (type 3 control, 4 user-defined), as a chat model's tags (<|im_start|>, <tool_call>);
    eos names the end-of-generation token among them (default </s>).
    n_expert > 0 makes a mixture of experts (Mixtral's layout: n_expert feed-forward experts per
    layer, n_expert_used of them per token).
    """
    import gguf

    merges: list[str] = []
    if tokenizer == "gpt2":
        tokens, types, merges = vocab_bpe()
        scores = [0.0] * len(tokens)
    else:
        tokens, scores, types = vocab()
    if long_piece:
        tokens.append("▁" + "x" * (long_piece - len("▁".encode())))
        scores.append(-1000.0)
        types.append(1)
    for text, kind in special_tokens:
        tokens.append(text)
        scores.append(0.0)
        types.append(kind)
    if n_vocab is not None and n_vocab > len(tokens):
        pad = n_vocab - len(tokens)
        tokens += [f"<unused{i}>" for i in range(pad)]
        scores += [-1000.0] * pad
        types += [5] * pad  # unused
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    dtype = np.float16 if f16 else np.float32

    def w(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("lamina-tiny")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_layer_norm_rms_eps(1e-5)
    d_inner, d_state, d_conv, dt_rank = 2 * n_embd, 16, 4, max(1, n_embd // 16)
    if arch == "mamba":
        writer.add_feed_forward_length(0)
        writer.add_head_count(0)
        writer.add_ssm_conv_kernel(d_conv)
        writer.add_ssm_inner_size(d_inner)
        writer.add_ssm_state_size(d_state)
        writer.add_ssm_time_step_rank(dt_rank)
    else:
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
    if not causal:
        writer.add_causal_attention(False)
    if arch != "mamba":
        writer.add_rope_dimension_count(n_embd // n_head)
    if n_expert:
        writer.add_expert_count(n_expert)
        writer.add_expert_used_count(n_expert_used)
    if arch == "gemma3":
        writer.add_key_length(n_embd // n_head)
        writer.add_value_length(n_embd // n_head)
        writer.add_sliding_window(16)
        writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model(tokenizer)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if tokenizer == "gpt2":
        writer.add_tokenizer_pre("default")
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|endoftext|>"))
        writer.add_eos_token_id(tokens.index(eos or "<|endoftext|>"))
    else:
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(tokens.index(eos) if eos is not None else 2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    head_dim = n_embd // n_head
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd, scale=0.5))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        if arch == "mamba":  # numpy shapes are ggml's reversed
            writer.add_tensor(f"blk.{i}.ssm_in.weight", w(2 * d_inner, n_embd))
            writer.add_tensor(f"blk.{i}.ssm_conv1d.weight", w(d_inner, d_conv))
            writer.add_tensor(f"blk.{i}.ssm_conv1d.bias", w(d_inner))
            writer.add_tensor(f"blk.{i}.ssm_x.weight", w(dt_rank + 2 * d_state, d_inner))
            writer.add_tensor(f"blk.{i}.ssm_dt.weight", w(d_inner, dt_rank))
            writer.add_tensor(f"blk.{i}.ssm_dt.bias", w(d_inner))
            writer.add_tensor(f"blk.{i}.ssm_a", -np.abs(w(d_inner, d_state, scale=1.0)) - np.float32(0.1))
            writer.add_tensor(f"blk.{i}.ssm_d", np.ones(d_inner, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.ssm_out.weight", w(n_embd, d_inner))
            continue
        writer.add_tensor(f"blk.{i}.attn_q.weight", w(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", w(n_head_kv * head_dim, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", w(n_head_kv * head_dim, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", w(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        if n_expert:
            writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", w(n_expert, n_embd))
            writer.add_tensor(f"blk.{i}.ffn_gate_exps.weight", w(n_expert, n_ff, n_embd))
            writer.add_tensor(f"blk.{i}.ffn_up_exps.weight", w(n_expert, n_ff, n_embd))
            writer.add_tensor(f"blk.{i}.ffn_down_exps.weight", w(n_expert, n_embd, n_ff))
        else:
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(n_ff, n_embd))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", w(n_ff, n_embd))
            writer.add_tensor(f"blk.{i}.ffn_down.weight", w(n_embd, n_ff))
        if arch == "gemma3":
            writer.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.post_attention_norm.weight", np.ones(n_embd, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.post_ffw_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", w(n_vocab, n_embd, scale=1.0))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
    return path


def write_tiny_lora(path: Path, base: Path, *, rank: int = 4, targets: tuple[str, ...] = ("attn_q", "attn_v", "ffn_down"),
                    alpha: float | None = None, scale: float = 0.5, seed: int = 0, arch: str | None = None,
                    f16: bool = False, embd: bool = False, kv: dict[str, tuple[object, object]] | None = None,
                    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None) -> Path:
    """Write a LoRA adapter for the model file ``base`` as llama.cpp's convert_lora_to_gguf.py
    does: general.type "adapter", adapter.type "lora", and for every layer's tensor named in
    ``targets`` a pair <name>.lora_a (ggml shape [n_in, rank]) and .lora_b ([rank, n_out]), random,
    B scaled by ``scale`` (so the adapter changes the logits). embd adds token_embd's pair.

    For malformed adapters: ``arch`` writes another architecture; ``shapes`` replaces pairs'
    shapes ({tensor: (lora_a ggml shape, lora_b ggml shape)}); ``kv`` sets or replaces metadata
    ({key: (value, gguf.GGUFValueType)}).
    """
    import gguf

    reader = gguf.GGUFReader(str(base))
    base_arch = str(reader.fields["general.architecture"].contents())
    ne = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    rng = np.random.default_rng(seed)
    dtype = np.float16 if f16 else np.float32
    writer = gguf.GGUFWriter(str(path), arch or base_arch)
    kv = dict(kv or {})
    for key, default in (("general.type", "adapter"), ("adapter.type", "lora")):
        value, vtype = kv.pop(key, (default, gguf.GGUFValueType.STRING))
        writer.add_key_value(key, value, vtype)
    if alpha is not None:
        writer.add_float32("adapter.lora.alpha", alpha)
    for key, (value, vtype) in kv.items():
        writer.add_key_value(key, value, vtype)

    def pair(name: str, a_ne: tuple[int, ...], b_ne: tuple[int, ...]) -> None:
        a_ne, b_ne = (shapes or {}).get(name, (a_ne, b_ne))
        a = rng.standard_normal(tuple(reversed(a_ne)), dtype=np.float32)
        b = rng.standard_normal(tuple(reversed(b_ne)), dtype=np.float32) * scale
        writer.add_tensor(f"{name}.lora_a", a.astype(dtype))
        writer.add_tensor(f"{name}.lora_b", b.astype(dtype))

    if embd:
        n_embd, n_vocab = ne["token_embd.weight"]
        pair("token_embd.weight", (rank, n_vocab), (rank, n_embd))
    for name, shape in ne.items():
        if name.startswith("blk.") and name.split(".")[2] in targets and len(shape) >= 2:
            pair(name, (shape[0], rank, *shape[2:]), (rank, *shape[1:]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Llama-3.2-1B shape (1.24B parameters with a 128k vocabulary), for GPU benchmarks.
LLAMA_1B = dict(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, n_ctx=8192, n_vocab=128256, f16=True)

# ~125M parameters (12 x 768 wide, 32k vocabulary): CPU thread sweeps on machines without the Gemma package.
SMALL = dict(n_layer=12, n_embd=768, n_head=12, n_head_kv=4, n_ff=2048, n_ctx=4096, n_vocab=32000, f16=True)
# A draft for LLAMA_1B (speculative decoding benchmarks): its 128k vocabulary, 4 narrow layers.
DRAFT_1B = dict(n_layer=4, n_embd=512, n_head=8, n_head_kv=4, n_ff=1024, n_ctx=8192, n_vocab=128256, f16=True)
PRESETS = {"llama-1b": LLAMA_1B, "small": SMALL, "draft-1b": DRAFT_1B}

if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")
    write_tiny_llama(out, **(PRESETS[sys.argv[2]] if len(sys.argv) > 2 else {}))
    print(out)


def write_tiny_bert(path: Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_ff: int = 128,
                    n_ctx_train: int = 64, seed: int = 0, rank: bool = False,
                    rerank_template: str | None = None) -> Path:
    """A BERT-style encoder (non-causal attention, learned positions, mean pooling): llama.cpp runs
    it without a KV cache, so each decode's positions start at 0. rank=True makes it a reranker
    (a cross-encoder: rank pooling of the first token through a classification head, one score);
    rerank_template is its tokenizer.chat_template.rerank ({query}, {document}), as Qwen3-reranker's."""
    import gguf

    tokens, scores, types = vocab()
    rng = np.random.default_rng(seed)
    def w(*shape: int, scale: float = 0.08) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * scale
    ones, zeros = (lambda n: np.ones(n, dtype=np.float32)), (lambda n: np.zeros(n, dtype=np.float32))
    wr = gguf.GGUFWriter(str(path), "bert")
    wr.add_name("tiny-bert")
    wr.add_context_length(n_ctx_train)
    wr.add_embedding_length(n_embd)
    wr.add_block_count(n_layer)
    wr.add_feed_forward_length(n_ff)
    wr.add_head_count(n_head)
    wr.add_layer_norm_eps(1e-12)
    wr.add_causal_attention(False)
    wr.add_pooling_type(gguf.PoolingType.RANK if rank else gguf.PoolingType.MEAN)
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(tokens)
    wr.add_token_scores(scores)
    wr.add_token_types(types)
    wr.add_unk_token_id(0)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_token_type_count(2)
    if rerank_template is not None:
        wr.add_string("tokenizer.chat_template.rerank", rerank_template)
    tensors = {"token_embd.weight": w(len(tokens), n_embd, scale=0.5), "token_types.weight": w(2, n_embd),
               "position_embd.weight": w(n_ctx_train, n_embd), "token_embd_norm.weight": ones(n_embd),
               "token_embd_norm.bias": zeros(n_embd)}
    for i in range(n_layer):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors[f"blk.{i}.{t}.weight"], tensors[f"blk.{i}.{t}.bias"] = w(n_embd, n_embd), zeros(n_embd)
        for t in ("attn_output_norm", "layer_output_norm"):
            tensors[f"blk.{i}.{t}.weight"], tensors[f"blk.{i}.{t}.bias"] = ones(n_embd), zeros(n_embd)
        tensors[f"blk.{i}.ffn_up.weight"], tensors[f"blk.{i}.ffn_up.bias"] = w(n_ff, n_embd), zeros(n_ff)
        tensors[f"blk.{i}.ffn_down.weight"], tensors[f"blk.{i}.ffn_down.bias"] = w(n_embd, n_ff), zeros(n_embd)
    if rank:
        tensors |= {"cls.weight": w(n_embd, n_embd, scale=0.3), "cls.bias": w(n_embd),
                    "cls.output.weight": w(1, n_embd, scale=1.0), "cls.output.bias": w(1)}
    for name, t in tensors.items():
        wr.add_tensor(name, t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


# Chat models: a template family's tags as tokens of a tiny model (byte-level BPE, as those models
# use), its end-of-turn token as EOS, and the real template from the pinned llama.cpp's
# models/templates as tokenizer.chat_template.
CHAT_FAMILIES: dict[str, tuple[str, tuple[tuple[str, int], ...], str]] = {
    "qwen3": ("Qwen-Qwen3-0.6B", (("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool_call>", 4), ("</tool_call>", 4),
                                  ("<think>", 4), ("</think>", 4), ("<tool_response>", 4), ("</tool_response>", 4)),
              "<|im_end|>"),
    "llama3": ("meta-llama-Llama-3.2-3B-Instruct", (("<|begin_of_text|>", 3), ("<|start_header_id|>", 3),
                                                   ("<|end_header_id|>", 3), ("<|eot_id|>", 3), ("<|eom_id|>", 3),
                                                   ("<|python_tag|>", 3)), "<|eot_id|>"),
    "mistral": ("mistralai-Mistral-Nemo-Instruct-2407", (("[INST]", 3), ("[/INST]", 3), ("[TOOL_CALLS]", 3),
                                                        ("[AVAILABLE_TOOLS]", 3), ("[/AVAILABLE_TOOLS]", 3),
                                                        ("[TOOL_RESULTS]", 3), ("[/TOOL_RESULTS]", 3)), "<|endoftext|>"),
    "gpt-oss": ("openai-gpt-oss-120b", (("<|start|>", 3), ("<|end|>", 3), ("<|message|>", 3), ("<|channel|>", 3),
                                        ("<|constrain|>", 3), ("<|return|>", 3), ("<|call|>", 3)), "<|return|>"),
    "r1": ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", (("<｜begin▁of▁sentence｜>", 3), ("<｜end▁of▁sentence｜>", 3),
                                                       ("<｜User｜>", 4), ("<｜Assistant｜>", 4), ("<think>", 4),
                                                       ("</think>", 4)), "<｜end▁of▁sentence｜>"),
}


def write_tiny_chat(path: Path, family: str, templates: Path) -> Path:
    """A tiny model of a CHAT_FAMILIES family, its template read from ``templates``."""
    name, special, eos = CHAT_FAMILIES[family]
    return write_tiny_llama(path, chat_template=(templates / f"{name}.jinja").read_text(), special_tokens=special,
                            eos=eos, tokenizer="gpt2", n_ctx=4096)
