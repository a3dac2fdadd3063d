"""LoRA adapters: load once per model, apply with a scale, hot-swap on a running context; a
malformed or mismatched adapter raises (never aborts)."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

import lamina
from tiny_gguf import write_tiny_llama, write_tiny_lora

PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def adapters(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("lora")
    return (write_tiny_lora(d / "a.gguf", tiny_path, seed=1),
            write_tiny_lora(d / "b.gguf", tiny_path, seed=2, targets=("attn_k", "ffn_up"), embd=True, alpha=8.0))


def last_logits(ctx: lamina.Context, tokens: np.ndarray | None = None) -> np.ndarray:
    ctx.kv_clear()
    ctx.decode(ctx.model.tokenize(PROMPT) if tokens is None else tokens)
    return np.array(ctx.logits[-1])


def greedy(ctx: lamina.Context, n: int = 16) -> list[int]:
    g = ctx.generate(PROMPT, max_tokens=n, ignore_eos=True)
    "".join(g)
    return list(g.tokens)


def test_scale_zero_is_no_adapter_and_a_scale_changes_the_logits(tiny_model: lamina.Model, adapters) -> None:
    lora = tiny_model.load_lora(adapters[0])
    with tiny_model.context(n_ctx=256) as ctx:
        plain = last_logits(ctx)
        ctx.set_lora({lora: 0.0})
        assert ctx.lora == {}
        assert np.array_equal(last_logits(ctx), plain)
        ctx.set_lora({lora: 1.0})
        assert ctx.lora == {lora: 1.0}
        one = last_logits(ctx)
        assert np.abs(one - plain).max() > 1e-2
        ctx.set_lora({lora: 0.5})
        half = last_logits(ctx)
        assert np.abs(half - plain).max() > 1e-3 and np.abs(half - one).max() > 1e-3
        ctx.set_lora(None)
        assert np.array_equal(last_logits(ctx), plain)


def test_swapping_adapters_between_generations(tiny_model: lamina.Model, adapters) -> None:
    a, b = (tiny_model.load_lora(p) for p in adapters)
    with tiny_model.context(n_ctx=256, lora={a: 1.0}) as ctx:
        first_a = greedy(ctx)
        ctx.set_lora({b: 1.0})
        assert ctx.n_past == 0  # the cache held keys and values of the old weights
        with_b = greedy(ctx)
        ctx.set_lora([(a, 1.0)])
        assert greedy(ctx) == first_a
        ctx.set_lora({a: 1.0, b: 0.5})
        both = greedy(ctx)
        ctx.set_lora(None)
        plain = greedy(ctx)
    # each equals a fresh context with that set: nothing of the previous adapter survived the swap
    for spec, want in (({b: 1.0}, with_b), ([(a, 1.0), (b, 0.5)], both), (None, plain)):
        with tiny_model.context(n_ctx=256, lora=spec) as fresh:
            assert greedy(fresh) == want
    assert len({tuple(first_a), tuple(with_b), tuple(plain)}) == 3


def test_the_same_set_again_keeps_the_cache(tiny_model: lamina.Model, adapters) -> None:
    lora = tiny_model.load_lora(adapters[0])
    with tiny_model.context(n_ctx=256, lora=lora) as ctx:
        assert ctx.lora == {lora: 1.0}
        ctx.decode(tiny_model.tokenize(PROMPT))
        n = ctx.n_past
        ctx.set_lora({lora: 1.0})
        assert ctx.n_past == n
        ctx.set_lora({lora: 2.0})
        assert ctx.n_past == 0


def test_batcher_with_an_adapter_matches_generate(tiny_model: lamina.Model, adapters) -> None:
    lora = tiny_model.load_lora(adapters[1])
    with tiny_model.context(n_ctx=256, lora={lora: 1.0}) as ctx:
        want = greedy(ctx, 12)
    with lamina.Batcher(tiny_model, n_seq_max=2, n_ctx=512, lora={lora: 1.0}) as batcher:
        reqs = [batcher.submit(PROMPT, max_tokens=12, ignore_eos=True) for _ in range(2)]
        assert [list(r.result(timeout=60).tokens) for r in reqs] == [want, want]


def test_misuse_raises(tiny_model: lamina.Model, tiny_path: Path, adapters) -> None:
    lora = tiny_model.load_lora(adapters[0])
    with tiny_model.context(n_ctx=256) as ctx:
        with pytest.raises(TypeError):
            ctx.set_lora({"a.gguf": 1.0})  # type: ignore[dict-item]
        with pytest.raises(TypeError):
            ctx.set_lora({lora: "1"})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="finite"):
            ctx.set_lora({lora: float("nan")})
        with pytest.raises(ValueError, match="twice"):
            ctx.set_lora([(lora, 1.0), (lora, 0.5)])
        # the same file loaded by another Model object is another model's adapter
        with lamina.Model(tiny_path, gpu=False) as other:
            foreign = other.load_lora(adapters[0])
            with pytest.raises(ValueError, match="another model"):
                ctx.set_lora({foreign: 1.0})
        assert ctx.lora == {}
        closed = tiny_model.load_lora(adapters[0])
        closed.close()
        with pytest.raises(lamina.ClosedError):
            ctx.set_lora({closed: 1.0})
        # closing an adapter a context applies: the context keeps it
        ctx.set_lora({lora: 1.0})
        before = last_logits(ctx)
        lora.close()
        assert np.array_equal(last_logits(ctx), before)
    with pytest.raises(FileNotFoundError):
        tiny_model.load_lora(tiny_path.parent / "missing.gguf")


def test_the_adapter_outlives_its_model_and_contexts(tiny_path: Path, adapters) -> None:
    model = lamina.Model(tiny_path, gpu=False)
    lora = model.load_lora(adapters[0])
    ctx = model.context(n_ctx=128, lora={lora: 1.0})
    tokens = model.tokenize(PROMPT)
    want = last_logits(ctx, tokens)
    model.close()
    del model
    gc.collect()
    assert np.array_equal(last_logits(ctx, tokens), want)  # the context keeps model and adapter alive
    ctx.close()
    gc.collect()
    lora.close()  # the adapter is freed before the model it belongs to


def _raw_adapter(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """An adapter with exactly these tensors (numpy shapes: ggml's reversed)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_malformed_and_mismatched_adapters_raise(tiny_model: lamina.Model, tiny_path: Path, tmp_path: Path) -> None:
    """Each of these aborted llama.cpp (an assert in its loader, or in the first decode's graph), is
    llama.cpp's own refusal, or (NaN / inf data) would make every logit NaN; here all are
    exceptions, and the model stays usable."""
    S, F, U = gguf.GGUFValueType.STRING, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.UINT32
    wide = write_tiny_llama(tmp_path / "wide.gguf", n_embd=128, n_head=4, n_head_kv=2)
    moe = write_tiny_llama(tmp_path / "moe.gguf", n_expert=4)
    q = "blk.0.attn_q.weight"
    f32 = np.float32

    def lora(name: str, base: Path = tiny_path, **kw: object) -> Path:
        return write_tiny_lora(tmp_path / f"{name}.gguf", base, **kw)  # type: ignore[arg-type]

    good = lora("good")
    with tiny_model.context(n_ctx=128) as ctx:
        plain = last_logits(ctx)
        with tiny_model.load_lora(good) as first:
            ctx.set_lora(first)
            want = last_logits(ctx)
    assert np.abs(want - plain).max() > 1e-3
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases: list[tuple[Path, type[Exception], str]] = [
        (lora("arch", arch="qwen2"), lamina.LoadError, "arch"),
        (lora("shapes", wide), lamina.ModelFormatError, "do not fit"),
        (lora("rank", shapes={q: ((64, 4), (8, 64))}), lamina.ModelFormatError, "do not fit"),
        (lora("3d", shapes={q: ((64, 4, 2), (4, 64, 2))}), lamina.ModelFormatError, "do not fit"),
        (lora("embd_rank", embd=True, shapes={"token_embd.weight": ((4, 1025), (6, 64))}),
         lamina.ModelFormatError, "do not fit"),
        (lora("type_int", kv={"general.type": (7, U)}), lamina.ModelFormatError, "general.type"),
        (lora("not_adapter", kv={"general.type": ("model", S)}), lamina.ModelFormatError, "'model', not 'adapter'"),
        (lora("adapter_type", kv={"adapter.type": (1, U)}), lamina.ModelFormatError, "adapter.type"),
        (lora("arch_int", kv={"general.architecture": (3, U)}), lamina.ModelFormatError, "general.architecture"),
        (lora("alpha_str", kv={"adapter.lora.alpha": ("8", S)}), lamina.ModelFormatError, "alpha"),
        (lora("alpha_nan", kv={"adapter.lora.alpha": (float("nan"), F)}), lamina.ModelFormatError, "alpha"),
        (tiny_path, lamina.ModelFormatError, r"not a LoRA adapter \(a model file\?\)"),
        (_raw_adapter(tmp_path / "int.gguf", {f"{q}.lora_a": np.ones((4, 64), np.int32),
                                              f"{q}.lora_b": np.ones((64, 4), f32)}), lamina.ModelFormatError, "type i32"),
        (_raw_adapter(tmp_path / "half.gguf", {f"{q}.lora_a": np.ones((4, 64), f32)}), lamina.LoadError, "missing one"),
        (_raw_adapter(tmp_path / "unknown.gguf", {"blk.9.attn_q.weight.lora_a": np.ones((4, 64), f32),
                                                  "blk.9.attn_q.weight.lora_b": np.ones((64, 4), f32)}),
         lamina.ModelFormatError, "no tensor 'blk.9.attn_q.weight'"),
        (truncated, lamina.ModelFormatError, "end"),
        (_raw_adapter(tmp_path / "nan.gguf", {f"{q}.lora_a": np.full((4, 64), np.nan, f32),
                                              f"{q}.lora_b": np.ones((64, 4), f32)}), lamina.ModelFormatError, "NaN"),
        (_raw_adapter(tmp_path / "inf16.gguf", {f"{q}.lora_a": np.ones((4, 64), np.float16),
                                                f"{q}.lora_b": np.full((64, 4), np.inf, np.float16)}),
         lamina.ModelFormatError, "lora_b'.*infinite"),
    ]
    for path, exc, words in cases:
        with pytest.raises(exc, match=words):
            tiny_model.load_lora(path)
    # too few experts: llama.cpp checks ne[0] and ne[1] only, and the kernel would read past them
    experts = lora("experts", moe, targets=("ffn_up_exps",), shapes={"blk.0.ffn_up_exps.weight": ((64, 4, 2), (4, 128, 2))})
    with lamina.Model(moe, gpu=False) as m, pytest.raises(lamina.ModelFormatError, match="do not fit"):
        m.load_lora(experts)
    # the model is still usable: the good adapter loads again and gives the logits it gave before
    with tiny_model.context(n_ctx=128, lora={tiny_model.load_lora(good): 1.0}) as ctx:
        assert np.array_equal(last_logits(ctx), want)
        ctx.set_lora(None)
        assert np.array_equal(last_logits(ctx), plain)


def test_an_expert_adapter_with_every_expert_works(tmp_path: Path) -> None:
    moe = write_tiny_llama(tmp_path / "moe.gguf", n_expert=4)
    path = write_tiny_lora(tmp_path / "moe_lora.gguf", moe, targets=("ffn_up_exps", "attn_q"))
    with lamina.Model(moe, gpu=False) as model, model.context(n_ctx=128) as ctx:
        plain = last_logits(ctx)
        ctx.set_lora(model.load_lora(path))
        assert np.abs(last_logits(ctx) - plain).max() > 1e-3


def test_config_lora_list(tiny_path: Path, adapters, tmp_path: Path) -> None:
    (tmp_path / "adapters").mkdir()
    a = tmp_path / "adapters" / "a.gguf"
    a.write_bytes(adapters[0].read_bytes())
    yml = tmp_path / "model.yml"
    yml.write_text(textwrap.dedent(f"""\
        model: {tiny_path}
        gpu: false
        lora:
          - path: adapters/a.gguf
            scale: 0.5
          - {adapters[1]}
        """))
    cfg = lamina.load_config(yml)
    assert cfg["lora"] == [(str(a), 0.5), (str(adapters[1]), 1.0)]
    model = lamina.Model.from_config(cfg)
    with model, model.context(n_ctx=256) as ctx:
        assert sorted(ctx.lora.values()) == [0.5, 1.0]
        configured = last_logits(ctx)
        ctx.set_lora(None)
        assert np.abs(last_logits(ctx) - configured).max() > 1e-3
        ctx.set_lora({model.load_lora(a): 0.5, model.load_lora(adapters[1]): 1.0})
        assert np.allclose(last_logits(ctx), configured, atol=1e-5)
        with model.context(n_ctx=256, lora=None) as ctx2:  # None: the config's
            assert len(ctx2.lora) == 2
    for bad, words in (("lora: [{path: adapters/a.gguf, scale: x}]", "number"),
                       ("lora: [{file: adapters/a.gguf}]", "path and scale"),
                       ("lora: [adapters/a.gguf, adapters/a.gguf]", "twice"),
                       ("lora: [adapters/none.gguf]", "does not exist")):
        yml.write_text(f"model: {tiny_path}\n{bad}\n")
        with pytest.raises((ValueError, FileNotFoundError), match=words) as info:
            lamina.load_config(yml)
        assert "model.yml:2" in str(info.value)


def test_swap_in_a_subprocess_leaves_no_abort_at_exit(tiny_path: Path, adapters) -> None:
    """Exit with adapters, contexts and the model still alive, in any order of collection."""
    code = textwrap.dedent(f"""
        import lamina
        m = lamina.Model({str(tiny_path)!r}, gpu=False)
        a = m.load_lora({str(adapters[0])!r})
        c = m.context(n_ctx=128, lora={{a: 1.0}})
        c.decode(m.tokenize("hi"))
        b = m.load_lora({str(adapters[1])!r})
        print("ok")
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_saved_states_remember_the_adapters(tiny_model: lamina.Model, adapters) -> None:
    a, b = (tiny_model.load_lora(p) for p in adapters)
    with tiny_model.context(n_ctx=256, lora={a: 1.0}) as ctx:
        want = last_logits(ctx)
        whole, seq = ctx.save_state(), ctx.save_state(seq=0)
        for spec in (None, {b: 1.0}, {a: 0.5}):
            ctx.set_lora(spec)
            with pytest.raises(ValueError, match="LoRA"):
                ctx.load_state(whole)
            with pytest.raises(ValueError, match="LoRA"):
                ctx.load_state(seq, seq=0)
        ctx.set_lora({a: 1.0})
        ctx.load_state(whole)
        np.testing.assert_allclose(ctx.logits[-1], want, rtol=1e-4, atol=1e-4)


def test_adapters_llama_cpp_would_misapply_are_refused(tmp_path: Path) -> None:
    """A token_embd pair on a model whose output matrix is token_embd (no output.weight, as Gemma's
    files): llama.cpp applies the pair to the output matmul too, where it aborts. And names with
    '.lora_b' inside: llama.cpp strips every occurrence, pairing a tensor nobody checked."""
    tied = write_tiny_llama(tmp_path / "tied.gguf", tied=True)
    with lamina.Model(tied, gpu=False) as model:
        embd = write_tiny_lora(tmp_path / "embd.gguf", tied, embd=True, targets=())
        with pytest.raises(lamina.ModelFormatError, match="no output.weight"):
            model.load_lora(embd)
        ok = model.load_lora(write_tiny_lora(tmp_path / "q.gguf", tied))  # other tensors are fine
        with model.context(n_ctx=64, lora=ok) as ctx:
            assert np.isfinite(last_logits(ctx)).all()
    q = "blk.0.attn_q.weight"
    inner = _raw_adapter(tmp_path / "inner.gguf", {f"{q}.lora_a": np.ones((4, 64), np.float32),
                                                   "blk.0.attn_q.lora_b.weight.lora_b": np.ones((2, 64, 4), np.float32)})
    with lamina.Model(write_tiny_llama(tmp_path / "m.gguf"), gpu=False) as model:
        with pytest.raises(lamina.ModelFormatError, match="inside the name"):
            model.load_lora(inner)


def test_the_model_file_must_still_be_the_one_loaded(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf")
    lora = write_tiny_lora(tmp_path / "a.gguf", path)
    with lamina.Model(path, gpu=False) as model:
        write_tiny_llama(tmp_path / "other.gguf", n_embd=128)
        (tmp_path / "other.gguf").replace(path)  # the adapter would be checked against another file
        with pytest.raises(lamina.LoadError, match="changed since the model was loaded"):
            model.load_lora(lora)


def test_states_compare_adapters_by_content_and_scales_by_value(tiny_model: lamina.Model, tiny_path: Path,
                                                                tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = write_tiny_lora(tmp_path / "x" / "same.gguf", tiny_path, seed=1)
    b = write_tiny_lora(tmp_path / "y" / "same.gguf", tiny_path, seed=2)  # same name and size, other weights
    assert a.stat().st_size == b.stat().st_size
    la, lb = tiny_model.load_lora(a), tiny_model.load_lora(b)
    with tiny_model.context(n_ctx=128, lora={la: 1.0}) as ctx:
        last_logits(ctx)
        state = ctx.save_state()
        ctx.set_lora({lb: 1.0})
        with pytest.raises(ValueError, match="LoRA"):
            ctx.load_state(state)
        ctx.set_lora({tiny_model.load_lora(a): np.float32(1.0)})  # the same file loaded again; a numpy scale
        ctx.load_state(state)
        with pytest.raises(ValueError, match="twice"):
            ctx.set_lora([(la, 1.0), (la, 0.0)])
        with pytest.raises(ValueError, match="twice"):
            ctx.set_lora([(la, 0.0), (la, 1.0)])


def test_a_generation_open_across_a_swap_raises(tiny_model: lamina.Model, adapters) -> None:
    lora = tiny_model.load_lora(adapters[0])
    with tiny_model.context(n_ctx=256) as ctx:
        g = ctx.generate(PROMPT, max_tokens=20, ignore_eos=True)
        next(g)
        ctx.set_lora({lora: 1.0})  # clears the cache this generation continues from
        with pytest.raises(lamina.StaleGenerationError, match=r"set_lora\(\) \(the adapters changed"):
            next(g)
        assert g.finish_reason == "error"
        with pytest.raises(StopIteration):
            next(g)
        h = ctx.generate(PROMPT, max_tokens=5, ignore_eos=True)
        next(h)
        ctx.set_lora({lora: 1.0})  # the same set: nothing changed, the generation goes on
        "".join(h)
        assert h.finish_reason == "length" and len(h.tokens) == 5
        with tiny_model.context(n_ctx=256, lora={lora: 1.0}) as fresh:
            assert list(h.tokens) == greedy(fresh, 5)  # as if nothing had happened
