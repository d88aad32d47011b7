"""Per-layer task relevance of the teacher (paper §4.1), plus LaTen's logit-lens score and a seeded random
control for the attribution ablation. Scores are indexed by layer: entry 0 = layer 1.

Objective (all methods): the log-probability of the gold answer tokens, J = Σ_{t: answer} log p(x_{t+1} | x_<=t),
per example (the "supervised objective" of §4.1, as a score rather than a loss so higher = more relevant).

Layer Gradient x Activation, two readings of "the layer's activations" (one forward + one backward per batch,
products and sums in fp32 whatever the model dtype; aggregation, which the paper does not give: the signed sum
over channels per token s_t = <a_t, dJ/dh_{l,t}>, the first-order effect on J of scaling a_t, where channel signs
cancel meaningfully, then the mean of |s_t| over real tokens of all examples, since token-level signs would cancel
between tokens that help and hurt):

- ``grad_x_act`` (default, the one SemAlign's pairing reads): a = Δ_l = h_l − h_{l−1}, the block's contribution
  to the residual stream. Since h_l = h_{l−1} + Δ_l, dJ/dΔ_l = dJ/dh_l, so s_t is the first-order effect of
  scaling block l's own output: every block, the last included, is scored by what it adds.
- ``grad_x_act_state`` (the literal reading, an ablation row): a = h_l, the residual stream after the layer
  (what Captum's ``LayerGradientXActivation`` on the decoder layer computes). It cannot score the last layer: J
  reads h_L only through the final RMSNorm, which is scale-invariant per token, so <h_L, dJ/dh_L> = 0 up to the
  norm's epsilon (about 5e-8 on SmolLM2), whatever the last block does.

``logit_lens`` (LaTen, Yu & Ananiadou 2024): read each layer's residual stream through the final norm + LM head;
score_k = mean over answer tokens of [log p_k(gold) - log p_{k-1}(gold)], with layer 0 = embeddings: how much
layer k raises the gold tokens' log-probability. Forward-only.

``random``: U(0, 1) per layer from a seeded generator (the ablation's control).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from semalign.suite.chat import tokenize_records
from semalign.suite.models import decoder_layers, final_norm, lm_head
from semalign.suite.objectives import shift_mask
from semalign.suite.train import length_chunks

# Every attribution name, spelled here only; other modules import these.
CONTRIBUTION, STATE, LOGIT_LENS, RANDOM = "grad_x_act", "grad_x_act_state", "logit_lens", "random"
METHODS = (CONTRIBUTION, STATE, LOGIT_LENS, RANDOM)
DEFAULT_METHOD = CONTRIBUTION  # what SemAlign's attributed pairings read


def gold_logprob(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-position log p(next gold token) [B, T] (0 where the next token is not an answer token)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    lp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = shift_mask(loss_mask)[:, :-1].to(lp.dtype)
    return torch.nn.functional.pad(lp * mask, (0, 1))


def _as_batch(tokenizer_or_batch: Any, records: list[dict] | None, max_len: int) -> dict[str, torch.Tensor]:
    if isinstance(tokenizer_or_batch, dict):
        return tokenizer_or_batch
    if not records:
        raise ValueError("layer_scores: pass a token batch dict, or a tokenizer and non-empty records")
    return tokenize_records(tokenizer_or_batch, records, max_len)


def _chunks(batch: dict[str, torch.Tensor], size: int, desc: str) -> Iterator[tuple[torch.Tensor, ...]]:
    """(input_ids, attention_mask, loss_mask) chunks in order of length, each cut to its longest row: the scores
    are sums over real tokens, so the order is free and the padding is not computed."""
    chunks = list(length_chunks(batch["attention_mask"], size))
    for rows, T in tqdm(chunks, desc=desc, leave=False):
        yield tuple(batch[k][rows, :T] for k in ("input_ids", "attention_mask", "loss_mask"))


def _grad_x_act(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], batch_size: int, contribution: bool
) -> list[float]:
    """Mean |<a_t, dJ/dh_{l,t}>| per layer, a = Δ_l (``contribution``) or h_l (see the module doc).

    Hooks rather than Captum: Captum's ``LayerGradientXActivation`` multiplies a module's output by the gradient
    with respect to that output, in the model's dtype. Δ_l is no module's output (the residual adds are inline in
    the HF decoder layer), so Captum could reach it only by rewiring the forward around a probe module, which
    rounds h_{l-1} + (h_l - h_{l-1}) in low precision; the hooks read h_{l-1} (the layer's input) and h_l (its
    output, whose gradient is dJ/dΔ_l) from the unmodified forward and form both readings in fp32.
    tests/test_attribution.py checks the state reading against Captum itself."""
    layers = list(decoder_layers(model))
    total = torch.zeros(len(layers), dtype=torch.float64)
    n_tokens = 0
    for ids, attn, lm in _chunks(batch, batch_size, "grad x act"):
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []

        def keep(_module, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            if not h_out.requires_grad:  # frozen weights: make the stream itself the leaf the gradient reaches
                h_out.requires_grad_()
            h_out.retain_grad()
            inputs.append(h_in.detach())
            outputs.append(h_out)

        handles = [layer.register_forward_hook(keep, with_kwargs=True) for layer in layers]
        try:
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=attn).logits
                gold_logprob(logits, ids, lm).sum().backward()
        finally:
            for h in handles:
                h.remove()
            model.zero_grad(set_to_none=True)
        real = attn.bool()
        for k, (h_in, h_out) in enumerate(zip(inputs, outputs)):
            act = h_out.detach().float()
            if contribution:
                act = act - h_in.float()
            total[k] += (act * h_out.grad.float()).sum(-1)[real].abs().double().sum()
        n_tokens += int(real.sum())
    return (total / max(n_tokens, 1)).tolist()


@torch.no_grad()
def _logit_lens(model: torch.nn.Module, batch: dict[str, torch.Tensor], batch_size: int) -> list[float]:
    from semalign.suite.cache import layer_outputs

    L = len(decoder_layers(model))
    norm, head = final_norm(model), lm_head(model)
    gain = torch.zeros(L, dtype=torch.float64)
    n_scored = 0
    for ids, attn, lm in _chunks(batch, batch_size, "logit lens"):
        store, _final, handles = layer_outputs(model, list(range(L + 1)))
        try:
            model.model(input_ids=ids, attention_mask=attn)
        finally:
            for h in handles:
                h.remove()
        # read out in fp32 whatever the model dtype: the score is a difference of nearby log-probs, which bf16
        # logits would round away (the fault LaTen's lens had)
        w = head.weight.float()
        lp = [gold_logprob(torch.nn.functional.linear(norm(store[k][0]).float(), w), ids, lm).sum().double()
              for k in range(L + 1)]
        gain += torch.stack([lp[k] - lp[k - 1] for k in range(1, L + 1)])
        n_scored += int(shift_mask(lm).sum())
    return (gain / max(n_scored, 1)).tolist()


def layer_scores(
    model: torch.nn.Module,
    tokenizer_or_batch: Any,
    records: list[dict] | None = None,
    method: str = DEFAULT_METHOD,
    max_len: int = 512,
    batch_size: int = 4,
    seed: int = 0,
) -> list[float]:
    """One relevance score per decoder layer (index 0 = layer 1). Input: a tokenizer + chat records (tokenised
    with the shared ``tokenize_records``) or a ready batch {"input_ids", "attention_mask", "loss_mask"}."""
    L = len(decoder_layers(model))
    if method == RANDOM:
        return torch.rand(L, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {METHODS}")
    batch = _as_batch(tokenizer_or_batch, records, max_len)
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        if method == LOGIT_LENS:
            scores = _logit_lens(model, batch, batch_size)
        else:
            scores = _grad_x_act(model, batch, batch_size, contribution=method == CONTRIBUTION)
    finally:
        model.train(was_training)
    if not all(torch.isfinite(torch.tensor(scores))):
        raise FloatingPointError(f"non-finite {method} layer scores: {scores}")
    return scores


def write_layer_scores(scores: dict[str, list[float]], csv_path: Path, png_path: Path, title: str = "") -> None:
    """Table (method, layer, score) and a profile plot; each method min-max normalised in the plot only, since
    the methods' units differ."""
    from semalign.suite.figures import write_layer_profile  # matplotlib: not in every job that scores layers

    curves = {m: {k + 1: v for k, v in enumerate(vals)} for m, vals in scores.items()}
    write_layer_profile(curves, csv_path, png_path, columns=("method", "layer", "score"),
                        ylabel="score (min-max normalised)", title=title or "layer attribution", normalise=True)


def attribution_report(
    model_dir: Path, records: list[dict], max_len: int, csv_path: Path, png_path: Path,
    methods: tuple[str, ...] = METHODS, batch_size: int = 4, seed: int = 0, device: str | None = None,
    title: str = "",
) -> dict[str, list[float]]:
    """The attribution rule's work for one teacher x task: every method's scores on the extract split, written
    as one csv + one profile plot."""
    from semalign.suite.models import load_model

    model, tokenizer = load_model(model_dir, device=device)
    scores = {m: layer_scores(model, tokenizer, records, m, max_len, batch_size, seed) for m in methods}
    write_layer_scores(scores, csv_path, png_path, title=title or Path(model_dir).name)
    return scores
