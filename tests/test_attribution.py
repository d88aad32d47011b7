"""Layer attribution: the state reading == Captum, the contribution reading == the derivative of scaling each
block (autograd on a scale, an independent definition), the last-layer identity, a planted dominant block, logit
lens == a manual read-out."""
import copy
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from semalign.attribution import (
    DEFAULT_METHOD,
    METHODS,
    attribution_report,
    gold_logprob,
    layer_scores,
    write_layer_scores,
)
from semalign.suite.chat import tokenize_records

V, L = 97, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=L, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 8), generator=g)
    attn = torch.tensor([[1] * 8, [1] * 6 + [0] * 2, [1] * 5 + [0] * 3])
    loss = torch.tensor([[0] * 4 + [1] * 3 + [0], [0] * 3 + [1] * 2 + [0] * 3, [0] * 2 + [1] * 2 + [0] * 4])
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def captum_state_scores(model, batch) -> list[float]:
    """The literal reading straight from Captum's LayerGradientXActivation on every decoder layer (the oracle)."""
    from captum.attr import LayerGradientXActivation

    def objective(input_ids, attention_mask, loss_mask):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return gold_logprob(logits, input_ids, loss_mask).sum(-1)

    attrs = LayerGradientXActivation(objective, list(model.model.layers)).attribute(
        batch["input_ids"], additional_forward_args=(batch["attention_mask"], batch["loss_mask"]))
    real = batch["attention_mask"].bool()
    return [a.sum(-1)[real].abs().mean().item() for a in attrs]


def scaling_derivative(model, batch) -> list[float]:
    """mean_t |dJ/dε_{l,t}| at ε = 0, where block l's output is rewired to h_{l-1} + (1 + ε_{l,t}) Δ_l: the
    first-order effect of scaling each token's block contribution, by autograd on ε (no Grad x Act product)."""
    B, T = batch["input_ids"].shape
    eps = [torch.zeros(B, T, 1, dtype=torch.float64, requires_grad=True) for _ in model.model.layers]

    def scaled(k):
        def hook(_m, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h = out[0] if isinstance(out, tuple) else out
            h = h_in + (1 + eps[k]) * (h - h_in)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook

    handles = [layer.register_forward_hook(scaled(k), with_kwargs=True) for k, layer in enumerate(model.model.layers)]
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        grads = torch.autograd.grad(gold_logprob(logits, batch["input_ids"], batch["loss_mask"]).sum(), eps)
    finally:
        for h in handles:
            h.remove()
    real = batch["attention_mask"].bool()
    return [g.squeeze(-1)[real].abs().mean().item() for g in grads]


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


def test_state_reading_matches_captum(model, batch):
    scores = layer_scores(model, batch, method="grad_x_act_state", batch_size=2)  # 2 batches: aggregation
    assert len(scores) == L and all(torch.isfinite(torch.tensor(scores)))
    assert scores == pytest.approx(captum_state_scores(model, batch), rel=1e-4)


def test_contribution_is_the_derivative_of_scaling_each_block(model64, batch):
    scores = layer_scores(model64, batch, method="grad_x_act", batch_size=2)
    assert scores == pytest.approx(scaling_derivative(model64, batch), rel=1e-6)  # products and sums in fp32
    assert layer_scores(model64, batch, method=DEFAULT_METHOD) == pytest.approx(scores, rel=1e-12)


def test_last_layer_state_is_blind_and_contribution_is_not(model64, batch):
    # J reads h_L only through the final RMSNorm; with its epsilon at 0 it is exactly scale-invariant per token,
    # so <h_L, dJ/dh_L> = d/dα J(α h_L) at α = 1 is 0 (an identity): the state reading cannot see the last layer.
    exact = copy.deepcopy(model64)
    exact.model.norm.variance_epsilon = 0.0
    state = layer_scores(exact, batch, method="grad_x_act_state")
    contribution = layer_scores(exact, batch, method="grad_x_act")
    assert state[-1] < 1e-5 * max(state[:-1])  # fp32 rounding of the products (1e-2 with the default epsilon)
    assert contribution[-1] > 0.1 * max(contribution)


def test_frozen_bf16_model_scores_in_fp32(model, batch):
    low = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)  # how a loaded, frozen teacher may come
    scores = layer_scores(low, batch, method="grad_x_act")
    assert scores == pytest.approx(layer_scores(model, batch, method="grad_x_act"), rel=0.1)


@pytest.mark.parametrize("planted", [0, 1, 2])
def test_a_planted_dominant_block_ranks_first(planted, batch):
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=L, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # block `planted` writes 30x more into the residual stream: it dominates the logits
        block = model.model.layers[planted]
        block.self_attn.o_proj.weight.mul_(30.0)
        block.mlp.down_proj.weight.mul_(30.0)
    scores = layer_scores(model, batch, method="grad_x_act")
    assert max(range(L), key=scores.__getitem__) == planted, scores


