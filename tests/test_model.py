"""Model metadata, tokenizer, context lifetimes and the zero-copy logits view."""
from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

import lamina


def test_info_reports_the_file_it_loaded(tiny_model: lamina.Model) -> None:
    info = tiny_model.info
    assert info.arch == "llama"
    assert info.n_layer == 2 and info.n_embd == 64 and info.n_head == 4 and info.n_head_kv == 2
    assert info.n_ctx_train == 512
    assert info.bos == 1 and info.eos == 2 and info.add_bos
    assert tiny_model.metadata["general.name"] == "lamina-tiny"


def test_tokenize_detokenize_round_trip(tiny_model: lamina.Model) -> None:
    text = "the sky is blue, and Paris is the capital of France! ünïcödé 🙂"
    toks = tiny_model.tokenize(text)
    assert toks.dtype == np.int32 and toks[0] == tiny_model.info.bos
    assert tiny_model.detokenize(toks[1:]).lstrip(" ") == text
    # whole words from the vocabulary become single tokens
    assert len(tiny_model.tokenize("the capital", add_special=False)) == 2
    assert tiny_model.tokenize("", add_special=False).size == 0


def test_special_tokens_parse_only_when_asked(tiny_model: lamina.Model) -> None:
    plain = tiny_model.tokenize("</s>", add_special=False)
    parsed = tiny_model.tokenize("</s>", add_special=False, special=True)
    assert list(parsed) == [tiny_model.info.eos]
    assert len(plain) > 1


def test_context_keeps_closed_model_alive(tiny_path: Path) -> None:
    m = lamina.Model(tiny_path)
    ctx = m.context(n_ctx=64)
    m.close()
    del m
    gc.collect()
    ctx.decode([1, 300, 301])
    assert ctx.logits.shape == (1, ctx.model.info.n_vocab)


def test_logits_are_a_view_not_a_copy(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=64)
    ctx.decode([1, 300, 301, 302])
    a, b = ctx.logits, ctx.logits
    assert a.shape == (1, tiny_model.info.n_vocab) and a.dtype == np.float32
    assert not a.flags.owndata and not a.flags.writeable
    assert np.shares_memory(a, b)
    kept = np.array(a)
    ctx.decode([303])  # the view follows the newest decode
    assert np.shares_memory(a, ctx.logits)
    assert not np.array_equal(kept, ctx.logits)


def test_logits_for_every_token(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=64)
    toks = tiny_model.tokenize("the sky is blue")
    ctx.decode(toks, logits="all")
    all_rows = np.array(ctx.logits)
    assert all_rows.shape == (len(toks), tiny_model.info.n_vocab)
    # the last row equals the logits of a last-only decode of the same tokens
    ctx2 = tiny_model.context(n_ctx=64)
    ctx2.decode(toks)
    np.testing.assert_allclose(all_rows[-1], ctx2.logits[0], rtol=1e-4, atol=1e-4)


def test_logits_view_outlives_closed_context(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=64)
    ctx.decode([1, 300])
    view = ctx.logits
    expected = np.array(view)
    ctx.close()
    del ctx
    gc.collect()
    np.testing.assert_array_equal(view, expected)  # memory held by the view, no crash


def test_growing_outputs_under_a_live_view_is_refused(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=128)
    ctx.decode([1, 300])
    view = ctx.logits
    with pytest.raises(lamina.LaminaError, match="views of ctx.logits"):
        ctx.decode(list(range(300, 340)), logits="all")
    del view
    gc.collect()
    ctx.decode(list(range(300, 340)), logits="all")
    assert ctx.logits.shape[0] == 40


def test_kv_clear_and_positions(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=64)
    ctx.decode([1, 300, 301])
    ctx.decode([302], logits="none")
    assert ctx.n_past == 4 and list(ctx.tokens) == [1, 300, 301, 302]
    with pytest.raises(lamina.LaminaError, match="no logits"):
        ctx.logits
    ctx.kv_clear()
    assert ctx.n_past == 0


def test_threads_default_and_change(tiny_model: lamina.Model) -> None:
    ctx = tiny_model.context(n_ctx=64)
    assert ctx.threads[0] == lamina.default_threads()
    ctx.set_threads(1, 1)
    assert ctx.params["n_threads"] == 1 and ctx.params["n_threads_batch"] == 1
    ctx.decode([1, 300])


