"""Layer attribution: shapes, finiteness, seeded random, captum grad x act == a manual hook computation,
logit lens == a manual read-out."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from semalign.attribution import attribution_report, gold_logprob, layer_scores, write_layer_scores

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


def manual_grad_x_act(model, batch) -> list[float]:
    outs = []

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        h.retain_grad()
        outs.append(h)

    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        gold_logprob(logits, batch["input_ids"], batch["loss_mask"]).sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    real = batch["attention_mask"].bool()
    return [((h.grad * h).sum(-1)[real].abs().mean()).item() for h in outs]


def test_grad_x_act_matches_manual_hooks(model, batch):
    scores = layer_scores(model, batch, method="grad_x_act", batch_size=2)  # 2 batches: aggregation over batches
    assert len(scores) == L and all(torch.isfinite(torch.tensor(scores)))
    assert scores == pytest.approx(manual_grad_x_act(model, batch), rel=1e-4)


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
    scores = layer_scores(LlamaForCausalLM(cfg), tok, chat_records, method="grad_x_act", max_len=48)
    assert len(scores) == 2 and all(s > 0 for s in scores)


def test_attribution_report_on_a_prepared_teacher(tiny_pair, chat_records, tmp_path):
    scores = attribution_report(tiny_pair[0], chat_records, 48, tmp_path / "a.csv", tmp_path / "a.png", device="cpu")
    assert set(scores) == {"grad_x_act", "logit_lens", "random"} and all(len(v) == 4 for v in scores.values())
    assert (tmp_path / "a.csv").read_text().count("\n") == 1 + 3 * 4
