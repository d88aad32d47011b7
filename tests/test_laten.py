"""LaTen: translator shapes, logit-lens attribution against naive computations, delta placement, hooks = edited
weights, and end to end that the saved student is the original plus the saved delta."""
import copy
import csv
import json

import pytest
import torch

from baselines.laten import (
    KnowledgeTranslator,
    LaTenConfig,
    Located,
    applied,
    attribution_input,
    block_scores,
    build_deltas,
    capture,
    commit_deltas,
    locate,
    neuron_scores,
    target_logprob,
)
from semalign.suite.io import write_jsonl
from semalign.suite.models import load_model
from semalign.suite.pipeline import run_preparation
from semalign.suite.registry import TransferContext, get_method


def test_config_validates():
    assert LaTenConfig(betas=[0.9, 0.95], modules=["up_proj"]).betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="modules"):
        LaTenConfig(modules=("q_proj",))
    with pytest.raises(ValueError, match="transfer_rate"):
        LaTenConfig(transfer_rate=0.0)


def test_translator_shapes_and_near_zero_init():
    torch.manual_seed(0)
    tr = KnowledgeTranslator(("up_proj", "down_proj"), d_teacher=8, d_student=4, init_std=1e-5)
    vecs = {"up_proj": torch.randn(3, 5, 8), "down_proj": torch.randn(3, 7, 8)}  # row- and column-type modules
    out = tr(vecs)
    assert out["up_proj"].shape == (3, 5, 4) and out["down_proj"].shape == (3, 7, 4)
    assert 0 < out["up_proj"].abs().max() < 1e-8
    # each neuron vector is mapped on its own: translating one alone gives its row of the batch
    alone = tr({"down_proj": vecs["down_proj"][1:2, 4:5]})["down_proj"]
    assert torch.allclose(alone[0, 0], out["down_proj"][1, 4])
    for p in tr.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    assert tr(vecs)["up_proj"].abs().max() > 1e-3


@pytest.fixture
def teacher_example(tiny_pair, chat_records):
    model, tok = load_model(tiny_pair[0])
    model.set_attn_implementation("eager")  # for the test's own attention weights
    ids, target = attribution_input(tok, chat_records[0], max_len=64)
    return model, ids, target


def test_attribution_input_targets_last_answer_token(tiny_pair, chat_records):
    _, tok = load_model(tiny_pair[0])
    ids, target = attribution_input(tok, chat_records[0], max_len=64)  # answer "So the answer is 5."
    assert tok.decode([target]) == "5"
    assert tok.decode(ids[0]).endswith("So the answer is ")
    assert attribution_input(tok, chat_records[0], max_len=4)[0].shape == (1, 4)


