"""The one evaluation entry: our task YAMLs (semalign/suite/tasks) on a make_splits test.jsonl through lm_eval.simple_evaluate.

Each call scores the task's main metric and its gold-answer NLL companion in a single simple_evaluate run, so the
model is loaded once and both numbers come from the same prompts. Per test item it keeps the id, the score and the
NLL (lm-eval's logged samples), which the paired significance tests read (:mod:`semalign.suite.stats`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"
CODE_TASKS = ("humaneval", "mbpp")
METRICS = {"mmlu": "acc", "gsm8k": "acc", "humaneval": "pass@1", "mbpp": "pass@1"}
DEFAULT_MAX_GEN_TOKS = 512  # the task YAMLs' own cap


def gen_cap(max_gen_toks: int | dict[str, int], task: str) -> int:
    """The generation cap of ``task`` from ``evaluation.max_gen_toks``: one integer for every task, or a mapping
    per task (a task it leaves out keeps the YAMLs' 512). Per task because the gold answers differ in length: a cap
    sized to the longest gold answer of one task spends most of its steps after another task's answers end."""
    if isinstance(max_gen_toks, dict):
        return int(max_gen_toks.get(task, DEFAULT_MAX_GEN_TOKS))
    return int(max_gen_toks)


def task_configs(task: str, test_file: Path, *, max_gen_toks: int, chat: bool) -> list[dict[str, Any]]:
    """The main and NLL task configs, read with lm-eval's own YAML loader (so `!function` resolves), test file injected.

    With the chat template on, the YAML's `metadata.chat` overrides (user turn / assistant prefix) are applied.
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval 0.4.13's loader; resolves includes and !function

    if task not in METRICS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(METRICS)}")
    test_file = Path(test_file)
    if not test_file.is_file():
        raise FileNotFoundError(f"{task}: test file {test_file} not found; run the splits rule first")
    cfgs = []
    for name in (f"semalign_{task}", f"semalign_{task}_nll"):
        cfg = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=True)
        chat_overrides = cfg.setdefault("metadata", {}).pop("chat", {})
        if chat:
            cfg.update(chat_overrides)
        cfg["dataset_kwargs"] = {"data_files": {"test": str(test_file.resolve())}}
        if cfg.get("generation_kwargs"):
            cfg["generation_kwargs"] = {**cfg["generation_kwargs"], "max_gen_toks": int(max_gen_toks)}
        cfgs.append(cfg)
    return cfgs


def _has_chat_template(lm: Any) -> bool:
    tok = getattr(lm, "tokenizer", None)
    return bool(getattr(tok, "chat_template", None))


def _unpadded(tokens: list[int]) -> tuple[int, ...]:
    """A log-likelihood input row as its own key: lm-eval right-pads a batch with token id 0, so the row without
    its trailing zeros (the same strip on both sides makes a row ending in a real token 0 match too)."""
    n = len(tokens)
    while n and tokens[n - 1] == 0:
        n -= 1
    return tuple(tokens[:n])


def hf_model(model_dir: Path, *, batch_size: int, gen_batch_size: int | None, device: str | None) -> Any:
    """lm-eval's HFLM on ``model_dir`` that does less work for the same scores (checked item by item on mini's
    models: README "Quick start"):

    - generation runs ``gen_batch_size`` rows at a time and log-likelihoods ``batch_size``: a generation step keeps
      one position's logits per row, a log-likelihood batch every position's, so on a small model generation runs
      best several times wider (on mini, GSM8K's 40 items in one batch of 40 instead of three of 16 took about half
      the generation time);
    - generation writes its keys and values into a preallocated (static) cache instead of one that grows by
      ``torch.cat`` every step, which copies the whole cache per step; never compiled, so a GPU run does not
      compile a graph per batch shape;
    - a log-likelihood batch reads the LM head out only from the batch's earliest scored position on: lm-eval asks
      for every position's logits ([rows, T, vocab], then a log-softmax over all of it) and keeps each row's
      continuation. Each row's continuation start is known per request, so it is recorded in
      ``_loglikelihood_tokens`` and looked up per row in ``_model_call``; lm-eval's own window arithmetic
      (designed for prefix tokens) then slices the shorter logits, and ``_select_cont_toks`` refuses a window that
      would start before them.
    """
    import torch
    from lm_eval.models.huggingface import HFLM

    class SuiteHFLM(HFLM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            scoring = self.batch_size_per_gpu
            self.batch_size_per_gpu = gen_batch_size or scoring
            try:
                return super().generate_until(requests, disable_tqdm)
            finally:
                self.batch_size_per_gpu = scoring

        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
            return super()._model_generate(context, max_length, stop, cache_implementation="static",
                                           disable_compile=True, **generation_kwargs)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            self._scored_from: dict[tuple[int, ...], int] = {}
            for _, context, continuation in requests:
                inp = (context + continuation)[-(self.max_length + 1):][:-1]  # lm-eval's causal input row
                key, start = _unpadded(inp), len(inp) - len(continuation)
                self._scored_from[key] = min(start, self._scored_from.get(key, start))
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            finally:
                del self._scored_from

        def _model_call(self, inps, attn_mask=None, labels=None):
            starts = [getattr(self, "_scored_from", {}).get(_unpadded(row)) for row in inps.tolist()]
            if attn_mask is not None or labels is not None or None in starts:
                return super()._model_call(inps, attn_mask, labels)  # seq2seq, or rows of no request (batch sizing)
            first = min(starts)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                return self.model(inps, logits_to_keep=inps.shape[1] - first).logits

        def _select_cont_toks(self, logits, contlen: int | None = None, inplen: int | None = None):
            if self.backend == "causal" and inplen - contlen < 0:
                raise RuntimeError(f"log-likelihood: the continuation starts {contlen - inplen} positions before "
                                   "the logits read out for its batch")
            return super()._select_cont_toks(logits, contlen, inplen)

    # the checkpoint's dtype for the model; the gold-answer log-softmax (the NLL column) in fp32 whatever it is
    return SuiteHFLM(pretrained=str(model_dir), device=device or "cpu", batch_size=batch_size, dtype="auto",
                     softmax_dtype="float32")


def evaluate_model(model_dir: Path, task: str, test_file: Path, *, allow_code_execution: bool, batch_size: int = 8,
                   gen_batch_size: int | None = None, max_gen_toks: int = 256, device: str | None = None,
                   chat_template: bool | None = None, limit: int | None = None, model=None) -> dict:
    """Score one model on one task; returns {"task", "metric", "score", "nll", "n", "model", "items"}, ``items``
    one {"id", "score", "nll"} per test item in test-file order (id: the record's ``id``/``task_id``, else its row).

    chat_template=None means: use the tokenizer's chat template when it has one (the paper evaluates chat models in
    chat format). `model` is an lm-eval LM to use instead of loading `model_dir` (tests pass a scripted oracle).
    """
    if task in CODE_TASKS and not allow_code_execution:
        raise PermissionError(f"{task} executes model-written code; set evaluation.allow_code_execution: true to consent")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if model is None:
        model = hf_model(model_dir, batch_size=batch_size, gen_batch_size=gen_batch_size, device=device)
    chat = _has_chat_template(model) if chat_template is None else bool(chat_template)
    cfgs = task_configs(task, test_file, max_gen_toks=max_gen_toks, chat=chat)

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # per-task INFO chatter drowns the rule logs
    with no_environment_report():
        out = simple_evaluate(
            model=model, tasks=cfgs, task_manager=TaskManager(include_defaults=False), batch_size=batch_size,
            limit=limit, apply_chat_template=chat, confirm_run_unsafe_code=allow_code_execution,
            log_samples=True, bootstrap_iters=0)
    main, nll = (out["results"][c["task"]] for c in cfgs)
    metric = METRICS[task]
    result = {"task": task, "metric": metric, "score": float(main[f"{metric},none"]), "nll": float(nll["nll,none"]),
              "n": int(out["n-samples"][cfgs[0]["task"]]["effective"]), "model": str(model_dir),
              "items": item_records(out["samples"][cfgs[0]["task"]], out["samples"][cfgs[1]["task"]], metric)}
    if not math.isfinite(result["nll"]):
        raise ValueError(f"{task}: non-finite gold NLL for {model_dir}")
    return result


@contextmanager
def no_environment_report() -> Iterator[None]:
    """Inside the block, lm-eval's ``simple_evaluate`` leaves out the environment report it appends to every
    result (torch's ``collect_env``: ``pip list`` and other subprocesses, ~0.7 s per call, 88 calls in the mini
    run). Nothing reads that report: each run's environment is recorded once, in the run manifest."""
    import lm_eval.evaluator

    report = lm_eval.evaluator.add_env_info
    lm_eval.evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = report


def item_records(main: list[dict], nll: list[dict], metric: str) -> list[dict[str, Any]]:
    """Per test item of lm-eval's logged samples (main task and NLL companion, matched on doc_id): its id, score
    and gold-answer NLL. The item means are the task's numbers, so the records cannot drift from them."""
    nll_of = {s["doc_id"]: float(s["nll"]) for s in nll}
    if set(nll_of) != {s["doc_id"] for s in main}:
        raise ValueError("evaluation: the main task and its NLL companion scored different items")
    return [{"id": str(s["doc"].get("id", s["doc"].get("task_id", s["doc_id"]))), "score": float(s[metric]),
             "nll": nll_of[s["doc_id"]]} for s in sorted(main, key=lambda s: s["doc_id"])]