def test_gpu_off_is_cpu_only_and_reports_inert_ngl(tiny_path: Path) -> None:
    with pytest.warns(lamina.InertSettingWarning, match="n_gpu_layers=99 is inert: gpu=False"):
        m = lamina.Model(tiny_path, gpu=False, n_gpu_layers=99)
    assert m.offload.gpu is False and m.offload.layers_effective == 0 and m.offload.devices == []
    assert any("inert" in r for r in m.offload.reasons)


def test_load_progress_is_reported_and_can_cancel(tiny_path: Path) -> None:
    seen: list[float] = []
    lamina.Model(tiny_path, progress=lambda p: seen.append(p) is None)
    assert seen and seen[-1] == pytest.approx(1.0)
    with pytest.raises(lamina.LoadError):
        lamina.Model(tiny_path, progress=lambda p: False)

    def boom(p: float) -> bool:
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        lamina.Model(tiny_path, progress=boom)


def test_contexts_are_freed_without_the_garbage_collector(tiny_path: Path) -> None:
    """No reference cycles: a finished generation releases its context at once (VRAM, RPC buffers)."""
    import weakref

    gc.disable()
    try:
        m = lamina.Model(tiny_path)
        ctx = m.context(n_ctx=64)
        gen = ctx.generate("the sky", max_tokens=4, stop=["never"])
        text = "".join(gen)
        ref = weakref.ref(ctx)
        del ctx, gen
        assert ref() is None, "a reference cycle keeps the context alive"
        assert text is not None
    finally:
        gc.enable()


def test_plan_placement_is_pure_and_needs_no_gpu() -> None:
    """Model's placement is decided by a pure function of its arguments and the device list:
    testable with made-up devices, nothing loaded, no device opened."""
    from lamina.model import plan_placement

    cpu = lamina.Device(0, "CPU", "a CPU", "CPU", "cpu", None, None)
    g0, g1 = (lamina.Device(i, f"CUDA{i - 1}", "a GPU", "CUDA", "gpu", None, None) for i in (1, 2))
    kw: dict[str, object] = dict(gpu=True, n_gpu_layers="auto", main_gpu=0, split_mode="layer", tensor_split=None,
                                 devices=None, tensor_overrides=None, memory_limit=None, rpc=None,
                                 all_devices=[cpu, g0, g1], remote=set())
    plan = plan_placement(**kw)  # type: ignore[arg-type]
    assert plan.use_gpu and [d.name for d in plan.devices] == ["CUDA0", "CUDA1"] and plan.ngl == -1
    off = plan_placement(**{**kw, "gpu": False, "n_gpu_layers": 33})  # type: ignore[arg-type]
    assert not off.use_gpu and off.ngl == 0 and off.inert == ["n_gpu_layers=33 is inert: gpu=False"]
    assert off.native().devices == [] and off.native().n_gpu_layers == 0
    one = plan_placement(**{**kw, "devices": ["CUDA1"], "n_gpu_layers": 5,  # type: ignore[arg-type]
                            "tensor_overrides": [("exps", "cpu"), ("attn", "CUDA1")]})
    assert [d.name for d in one.devices] == ["CUDA1"] and one.overrides == [("exps", -1), ("attn", 2)]
    assert one.native().devices == [2] and one.native().n_gpu_layers == 5
    none = plan_placement(**{**kw, "all_devices": [cpu], "n_gpu_layers": 4},  # type: ignore[arg-type]
                          absent=lambda: "no GPU in this test")
    assert not none.use_gpu and none.reasons[0] == "no GPU in this test: everything stays on the CPU"
    with pytest.raises(ValueError, match="split buffers, which CUDA0, CUDA1"):
        plan_placement(**{**kw, "split_mode": "row", "n_gpu_layers": 3}, row_split=lambda i: False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="main_gpu=2"):
        plan_placement(**{**kw, "split_mode": "none", "main_gpu": 2, "n_gpu_layers": 3})  # type: ignore[arg-type]


def test_the_offload_report_is_readable_after_close_and_bad_ints_name_their_field(tiny_path: Path) -> None:
    model = lamina.Model(tiny_path, gpu=False)
    model.close()
    assert model.offload.layers_effective == 0 and model.offload.gpu is False  # made lazily, after close too
    with pytest.raises(ValueError, match="main_gpu"):
        lamina.Model(tiny_path, main_gpu=2**40)
    with pytest.raises(TypeError, match="main_gpu"):
        lamina.Model(tiny_path, main_gpu=True)
    with lamina.Model(tiny_path, gpu=False) as m, pytest.raises(TypeError, match="Sampler.top_k"):
        lamina.Sampler(top_k=2**40).native(m)
