"""Model.rerank on a tiny random cross-encoder (rank pooling through a classification head): the
pairs are put together and scored as llama-server's /v1/rerank does, and the scores equal its."""
from __future__ import annotations

import json
import urllib.request
from typing import Iterator

import numpy as np
import pytest

import lamina
from test_chat_templates import llama_server
from tiny_gguf import write_tiny_bert

QUERY = "the capital of France"
DOCS = ["Paris is the capital of France", "the sky is blue", "water", "a large city in the world", ""]


@pytest.fixture(scope="module", params=["plain", "template"])
def reranker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[lamina.Model]:
    """A reranker without a rerank template (BOS query EOS SEP document EOS), and one with."""
    template = "query: {query} document: {document}</s>" if request.param == "template" else None
    path = write_tiny_bert(tmp_path_factory.mktemp("rerank") / f"{request.param}.gguf", rank=True,
                           rerank_template=template)
    with lamina.Model(path, gpu=False) as model:
        yield model


def test_documents_come_ranked_by_the_heads_score(reranker: lamina.Model) -> None:
    ranked = reranker.rerank(QUERY, DOCS)
    assert sorted(r.index for r in ranked) == list(range(len(DOCS)))
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    assert len({round(r.score, 6) for r in ranked}) == len(DOCS)  # the head does tell them apart
    assert reranker.rerank(QUERY, DOCS, top_n=2) == ranked[:2] and reranker.rerank(QUERY, []) == []
    # the score is the rank pooling's one output for the pair's tokens
    first = reranker.native.rerank_tokens(QUERY, DOCS[0])
    with reranker.context(n_ctx=512, n_batch=512, n_ubatch=512, embeddings=True, pooling="rank") as ctx:
        ctx.native.decode(first, 1)
        head = ctx.native.embedding(0)
    assert head.shape == (1,) and next(r.score for r in ranked if r.index == 0) == pytest.approx(float(head[0]), abs=1e-6)


def test_a_template_or_the_vocabularys_tokens_join_the_pair(reranker: lamina.Model) -> None:
    toks = reranker.native.rerank_tokens("sky", "blue").tolist()
    if "tokenizer.chat_template.rerank" in reranker.metadata:
        assert toks == reranker.tokenize("query: sky document: blue</s>", add_special=False, special=True).tolist()
    else:
        q, d = (reranker.tokenize(t, add_special=False).tolist() for t in ("sky", "blue"))
        assert toks == [1] + q + d  # BOS query document: this vocabulary adds BOS, no EOS or SEP


def test_rerank_refuses_what_it_cannot_rank(reranker: lamina.Model, tiny_model: lamina.Model) -> None:
    with pytest.raises(ValueError, match="not a reranker"):
        tiny_model.rerank(QUERY, DOCS)
    with pytest.raises(TypeError):
        reranker.rerank(QUERY, "one document")
    with pytest.raises(ValueError, match="top_n"):
        reranker.rerank(QUERY, DOCS, top_n=-1)
    with pytest.raises(ValueError, match="more than the model's context"):
        reranker.rerank(QUERY, ["word " * 200])


@pytest.mark.slow
def test_scores_equal_llama_servers(reranker: lamina.Model) -> None:
    """One slot, so llama-server scores each pair alone as lamina does: with its default 4 slots it
    puts pairs of different lengths into one batch, and its scores move by up to 2e-3 here."""
    with llama_server(reranker.path, "--reranking", "-np", 1) as port:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/rerank", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"query": QUERY, "documents": DOCS, "top_n": 3}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            theirs = [(x["index"], x["relevance_score"]) for x in json.loads(r.read())["results"]]
    ours = [(x.index, x.score) for x in reranker.rerank(QUERY, DOCS, top_n=3)]
    assert [i for i, _ in ours] == [i for i, _ in theirs]
    assert np.allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-4, rtol=0), (ours, theirs)