def _naive_internals(model, ids):
    """Per-layer (x, mid, c, head values [n_heads, hd], final residual) at the last position, without laten's
    hooks: hidden states + eager attention weights, and the FFN recomputed from the mid stream."""
    mids, values = [], []
    layers = model.model.layers
    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, a: mids.append(a[0][0, -1]))
             for layer in layers]
    vs = []
    hooks += [layer.self_attn.v_proj.register_forward_hook(lambda _m, _a, out: vs.append(out[0])) for layer in layers]
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    for h in hooks:
        h.remove()
    n_heads, hd = model.config.num_attention_heads, layers[0].self_attn.head_dim
    n_rep = n_heads // model.config.num_key_value_heads
    for l, attn_w in enumerate(out.attentions):  # attn_w [1, n_heads, T, T]
        V = vs[l].view(vs[l].shape[0], -1, hd)  # [T, n_kv, hd]
        values.append(torch.stack([attn_w[0, h, -1] @ V[:, h // n_rep] for h in range(n_heads)]))
    with torch.no_grad():
        cs = [layer.mlp.act_fn(layer.mlp.gate_proj(n)) * layer.mlp.up_proj(n)
              for layer, n in zip(layers, (layer.post_attention_layernorm(m) for layer, m in zip(layers, mids)))]
    xs = [h[0, -1] for h in out.hidden_states[: len(layers)]]
    final = mids[-1] + layers[-1].mlp(layers[-1].post_attention_layernorm(mids[-1]))
    return xs, mids, cs, values, final


def test_neuron_scores_equal_naive_loop(teacher_example):
    model, ids, t = teacher_example
    cap = capture(model, ids)
    xs, mids, cs, values, _ = _naive_internals(model, ids)
    n_heads, hd = values[0].shape
    n_rep = n_heads // model.config.num_key_value_heads
    lp = lambda v: target_logprob(model, v[None], t)[0]  # noqa: E731
    with torch.no_grad():
        for l, layer in enumerate(model.model.layers):
            assert torch.allclose(cap.x[l], xs[l], atol=1e-6) and torch.allclose(cap.mid[l], mids[l], atol=1e-6)
            W_down, W_o = layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight
            # the o_proj input is the full weighted sum over keys, so the neurons add up to the attention output
            assert torch.allclose(cap.o_in[l], values[l].flatten(), atol=1e-6)
            assert torch.allclose((cap.o_in[l, :, None] * W_o.T).sum(0), cap.attn[l], atol=1e-6)
            ffn = torch.stack([lp(mids[l] + cs[l][i] * W_down[:, i]) - lp(mids[l]) for i in range(W_down.shape[1])])
            o = torch.stack([lp(xs[l] + values[l][h, j] * W_o[:, h * hd + j]) - lp(xs[l])
                             for h in range(n_heads) for j in range(hd)])
            v = torch.stack([lp(xs[l] + sum(values[l][h, j] * W_o[:, h * hd + j]
                                            for h in range(g * n_rep, (g + 1) * n_rep))) - lp(xs[l])
                             for g in range(n_heads // n_rep) for j in range(hd)])
            for kind, naive in (("ffn", ffn), ("o", o), ("v", v)):
                got = neuron_scores(model, cap, t, kind, l)
                assert got.shape == naive.shape and naive.abs().max() > 1e-3, kind
                assert torch.allclose(got, naive, atol=1e-5), (kind, l, (got - naive).abs().max())


def test_block_scores_match_direct_logit_lens(teacher_example):
    model, ids, t = teacher_example
    cap = capture(model, ids)
    attn, ffn = block_scores(model, cap, t)
    xs, mids, _, _, final = _naive_internals(model, ids)
    ends = [*xs[1:], final]  # residual stream after each layer
    with torch.no_grad():
        lp = lambda v: torch.log_softmax(model.lm_head(model.model.norm(v)), -1)[t]  # noqa: E731
        direct_attn = torch.stack([lp(mids[l]) - lp(xs[l]) for l in range(len(xs))])
        direct_ffn = torch.stack([lp(ends[l]) - lp(mids[l]) for l in range(len(xs))])
        model_lp = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)[t]
    assert torch.allclose(attn, direct_attn, atol=1e-6) and torch.allclose(ffn, direct_ffn, atol=1e-6)
    # the lens is the model's real final norm + head: at the last layer it is the model's own prediction
    assert torch.allclose(lp(xs[0]) + (attn + ffn).sum(), model_lp, atol=1e-5)


def test_locate_selects_top_layers_and_neurons(teacher_example):
    model, ids, t = teacher_example
    where = locate(model, ids, t, n_layers=2, counts={"up_proj": 5, "o_proj": 3})
    attn, ffn = block_scores(model, capture(model, ids), t)
    assert where.layers["ffn"].tolist() == sorted(ffn.topk(2).indices.tolist())
    assert where.layers["attn"].tolist() == sorted(attn.topk(2).indices.tolist())
    l = int(where.layers["ffn"][1])
    scores = neuron_scores(model, capture(model, ids), t, "ffn", l)
    assert where.neurons["up_proj"].shape == (2, 5)
    assert where.neurons["up_proj"][1].tolist() == scores.argsort(descending=True)[:5].tolist()
    with pytest.raises(ValueError, match="cannot select 5 layers"):
        locate(model, ids, t, n_layers=5, counts={"up_proj": 1})


def _random_deltas(student, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    counts = {"up_proj": 6, "down_proj": 6, "v_proj": 2, "o_proj": 3}
    sizes = {"up_proj": 64, "down_proj": 64, "v_proj": 16, "o_proj": 32}
    where = Located({"ffn": torch.tensor([0, 1]), "attn": torch.tensor([0, 1])},
                    {m: torch.stack([torch.randperm(sizes[m], generator=g)[:k] for _ in range(2)])
                     for m, k in counts.items()})
    translated = {m: (scale * torch.randn(2, k, 32, generator=g)).requires_grad_() for m, k in counts.items()}
    return where, translated, build_deltas(student, where, translated)


def test_build_deltas_writes_only_selected_slots(tiny_pair):
    student, _ = load_model(tiny_pair[1])
    where, translated, deltas = _random_deltas(student)
    assert len(deltas) == 4 * 2
    for m in ("up_proj", "down_proj", "v_proj", "o_proj"):
        for j in range(2):
            parent = "mlp" if m in ("up_proj", "down_proj") else "self_attn"
            d = deltas[f"model.layers.{j}.{parent}.{m}.weight"]
            assert d.shape == student.get_parameter(f"model.layers.{j}.{parent}.{m}.weight").shape
            idx, vecs = where.neurons[m][j], translated[m][j]
            rows = m in ("up_proj", "v_proj")
            assert torch.equal(d[idx] if rows else d[:, idx].T, vecs)  # rank r -> the r-th chosen slot
            rest = torch.ones(d.shape[0 if rows else 1], dtype=torch.bool)
            rest[idx] = False
            assert not (d[rest] if rows else d[:, rest]).any()


def test_hooked_delta_equals_edited_weights_and_grads_reach_translated_only(tiny_pair, chat_records):
    student, tok = load_model(tiny_pair[1])
    student.requires_grad_(False)
    _, translated, deltas = _random_deltas(student)
    ids = attribution_input(tok, chat_records[1], max_len=64)[0]
    edited = copy.deepcopy(student)
    commit_deltas(edited, deltas)
    with torch.no_grad():
        plain, want = student(input_ids=ids).logits, edited(input_ids=ids).logits
    with applied(student, deltas):
        got = student(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the delta matters
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, plain)  # hooks removed, weights untouched
    got.logsumexp(-1).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in translated.values())
    assert all(p.grad is None for p in student.parameters())


def test_laten_end_to_end_saves_student_plus_delta(tiny_pair, chat_records, tmp_path, monkeypatch):
    from baselines import laten

    teacher, student_dir = tiny_pair
    splits = tmp_path / "splits"
    for name, recs in (("extract", chat_records[:2]), ("align", chat_records[2:]), ("train", chat_records)):
        write_jsonl(splits / f"{name}.jsonl", recs)

    def ctx_in(name: str) -> TransferContext:
        return TransferContext(teacher=teacher, student=student_dir, splits=splits, task="gsm8k",
                               out_dir=tmp_path / name, seed=1, max_len=64,
                               params={"samples_per_step": 4, "lr": 0.1, "transfer_rate": 0.2})

    ctx = ctx_in("run")
    prepared = tmp_path / "prepare.pt"
    run_preparation("laten", ctx, prepared)
    ctx.artifacts = {"preparation": prepared}
    # step i's locations are those of extract example i, in both models
    t_model, tok = load_model(teacher)
    s_model, _ = load_model(student_dir)
    counts = {"up_proj": 12, "down_proj": 12, "v_proj": 3, "o_proj": 6}
    prep = torch.load(prepared, weights_only=True)
    for i, record in enumerate(chat_records[:2]):
        ids, target = attribution_input(tok, record, 64)
        for role, model in (("teacher", t_model), ("student", s_model)):
            want = locate(model, ids, target, 2, counts)
            got = prep[role][i]
            assert all(torch.equal(got["layers"][k], v) for k, v in want.layers.items()), (role, i)
            assert all(torch.equal(got["neurons"][k], v) for k, v in want.neurons.items()), (role, i)
    located = []
    with monkeypatch.context() as m:  # given the preparation, a run locates only its inference example
        m.setattr(laten, "locate", lambda model, *args: located.append(model) or locate(model, *args))
        out = get_method("laten").run(ctx)
    assert len(located) == 2
    # without the file the run locates its 2 extract examples itself (the cost benchmark's path): the same model
    alone = get_method("laten").run(ctx_in("alone"))
    assert (alone / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    original, _ = load_model(student_dir)
    saved, _ = load_model(out)
    delta = torch.load(ctx.out_dir / "delta.pt")
    assert len(delta) == 4 * 2  # 4 modules x 2 student layers
    orig_params = dict(original.named_parameters())
    for name, w in saved.named_parameters():
        if name in delta:
            assert torch.equal(w, orig_params[name] + delta[name]), name
            assert delta[name].abs().max() > 1e-3, name  # the same order as the weights (std 0.02)
        else:
            assert torch.equal(w, orig_params[name]), name
    # transfer_rate 0.2: 12 of 64 FFN neurons, 3 of 16 v rows, 6 of 32 o columns per layer
    up = delta["model.layers.0.mlp.up_proj.weight"]
    assert int(up.any(1).sum()) == 12 and int(delta["model.layers.1.self_attn.o_proj.weight"].any(0).sum()) == 6

    stats = json.loads((ctx.out_dir / "train_stats.json").read_text())
    assert stats["teacher_forwards"] == 3
    assert stats["trainable_params"] == 4 * (64 * 64 + 64 * 32)
    assert stats["config"]["samples_per_step"] == 4
    assert stats["transfer_counts"] == {"up_proj": 12, "down_proj": 12, "v_proj": 3, "o_proj": 6}
    assert all(len(v) == 2 and all(1 <= k <= 4 for k in v) for v in stats["teacher_layers"].values())
    with open(ctx.out_dir / "loss_curve.csv") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["step"]) for r in curve] == [0, 1] and all(float(r["lm_loss"]) > 0 for r in curve)
    assert (ctx.out_dir / "translator.pt").exists()


def test_laten_exploding_loss_stops_naming_the_step(tiny_pair, chat_records, tmp_path, monkeypatch):
    """Divergence is an error in LaTen too: a total loss 1000 x the first step's stops the run at that step."""
    from baselines import laten
    from semalign.suite.train import DivergenceError

    teacher, student_dir = tiny_pair
    splits = tmp_path / "splits"
    for name, recs in (("extract", chat_records[:3]), ("align", chat_records[3:]), ("train", chat_records)):
        write_jsonl(splits / f"{name}.jsonl", recs)
    losses = iter([1.0, 1000.0, 1.0])
    monkeypatch.setattr(laten, "_example_backward", lambda *args: next(losses))
    ctx = TransferContext(teacher=teacher, student=student_dir, splits=splits, task="gsm8k", out_dir=tmp_path / "run",
                          seed=1, max_len=64, params={"samples_per_step": 1, "mse_weight": 0.0})
    with pytest.raises(DivergenceError, match=r"laten step 1: loss 1000 > 100 x first-step loss 1"):
        get_method("laten").run(ctx)
