"""The policy: one teacher-forced pass equals step-by-step sampling, and the action mask holds."""
import pytest
import torch

import model as modellib
import rewards
from tasks.smiles.task import SmilesTask


def make_policy(path, min_len=2, max_len=6, lora=False, prompt=""):
    net, tokenizer = modellib.load_model(path, lora=lora)
    allowed = rewards.allowed_token_ids(tokenizer, SmilesTask.charset)
    return modellib.Policy(net, tokenizer, allowed, min_len, max_len, prompt, None if lora else modellib.frozen_copy(net))


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def policy(request):
    torch.manual_seed(0)
    return make_policy(request.getfixturevalue(request.param))


def test_allowlist_is_smiles_text_only(tiny_gpt2):
    p = make_policy(tiny_gpt2)
    texts = list(p.token_texts.values())
    assert texts and all(set(t) <= SmilesTask.charset for t in texts)
    vocab_texts = p.tokenizer.batch_decode([[i] for i in range(len(p.tokenizer))])
    assert any(t.strip() and not set(t) <= SmilesTask.charset for t in vocab_texts)  # something was excluded
    assert p.eos not in p.token_texts


def test_one_pass_log_probs_equal_the_samplers(policy):
    tokens, lengths, log_q = policy.sample(64, temperature=1.0)
    log_pf, log_pterm = policy.log_probs(tokens, lengths)
    T = policy.max_len + 1
    k = torch.arange(T)
    chosen = torch.where(k[None] < lengths[:, None], log_pf, torch.where(k[None] == lengths[:, None], log_pterm, 0.0))
    torch.testing.assert_close(chosen, log_q, atol=1e-5, rtol=1e-5)
    assert (log_pf[k[None] >= lengths[:, None]] == 0).all()
    assert (log_pterm[k[None] > lengths[:, None]] == 0).all()


def test_samples_respect_mask_and_lengths(policy):
    tokens, lengths, _ = policy.sample(200, temperature=2.0)
    assert lengths.min() >= policy.min_len and lengths.max() <= policy.max_len
    allowed = set(policy.token_texts)
    for row, tau in zip(tokens.tolist(), lengths.tolist()):
        assert set(row[:tau]) <= allowed
        assert all(t == policy.eos for t in row[tau:])
    log_pf, log_pterm = policy.log_probs(tokens, lengths)
    assert torch.isneginf(log_pterm[:, :policy.min_len]).all()  # stop is impossible before L_min
    assert (log_pterm[lengths == policy.max_len, policy.max_len] == 0).all()  # and forced at L_max


@pytest.mark.parametrize("uniform", [False, True])
def test_a_state_mask_that_leaves_no_action_is_one_error(tiny_gpt2, uniform):
    """A task mask that forbids every token at a state below L_min (where the stop is not allowed either) is
    reported as such, by the policy's draw and by the masked uniform policy's alike."""
    policy = make_policy(tiny_gpt2, min_len=2)
    A = len(policy.actions)
    policy = policy.with_prompts(policy.prompt, lambda prev, k: torch.full((len(prev), A), k != 1))
    with pytest.raises(ValueError, match="leave no action at a state with 1 tokens"):
        policy.sample(8, uniform=uniform)


def test_masked_distribution_is_normalised(policy):
    logits = torch.randn(3, len(policy.tokenizer))
    for k in range(policy.max_len + 1):
        assert torch.allclose(policy.action_log_probs(logits, k).exp().sum(-1), torch.ones(3))


def test_reference_log_stop_is_prefix_probability(tiny_gpt2):
    p = make_policy(tiny_gpt2)
    tokens, lengths, _ = p.sample(16)
    ref = p.log_ref_stop(tokens, lengths)
    log_pf, log_pterm = p.log_probs(tokens, lengths)  # the policy still equals the reference: no training yet
    for b in range(16):
        for k in range(int(lengths[b]) + 1):
            assert torch.allclose(ref[b, k], log_pf[b, :k].sum() + log_pterm[b, k], atol=1e-5)


def test_lora_reference_is_adapter_free(tiny_llama):
    torch.manual_seed(0)
    p = make_policy(tiny_llama, lora=True)
    tokens, lengths, _ = p.sample(8)
    before = p.log_ref_stop(tokens, lengths)
    for name, param in p.model.named_parameters():
        if "lora_B" in name:  # LoRA starts as the identity (B = 0): perturb it so adapters change the output
            torch.nn.init.normal_(param, std=0.5)
    after = p.log_ref_stop(tokens, lengths)
    log_pf, log_pterm = p.log_probs(tokens, lengths)
    torch.testing.assert_close(before, after)
    assert not torch.allclose(torch.cumsum(log_pf, 1) - log_pf + log_pterm, after)


def test_prompt_is_prepended(tiny_gpt2):
    p = make_policy(tiny_gpt2, prompt="CCO")
    assert len(p.prompt) > 1 and p.prompt[0] == p.tokenizer.bos_token_id
    tokens, lengths, log_q = p.sample(8)
    log_pf, log_pterm = p.log_probs(tokens, lengths)
    assert torch.isfinite(log_pf).all()


@pytest.mark.parametrize("lora", [False, True])
def test_sampling_with_a_prompt_warns_nothing(tiny_llama, lora, recwarn):
    """The cache goes by the name the installed transformers takes: no deprecation warning on every batch."""
    make_policy(tiny_llama, prompt="CCO", lora=lora).sample(4)
    assert not [w for w in recwarn if "past_key_values" in str(w.message)], [str(w.message) for w in recwarn]


def test_unknown_model_is_a_clear_error():
    with pytest.raises(modellib.ModelError, match="cannot load model"):
        modellib.load_model("no-such-org/no-such-model-xyz")
