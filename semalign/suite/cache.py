"""Teacher activations, computed once per (pair, task) and reused by every stage, epoch and method.

The cache keeps the teacher's post-norm final hidden state and its LM head instead of logits: logits are
recovered exactly as ``final_hidden @ head.T`` at a fraction of the storage (d instead of V floats per token).
Intermediate layers are stored only where a method asks for them (the paired source layers), in float32: targets
are differences of them (h_{t(k)} - h_{t(k-1)}, :func:`semalign.frontier.stage_span`), and on SmolLM2-135M the
attention-sink token carries ||h|| ~ 2.5e4 from layer 12 on, where fp16's spacing (16) is larger than a layer's
contribution: differences of fp16 states reached cosine 0.796 to fp32 (layer 14), fp32 keeps them exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from semalign.suite import timing
from semalign.suite.chat import tokenize_records
from semalign.suite.io import CorruptFileError, atomic_torch_save, first_line, move_aside
from semalign.suite.models import decoder_layers, final_norm, lm_head, load_model
from semalign.suite.train import length_chunks

LAYER_DTYPE = torch.float32  # pre-norm states are differenced: fp16 loses a layer's contribution (module doc)
FINAL_DTYPE = torch.float16  # the post-norm final state has O(1) entries: cosine to fp32 >= 0.9999999 in fp16


def layer_outputs(
    model: torch.nn.Module, layers: list[int], detach: bool = True
) -> tuple[dict[int, list], list, list]:
    """Register hooks that record the residual stream after each 1-based layer (0 = embeddings) and the
    post-norm final state; returns (per-layer store, final store, hook handles). ``detach=False`` keeps the
    graph, for losses on the student's own states (``output_hidden_states`` would give the post-norm last one)."""
    store: dict[int, list] = {k: [] for k in layers}
    final: list = []
    handles = []

    def grab(k: int):
        def hook(_module, _inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            store[k].append(h.detach() if detach else h)

        return hook

    blocks = decoder_layers(model)
    for k in layers:
        if not 0 <= k <= len(blocks):
            raise ValueError(f"teacher layer {k} out of range 0..{len(blocks)}")
        module = model.get_input_embeddings() if k == 0 else blocks[k - 1]
        handles.append(module.register_forward_hook(grab(k)))
    handles.append(final_norm(model).register_forward_hook(
        lambda _m, _i, out: final.append(out.detach() if detach else out)))
    return store, final, handles


class MissingTeacherLayer(KeyError):
    """A reader asked for a layer the cache was not built with (KeyError, printed as a plain sentence)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class TeacherCache:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    final_hidden: torch.Tensor
    head_weight: torch.Tensor
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tokens(self) -> dict[str, torch.Tensor]:
        """The tokenised training rows the teacher saw, in the layout :func:`semalign.suite.train.fit` takes."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "loss_mask": self.loss_mask}

    def answer_logits(self, idx: torch.Tensor, mask: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Teacher logits [n, V] (float32) of rows ``idx`` at the positions of ``mask`` [b, T] only; ``head`` is
        ``head_weight`` already on the training device (moved once per run, not per step)."""
        with timing.section("teacher logits"):
            h = self.final_hidden[idx][:, : mask.shape[1]][mask.cpu()]
            return h.to(head.device, torch.float32) @ head.T

    def state(self, terms: list, idx: torch.Tensor, T: int, device: torch.device | str) -> torch.Tensor:
        """Σ w h_l over ``terms`` [[l, w], ...] (0 = embeddings) for rows ``idx`` and their first T positions, as
        float32 [b, T, d_T] on ``device``: the teacher quantity a pairing names, summed in fp32."""
        total = None
        for l, w in terms:
            x = w * self.layer(l)[idx, :T].to(device, torch.float32)
            total = x if total is None else total + x
        return total

    def layer(self, k: int) -> torch.Tensor:
        if k not in self.layers:
            raise MissingTeacherLayer(
                f"teacher layer {k} not cached (cached: {sorted(self.layers)}): the cache keeps the layers of the "
                "methods configured when it was built; add this method to `methods` and re-run to rebuild it")
        return self.layers[k]

    @classmethod
    def load(cls, path: Path) -> TeacherCache:
        """The cache at ``path``; one that does not load (truncated, overwritten) is moved aside as
        ``<name>.corrupt-<time>`` and reported by path, so the next run of the workflow rebuilds it (its rule's
        output is then missing) instead of failing on it forever."""
        try:
            blob = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            return cls(**blob)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated file fails as RuntimeError, OSError(EINVAL), zip errors
            aside = move_aside(path)
            raise CorruptFileError(f"corrupt teacher cache {path} ({type(e).__name__}: {first_line(e)}); moved to "
                                   f"{aside.name}: re-run the workflow to rebuild it") from e


@torch.no_grad()
def teacher_states(model: torch.nn.Module, data: dict[str, torch.Tensor], layers: list[int],
                   batch_size: int) -> dict[str, Any]:
    """One teacher forward per row of ``data``: the cache's tensors (tokens, final state, head, ``layers``' states).
    Each batch's states leave the device as the batch finishes, so the device holds one batch, not the cache.
    Rows run in order of length, each batch cut to its longest row (:func:`length_chunks`); the states of padding
    positions are stored as 0 (every reader masks them)."""
    layers = sorted(set(layers))
    store, final, handles = layer_outputs(model, layers)
    dev = next(model.parameters()).device
    N, T_max = data["input_ids"].shape
    d = model.config.hidden_size
    states = {k: torch.zeros(N, T_max, d, dtype=LAYER_DTYPE) for k in layers}  # padding positions stay 0
    final_hidden = torch.zeros(N, T_max, d, dtype=FINAL_DTYPE)
    try:
        for rows, T in tqdm(list(length_chunks(data["attention_mask"], batch_size)), desc="teacher forward",
                            unit="batch"):
            model.model(input_ids=data["input_ids"][rows, :T].to(dev),
                        attention_mask=data["attention_mask"][rows, :T].to(dev))
            for k, v in store.items():
                states[k][rows, :T] = v.pop().to("cpu", LAYER_DTYPE)
            final_hidden[rows, :T] = final.pop().to("cpu", FINAL_DTYPE)
    finally:
        for h in handles:
            h.remove()
    return {
        **data,
        "final_hidden": final_hidden,
        "head_weight": lm_head(model).weight.detach().to("cpu", torch.float32).clone(),  # fp32: logits stay faithful
        "layers": states,
    }


def build_teacher_cache(
    teacher_dir: Path,
    records: list[dict],
    layers: list[int],
    max_len: int,
    batch_size: int,
    out_path: Path,
    device: str | None = None,
    train_on_inputs: bool = False,
) -> dict:
    """One teacher forward per example; writes the cache atomically and returns its metadata."""
    model, tokenizer = load_model(teacher_dir, device=device)
    data = tokenize_records(tokenizer, records, max_len, train_on_inputs=train_on_inputs)
    blob = teacher_states(model, data, layers, batch_size)
    meta = {
        "teacher": str(teacher_dir),
        "n_examples": len(records),
        "forward_passes": len(records),
        "max_len": max_len,
        "layers": sorted(set(layers)),
    }
    atomic_torch_save({**blob, "meta": meta}, out_path)
    return meta