def test_logit_lens_matches_manual_readout(model, batch):
    scores = layer_scores(model, batch, method="logit_lens")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hs = list(out.hidden_states[:-1])  # embeddings, layers 1..L-1 (pre-norm residual)
        n = batch["loss_mask"][:, 1:].sum().item()
        lp = [gold_logprob(model.lm_head(model.model.norm(h)), batch["input_ids"], batch["loss_mask"]).sum() for h in hs]
        lp.append(gold_logprob(out.logits, batch["input_ids"], batch["loss_mask"]).sum())  # layer L = real output
    expect = [((lp[k] - lp[k - 1]) / n).item() for k in range(1, L + 1)]
    assert scores == pytest.approx(expect, rel=1e-4, abs=1e-6)
    # the gains telescope to the total: log p(gold) of the model minus that of the embeddings read-out
    assert sum(scores) == pytest.approx(((lp[-1] - lp[0]) / n).item(), rel=1e-4)


def test_random_is_seeded_and_writer(model, batch, tmp_path):
    a = layer_scores(model, batch, method="random", seed=5)
    assert a == layer_scores(model, batch, method="random", seed=5) and len(a) == L
    assert a != layer_scores(model, batch, method="random", seed=6)
    with pytest.raises(ValueError, match="unknown attribution method"):
        layer_scores(model, batch, method="saliency")
    write_layer_scores({"grad_x_act": [1.0, 3.0, 2.0], "random": a}, tmp_path / "a.csv", tmp_path / "a.png")
    assert (tmp_path / "a.csv").read_text().splitlines()[1] == "grad_x_act,1,1"
    assert (tmp_path / "a.png").exists() and (tmp_path / "a.pdf").exists()


def test_records_path_uses_shared_tokenisation(tokenizer_dir, chat_records):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32)
    model = LlamaForCausalLM(cfg)
    scores = layer_scores(model, tok, chat_records, method="grad_x_act", max_len=48)
    # the records path scores the answer tokens of the shared tokenisation: equal to that batch, and not to one
    # whose loss mask also covers the prompt
    answers = tokenize_records(tok, chat_records, 48)
    assert scores == pytest.approx(layer_scores(model, answers, method="grad_x_act"), rel=1e-6)
    everything = tokenize_records(tok, chat_records, 48, train_on_inputs=True)
    assert scores != pytest.approx(layer_scores(model, everything, method="grad_x_act"), rel=1e-3)


def test_attribution_report_on_a_prepared_teacher(tiny_pair, chat_records, tmp_path):
    scores = attribution_report(tiny_pair[0], chat_records, 48, tmp_path / "a.csv", tmp_path / "a.png", device="cpu")
    assert list(scores) == list(METHODS) and all(len(v) == 4 for v in scores.values())
    assert (tmp_path / "a.csv").read_text().count("\n") == 1 + len(METHODS) * 4


def test_schema_lists_exactly_the_registered_methods():
    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    items = schema["properties"]["analysis"]["properties"]["attribution_methods"]["items"]
    semalign = schema["properties"]["method_params"]["properties"]["semalign"]["properties"]
    assert items["enum"] == semalign["attribution"]["enum"] == list(METHODS)


def test_bf16_logit_lens_reads_out_in_fp32(model, batch):
    """The lens's per-layer gains are differences of nearby log-probs: on a bf16 model with logits of a trained
    model's size (O(10); here the head scaled up) they must be read out of its states in fp32, not through bf16
    logits (which move a gain by ~0.04 here, against < 1e-3 allowed)."""
    low = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
    store = {}  # the last layer's pre-norm output (hidden_states ends with the final norm's output instead)
    handle = low.model.layers[-1].register_forward_hook(
        lambda _m, _i, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        low.lm_head.weight.mul_(200.0)
        hs = low(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 output_hidden_states=True).hidden_states[:-1]  # embeddings, layers 1..L-1
    handle.remove()
    hs = [*hs, store["h"]]
    scores = layer_scores(low, batch, method="logit_lens")
    n = batch["loss_mask"][:, 1:].sum().item()
    w = low.lm_head.weight.double()
    lp = [gold_logprob(low.model.norm(h).double() @ w.T, batch["input_ids"], batch["loss_mask"]).sum() for h in hs]
    expect = [((lp[k] - lp[k - 1]) / n).item() for k in range(1, L + 1)]
    assert scores == pytest.approx(expect, abs=1e-3)
