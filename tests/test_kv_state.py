"""KV cache sequence operations and context state save/load."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lamina
from lamina import _native


def fresh_logits(model: lamina.Model, tokens: list[int], **kw: object) -> np.ndarray:
    with model.context(n_ctx=256, **kw) as ctx:  # type: ignore[arg-type]
        ctx.decode(tokens)
        return np.array(ctx.logits[0])


def test_state_round_trip_gives_identical_logits(tiny_model: lamina.Model, tmp_path: Path) -> None:
    prompt = list(tiny_model.tokenize("the capital of France is"))
    a = tiny_model.context(n_ctx=256)
    a.decode(prompt)
    blob = a.save_state()
    path = tmp_path / "ctx.state"
    assert a.save_state(path) is None and path.read_bytes() == blob
    a.decode([300])
    after_a = np.array(a.logits)
    for source in (blob, path):
        b = tiny_model.context(n_ctx=256)
        b.load_state(source)
        assert list(b.tokens) == prompt
        # the prompt's last logits are recomputed (1-token batch: float-level differences only)
        np.testing.assert_allclose(b.logits[0], fresh_logits(tiny_model, prompt), rtol=1e-5, atol=1e-5)
        b.decode([300])  # the next token: the same computation as in the saving context, bit for bit
        np.testing.assert_array_equal(b.logits, after_a)
    # prefix reuse works on a loaded state
    gen = b.generate(prompt + [300, 301], max_tokens=2)
    list(gen)
    assert gen.stats["n_reused"] == len(prompt) + 1


def test_state_into_other_settings_or_garbage_fails_clearly(tiny_model: lamina.Model) -> None:
    a = tiny_model.context(n_ctx=256)
    a.decode([1, 300, 301])
    blob = a.save_state()
    with pytest.raises(ValueError, match="n_ctx"):
        tiny_model.context(n_ctx=512).load_state(blob)
    with pytest.raises(ValueError, match="type_k"):
        tiny_model.context(n_ctx=256, kv=lamina.KV(type_k="bf16")).load_state(blob)
    b = tiny_model.context(n_ctx=256)
    for bad in (b"", b"junk" * 10, blob[:40], blob[: len(blob) // 2]):
        with pytest.raises((ValueError, lamina.LaminaError)):
            b.load_state(bad)
    b.decode([1, 300])  # still usable


def test_a_damaged_state_is_refused_before_llama_cpp_reads_it(tiny_model: lamina.Model) -> None:
    # saved state is untrusted input: lamina's header accounts for every byte and every token
    import struct

    a = tiny_model.context(n_ctx=256)
    a.decode([1, 300, 301])
    blob = a.save_state()
    b = tiny_model.context(n_ctx=256)
    b.decode([1, 310, 311, 312])
    logits = b.logits.copy()
    head = 8 + 15 * 8
    cases = {
        f"{len(blob) - 1} bytes where the header accounts for {len(blob)}": blob[:-1],
        f"{len(blob) + 1} bytes where the header accounts for {len(blob)}": blob + b"\0",
        "outside the vocabulary": blob[:head] + struct.pack("<i", 10**6) + blob[head + 4:],
        "this lamina reads 'S3'": b"LAMINAS1" + blob[8:],
        "load it with seq=": a.save_state(seq=0),
        "n_tokens": blob[:8 + 11 * 8] + struct.pack("<q", 10**9) + blob[8 + 12 * 8:],
    }
    for why, bad in cases.items():
        with pytest.raises(ValueError, match=why):
            b.load_state(bad)
    # refused before llama.cpp saw it: b's own cache and logits are untouched
    assert b.kv.pos_range(0) == (0, 3) and b.n_past == 4
    np.testing.assert_array_equal(b.logits, logits)


def test_seq_rm_suffix_then_redecode_equals_fresh(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=256)
    ctx.decode([1, 300, 301, 302, 303, 304])
    assert ctx.kv.seq_rm(0, 3, -1)
    assert ctx.n_past == 3 and list(ctx.tokens) == [1, 300, 301]
    ctx.decode([310, 311])
    np.testing.assert_allclose(ctx.logits[0], fresh_logits(tiny_model, [1, 300, 301, 310, 311]), rtol=1e-4, atol=1e-4)
    assert ctx.kv.pos_range(0) == (0, 4)


def test_seq_cp_then_divergent_sequences_stay_correct(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=256, n_seq_max=2)
    prompt = [1, 300, 301, 302]
    ctx.decode(prompt)
    ctx.kv.seq_cp(0, 1)
    ctx.decode([320], seq=1)
    one = np.array(ctx.logits[0])
    ctx.decode([330], seq=0)
    zero = np.array(ctx.logits[0])
    np.testing.assert_allclose(one, fresh_logits(tiny_model, prompt + [320]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(zero, fresh_logits(tiny_model, prompt + [330]), rtol=1e-4, atol=1e-4)
    assert ctx.kv.pos_range(1) == (0, 4) and ctx.kv.pos_range(0) == (0, 4)


def test_kv_ops_validate_their_arguments(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=64)
    ctx.decode([1, 300])
    with pytest.raises(IndexError):
        ctx.kv.seq_rm(5, 0, -1)
    with pytest.raises(IndexError):
        ctx.decode([300], seq=1)
    with pytest.raises(ValueError):
        ctx.kv.seq_rm(0, 5, 2)
    with pytest.raises(ValueError):
        ctx.kv.seq_div(0, 0, -1, 0)
    ctx.kv.clear()
    assert ctx.n_past == 0 and ctx.kv.pos_range(0) == (-1, -1)


def test_seq_add_shift_keeps_positions_consistent(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=256)
    ctx.decode([1, 300, 301, 302, 303])
    assert ctx.kv.can_shift
    assert ctx.kv.seq_rm(0, 1, 3)             # drop two tokens after BOS ...
    ctx.kv.seq_add(0, 3, -1, -2)              # ... and close the gap (context shifting)
    assert ctx.kv.pos_range(0) == (0, 2) and ctx.n_past == 3
    ctx.decode([304])                          # continues at position 3
    assert ctx.kv.pos_range(0) == (0, 3)
    assert _native.kv_can_shift(ctx.native)


@pytest.fixture(scope="module")
def head32_model(tmp_path_factory: pytest.TempPathFactory) -> lamina.Model:
    """Quantized K/V caches need a head size divisible by 32 (the tiny model's is 16)."""
    from tiny_gguf import write_tiny_llama

    return lamina.Model(write_tiny_llama(tmp_path_factory.mktemp("m") / "head32.gguf", n_embd=128, n_head=4,
                                         n_head_kv=2), gpu=False)


@pytest.mark.parametrize("type_kv, bytes_per_32", [("f16", 64), ("q8_0", 34), ("q4_0", 18)])
def test_kv_bytes_match_the_formula(head32_model: lamina.Model, type_kv: str, bytes_per_32: int) -> None:
    info = head32_model.info
    n_ctx = 512
    ctx = head32_model.context(n_ctx=n_ctx, kv=lamina.KV(type_k=type_kv, type_v=type_kv), flash_attn=True)
    head = info.n_embd // info.n_head
    elements = info.n_layer * ctx.n_ctx * 2 * info.n_head_kv * head  # K and V
    assert ctx.kv.bytes == elements * bytes_per_32 // 32
    assert all(m["context"] == 0 or m["host"] for m in ctx.kv.memory())  # CPU only here


def test_estimate_before_creating_equals_what_the_context_allocates(tiny_model: lamina.Model) -> None:
    for kv in (lamina.KV(), lamina.KV(type_k="f32", type_v="bf16")):
        est = tiny_model.estimate_memory(384, kv=kv)
        with tiny_model.context(384, kv=kv) as ctx:
            real = ctx.kv.memory()
        assert est.kv_bytes == sum(int(m["context"]) for m in real) > 0
        assert sum(d.model for d in est.devices) == sum(int(m["model"]) for m in real)
    assert "n_ctx=384" in str(est)


def test_n_ctx_zero_beyond_memory_raises_and_names_the_bytes(tmp_path: Path) -> None:
    from tiny_gguf import write_tiny_llama

    # 4 layers x (64 K + 64 V) x 2 bytes = 1 KiB per token: a training context of 2^25 tokens is 32 GiB
    huge = write_tiny_llama(tmp_path / "long.gguf", n_layer=4, n_head=4, n_head_kv=4, n_ctx=1 << 25)
    with lamina.Model(huge) as model:
        with pytest.raises(lamina.OutOfMemoryError, match=r"n_ctx=0 .*training context") as err:
            model.context(n_ctx=0)
        # the host here; on a GPU machine the device that would hold the cache or its buffers
        assert err.value.device in [d.name for d in lamina.devices()] and err.value.bytes > 32 * 2**30
        with model.context(n_ctx=128) as ctx:  # the model is fine and still usable
            assert ctx.complete("hello", max_tokens=4, ignore_eos=True).finish_reason == "length"


def test_one_sequence_saved_and_loaded_into_another_context(tiny_model: lamina.Model, tmp_path: Path) -> None:
    with tiny_model.context(512, n_seq_max=2) as a:
        a.decode([1, 300, 301, 302], seq=1)
        a.decode([1, 5, 6], seq=0)
        blob = a.save_state(seq=1)
        assert isinstance(blob, bytes)
        a.save_state(tmp_path / "seq1.bin", seq=1)
        whole = a.save_state()
    with tiny_model.context(256) as one:
        with pytest.raises(ValueError, match="n_seq_max=2, this context has 1"):
            one.load_state(blob, seq=0)
    with tiny_model.context(1024, n_seq_max=2) as b:  # another n_ctx: the sequence still fits
        b.load_state(tmp_path / "seq1.bin", seq=0)
        assert b.kv.pos_range(0) == (0, 3) and b.n_past == 4
        b.decode([310])
        np.testing.assert_allclose(b.logits[0], fresh_logits(tiny_model, [1, 300, 301, 302, 310]), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="whole-context state"):
            b.load_state(whole, seq=0)
        with pytest.raises(ValueError, match="not a usable lamina sequence state"):
            b.load_state(b"garbage" * 10, seq=0)
        with pytest.raises(IndexError):
            b.load_state(blob, seq=3)  # this context has two sequences
        # a sequence saved from sequence 0 keeps its token list: the next prompt reuses the prefix
        b.kv.clear()
        b.decode([1, 20, 21, 22])
        own = b.save_state(seq=0)
        b.kv.clear()
        assert isinstance(own, bytes)
        b.load_state(own, seq=0)
        assert list(b.tokens) == [1, 20, 21, 22]
        assert b.complete([1, 20, 21, 22, 23], max_tokens=2, ignore_eos=True).n_prompt_eval == 1


def test_usage_and_capacity_per_sequence(tiny_model: lamina.Model) -> None:
    with tiny_model.context(512, n_seq_max=2) as ctx:
        assert ctx.kv.capacity == 256 and ctx.kv.used(0) == ctx.kv.used(1) == 0
        ctx.decode([1, 5, 6, 7, 8], seq=1)
        ctx.decode([1, 5], seq=0)
        assert (ctx.kv.used(0), ctx.kv.used(1)) == (2, 5)
        ctx.kv.seq_rm(1, 3, -1)
        assert ctx.kv.used(1) == 3
    with tiny_model.context(512, n_seq_max=2, kv=lamina.KV(unified=True)) as ctx:
        assert ctx.kv.capacity == 512


def test_positions_shifted_far_beyond_the_context_cost_no_memory(tiny_model: lamina.Model) -> None:
    # the token mirror follows positions: a shift by 2e9 (or a saved state claiming such a
    # position) once allocated 8 GB for it; now the mirror is dropped and the next prompt starts over
    import resource

    ctx = tiny_model.context(n_ctx=64)
    ctx.decode([1, 300, 301])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ctx.kv.seq_add(0, 0, -1, 2_000_000_000)
    assert ctx.kv.pos_range(0) == (2_000_000_000, 2_000_000_002)
    with pytest.raises(ValueError, match="int32"):  # llama.cpp's positions are int32
        ctx.kv.seq_add(0, 0, -1, 200_000_000)
    blob = ctx.save_state()
    fresh = tiny_model.context(n_ctx=64)
    fresh.load_state(blob)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: no 8 GB mirror
    for c in (ctx, fresh):
        out = c.complete([1, 300, 301, 302], max_tokens=3, ignore_eos=True)
        assert len(out.tokens) == 3 and c.kv.pos_range(0)[0] == 0  # started over at position 0
