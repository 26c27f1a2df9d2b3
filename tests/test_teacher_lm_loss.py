"""teacher/lm_loss.py: the LM head only at positions that predict a trained token."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from teacher.finetune_data import IGNORE_INDEX as IGN  # noqa: E402
from teacher.lm_loss import mean_loss, predicting_positions, token_losses  # noqa: E402


def test_ignore_index_matches_the_collation():
    from teacher import finetune_data, lm_loss

    assert lm_loss.IGNORE_INDEX == finetune_data.IGNORE_INDEX


def test_predicting_positions_is_the_union_shifted_by_one():
    labels = torch.tensor([[IGN, IGN, 5, 6, IGN, IGN],
                           [IGN, IGN, IGN, IGN, 7, IGN]])
    # token 2 is predicted at position 1, token 3 at 2, token 4 at 3; position 0 never (no label at t=1)
    assert predicting_positions(labels).tolist() == [1, 2, 3]
    assert predicting_positions(torch.full((2, 4), IGN)).tolist() == []


@pytest.fixture(scope="module")
def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules=["q_proj", "v_proj"], bias="none",
                                                            task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # LoRA B starts at 0: give it values so gradients reach A
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _batch(answer_only: bool):
    """Three right-padded rows of different lengths; answers = the last 3 real tokens of each row."""
    g = torch.Generator().manual_seed(1)
    lengths = [18, 12, 15]
    ids = torch.zeros(3, 18, dtype=torch.long)
    labels = torch.full((3, 18), IGN)
    mask = torch.zeros(3, 18, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(2, 97, (n,), generator=g)
        mask[b, :n] = 1
        start = n - 3 if answer_only else 0
        labels[b, start:n] = ids[b, start:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "n_prompt": torch.tensor([n - 3 for n in lengths])}


@pytest.mark.parametrize("answer_only", [True, False])
def test_trained_positions_give_hf_loss_and_gradients(lora_model, answer_only):
    batch = _batch(answer_only)
    params = [p for p in lora_model.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        lora_model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    hf = loss_and_grads(lambda: lora_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           labels=batch["labels"]).loss)
    for mode in ("trained", "all"):
        loss, grads = loss_and_grads(lambda: mean_loss(lora_model, batch, mode))
        torch.testing.assert_close(loss, hf[0], rtol=1e-5, atol=1e-6)
        for g, ref in zip(grads, hf[1]):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    tok, nxt, pos = token_losses(lora_model, batch, "trained")
    # answer-only: tokens 9-17 are trained in some row -> positions 8-16 (9 of T-1 = 17)
    assert len(pos) == (9 if answer_only else 17) and tok.shape == nxt.shape == (3, len(pos))
    assert int((nxt != IGN).sum()) == int((batch["labels"][:, 1:] != IGN).sum())  # token 0 is never predicted


def test_loss_sums_agree_between_modes(lora_model):
    from teacher.finetune import loss_sums

    batch = _batch(True)
    with torch.no_grad():
        a, b = loss_sums(lora_model, batch, "trained"), loss_sums(lora_model, batch, "all")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a[:, 1].tolist() == [3.0, 3.0, 3.0] and a[:, 3].tolist() == [3.0, 3.0, 3.0]


def test_unknown_mode_is_refused(lora_model):
    from dllm2rec.errors import ConfigError
    from teacher.finetune import config_identity, load_finetune_config

    with pytest.raises(ValueError, match="logits"):
        token_losses(lora_model, _batch(True), "some")
    with pytest.raises(ConfigError, match="logits"):
        load_finetune_config(None, ["logits=some"])
    # the same loss either way: a finished fine-tune is reused whichever mode asks for it
    assert config_identity(load_finetune_config(None, ["logits=all"])) == config_identity(load_finetune_config(None))
