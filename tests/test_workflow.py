"""The workflow as a user runs it: config validation, offline dry-runs, and the whole smoke DAG."""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from warm_snakemake import warm_snakemake

from semalign.suite import config as configuration
from semalign.suite.labels import TASK_LABELS
from semalign.suite.sources import data_dir

REPO = Path(__file__).resolve().parents[1]

def snakemake(workdir: Path, config: dict | None, *args: str, env: dict | None = None,
              repo: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m snakemake` on `repo`'s Snakefile in `workdir`; `config` (if any) is passed as the --configfile.
    In a warm interpreter (tests/warm_snakemake.py: the same argv, environment, working directory and output, without
    the ~5 s of imports each call)."""
    argv = ["--snakefile", str(repo / "Snakefile"), "--directory", str(workdir)]
    if config is not None:
        cfg = workdir / "config.yaml"
        cfg.write_text(yaml.safe_dump(config))
        argv += ["--configfile", str(cfg)]
    return warm_snakemake([*argv, *args], env={**os.environ, **(env or {})}, cwd=workdir, timeout=1800)


def profile(name: str, repo: Path = REPO) -> dict:
    """A profile as the workflow sees it: config/base.yaml overlaid with config/<name>.yaml (Snakemake's merge)."""
    from snakemake.utils import update_config

    cfg = yaml.safe_load((repo / "config" / "base.yaml").read_text())
    update_config(cfg, yaml.safe_load((repo / "config" / f"{name}.yaml").read_text()))
    return cfg


def readme_example(repo: Path) -> list[Path]:
    """Apply the README's "Add a baseline" code blocks to `repo`, as a reader would: each block's first line names
    its file; a new file is created, an existing one (the profile) gets the block's lines appended."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Add a baseline"):]
    section = section[:section.index("\n## ")]
    touched = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S):
        first, body = block.split("\n", 1)
        path = repo / first.removeprefix("# ").strip()
        path.write_text(path.read_text() + "\n" + body if path.exists() else block)
        touched.append(path)
    return touched


def copy_repo(dest: Path) -> Path:
    """The working tree as a fresh clone would see it (tracked and untracked, not ignored, files)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


PROFILES = sorted(p.stem for p in (REPO / "config").glob("*.yaml") if p.stem != "base")


def test_profiles_present():
    assert {"smoke", "mini", "paper", "smollm2", "qwen2.5", "llama3.2"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_dry_run_every_profile_offline(tmp_path, name):
    """Building the DAG loads no model and no dataset: it works on a machine without network (like this one).
    And every figure is declared as png and pdf (regression: the pdf beside Fig. 2, the attribution profiles, the
    main, ablation, cost and loss-curve figures was written but not declared, so the DAG neither required it nor
    cleaned it up after a failed job). The paper profile names its Table 2 pairs, so aggregate writes
    tables/finetuned_teachers.*; a profile that names none does not. (`device: cuda`, the profiles' default, plans
    on this GPU-less machine.)"""
    cfg = profile(name)
    res = snakemake(tmp_path, cfg, "--summary")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("\t") for line in res.stdout.splitlines()[1:]]
    assert {"evaluate", "transfer", "aggregate"} <= {row[2] for row in rows}
    finetuned = f"results/{cfg['profile']}/tables/finetuned_teachers.md" in {row[0] for row in rows}
    assert finetuned == bool(cfg.get("report", {}).get("finetuned_teachers")) and (finetuned or name != "paper")
    pngs = {Path(row[0]).with_suffix("") for row in rows if row[0].endswith(".png")}
    pdfs = {Path(row[0]).with_suffix("") for row in rows if row[0].endswith(".pdf")}
    assert len(pngs) >= 10 and pngs == pdfs, sorted(map(str, pngs ^ pdfs))


def test_ablations_expand_into_variant_jobs(tmp_path):
    """Each ablation value is one variant method: its own transfer and evaluation jobs, its own pairing when the
    pairing changes, and one table per axis; the configured value is not run twice."""
    cfg = profile("smoke")
    cfg["ablations"] = {"tasks": ["gsm8k"], "methods": {"semalign": {"loss": ["v2", "v1"], "pairing": ["depth_ratio"]}}}
    res = snakemake(tmp_path, cfg, "-n", "--forceall")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    for variant in ["semalign@loss=v1", "semalign@pairing=depth_ratio"]:
        assert f"Transfer {variant}: tiny / gsm8k / seed 0" in out, variant
        assert f"Evaluating {variant} on gsm8k" in out, variant
        assert f"Transfer {variant}: tiny / mmlu" not in out  # ablation tasks only
    assert "semalign@loss=v2" not in out  # v2 is the configured loss: the semalign row itself
    assert "results/smoke/pairing/tiny/gsm8k/depth_ratio.json" in out
    assert "results/smoke/tables/ablation_semalign__loss.md" in out


def test_mini_plans_cka_analysis_and_pairing(tmp_path):
    """CKA (paper Figs. 4-5) is in the plan: the configured method's trained student (first seed) and the untouched
    one give the figure's panels, on HumanEval only; with the fuller grid (config/overlays/mini-grid.yaml) the
    untouched student's CKA on GSM8K also feeds the `cka` pairing ablation."""
    from snakemake.utils import update_config

    pair = "smollm2-135m_to_mini"
    res = snakemake(tmp_path, profile("mini"), "-n", "--forceall")
    out = res.stdout + res.stderr
    assert res.returncode == 0, res.stderr[-3000:]
    # the paper's epochs per stage: a labelled row beside the main one (KD's optimizer steps), README "Fairness protocol"
    assert f"Transfer semalign@budget=epochs_per_stage: {pair} / gsm8k / seed 0" in out
    assert "results/mini/tables/ablation_semalign__budget.md" in out
    assert f"CKA of the semalign student with the teacher and itself: {pair} / humaneval" in out
    assert f"CKA figure: {pair} / humaneval" in out and f"results/mini/figures/cka_{pair}_humaneval.png" in out
    assert out.count("CKA of the ") == 2 and out.count("CKA figure: ") == 1  # humaneval's before and after only
    # one evaluation job per trained method and task scores its 3 seeds; reference rows and variants one seed each
    assert out.count(f"Evaluating kd on gsm8k ({pair}, seeds 0 1 2)") == 1 and "Evaluating kd on gsm8k" not in \
        out.replace(f"Evaluating kd on gsm8k ({pair}, seeds 0 1 2)", "")
    assert out.count("Evaluating ") == 4 * 6 + 4 * 2 + 8  # 6 trained methods, teacher and none, 8 GSM8K variants

    grid = profile("mini")
    update_config(grid, yaml.safe_load((REPO / "config" / "overlays" / "mini-grid.yaml").read_text()))
    res = snakemake(tmp_path, grid, "-n", "--forceall")
    out = res.stdout + res.stderr
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Transfer semalign@pairing=cka: {pair} / gsm8k / seed 0" in out
    assert "Evaluating semalign@pairing=cka on gsm8k" in out
    assert f"CKA of the none student with the teacher and itself: {pair} / gsm8k" in out  # the pairing's input
    assert f"results/mini-grid/cka/{pair}/gsm8k/none.csv" in out
    assert f"results/mini-grid/pairing/{pair}/gsm8k/cka.json" in out
    assert out.count("CKA of the ") == 3 and out.count("CKA figure: ") == 1
    assert out.count("Transfer semalign@") == 17  # every ablation value of the grid


def test_slurm_profile_names_only_real_rules(tmp_path):
    """A typo in the cluster profile's per-rule resources would silently fall back to the defaults."""
    slurm = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm"
    res = snakemake(tmp_path, profile("paper"), "--list-rules")
    assert res.returncode == 0, res.stderr[-3000:]
    rules = set(res.stdout.split())
    named = set(slurm["set-resources"]) | set(slurm["set-threads"])
    assert named <= rules, named - rules
    assert {"transfer", "cache_teacher", "evaluate"} <= named


@pytest.mark.parametrize(
    "mutate, culprit",
    [
        (lambda c: c.update(not_a_key=1), "not_a_key"),
        (lambda c: c["evaluation"].update(batch_size="eight"), "batch_size"),
        (lambda c: c["evaluation"].update(max_gen_toks={"humaneval": 64, "hellaswag": 64}), "hellaswag"),
        (lambda c: c["data"]["sizes"]["mmlu"].update(trian=3), "trian"),
        (lambda c: c.update(methods=["teacher", "nonexistent"]), "nonexistent"),
        (lambda c: c["pairs"]["tiny"].update(student="ghost"), "ghost"),
        (lambda c: c["ablations"]["methods"]["semalign"].update(lossy=["v1"]), "lossy"),
        (lambda c: c["ablations"]["methods"]["semalign"].update(loss=["v9"]), "v9"),
        (lambda c: c["method_params"]["kd"].update(epochz=2), "epochz"),
        (lambda c: c["method_params"]["laten"].update(tasks={"hellaswag": {"steps": 2}}), "hellaswag"),
        (lambda c: c["method_params"]["kd"].update(tasks={"gsm8k": {"epochz": 2}}), "epochz"),
        (lambda c: c["method_params"]["lora_sft"].update(tasks={"mbpp": {"epochs": 2}}), "lora_sft is seeking's control"),
        (lambda c: c["method_params"]["semalign"].update(epochs=2), "KD's optimizer steps"),
        (lambda c: c["ablations"]["methods"]["semalign"].update(lr=[0.1])
         or c["method_params"]["semalign"].update(tasks={"gsm8k": {"lr": 0.01}}), "also sets"),
        (lambda c: c.update(report={"finetuned_teachers": ["tiny", "ghost_pair"]}), "ghost_pair"),
        (lambda c: c.setdefault("analysis", {}).update(cka_method="none"), "cka_method"),
        (lambda c: c.setdefault("analysis", {}).update(cka_tasks=["humaneval", "hellaswag"]), "hellaswag"),
        # issue 14: caught at DAG start, not by the job that needs them (15-114 s in, other jobs already spent)
        (lambda c: c["models"].update({"tiny-teacher": {"source": "/no/such/model"}}), "models.tiny-teacher"),
        (lambda c: c["models"].update({"tiny-teacher": {"source": "not a hub id!"}}), "models.tiny-teacher"),
        (lambda c: c["models"]["tiny-student"].update(tokenizer={"source": "pkg:no_such_pkg"}), "models.tiny-student"),
        (lambda c: c["evaluation"].update(allow_code_execution=False), "evaluation.allow_code_execution"),
        (lambda c: c["method_params"]["kd"].update(lr=-1e-3), "lr"),
        (lambda c: c["method_params"]["kd"].update(lr=1e12), "lr"),
        (lambda c: c["method_params"]["kd"].update(epochs=0), "epochs"),
        (lambda c: c["method_params"]["kd"].update(lr="fast"), "['method_params']['kd']['lr']"),
        (lambda c: c["method_params"]["kd"].update(ce_weight="much"), "method_params.kd.ce_weight: expected a number"),
        (lambda c: c["method_params"]["semalign"].update(divergence_factor=0.5), "divergence_factor"),
    ],
)
def test_bad_config_rejected_naming_the_key(mutate, culprit):
    """In-process: the checks the Snakefile runs at DAG start (semalign.suite.config.load), one planted error each."""
    cfg = profile("smoke")
    mutate(cfg)
    with pytest.raises(Exception) as err:
        configuration.load(cfg)
    assert culprit in str(err.value)


@pytest.mark.parametrize("mutate, culprit", [
    (lambda c: c["evaluation"].update(batch_size="eight"), "batch_size"),  # the schema
    (lambda c: c["method_params"]["semalign"].update(epochs=2), "KD's optimizer steps"),  # a cross-key check
])
def test_the_snakefile_rejects_a_bad_config_before_any_job(tmp_path, mutate, culprit):
    """The same checks as a user meets them: `snakemake -n` fails naming the key (the Snakefile calls load)."""
    cfg = profile("smoke")
    mutate(cfg)
    res = snakemake(tmp_path, cfg, "-n")
    assert res.returncode != 0
    assert culprit in res.stderr + res.stdout


def test_scientific_notation_is_a_number():
    """Regression (issue 14): `lr: 1e-3` is a string to YAML; it passed validation and crashed in the transfer."""
    cfg = profile("smoke")
    cfg["method_params"]["kd"]["lr"] = "1e-3"
    assert configuration.load(cfg)["method_params"]["kd"]["lr"] == 1e-3
    cfg["method_params"]["kd"]["lr"] = "1e3"  # a number now, so the range check sees it
    with pytest.raises(Exception, match=re.escape("['method_params']['kd']['lr']")):
        configuration.load(cfg)


def test_pair_with_different_local_tokenizers_rejected_at_dag_start(tmp_path):
    """A pair whose tokenizer.json vocabularies differ is stopped before any job (it failed in the transfer job)."""
    cfg = profile("smoke")
    for name, token in (("tiny-teacher", "a"), ("tiny-student", "b")):
        tok = tmp_path / f"tok-{name}"
        tok.mkdir()
        (tok / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {token: 0}}, "added_tokens": []}))
        cfg["models"][name]["tokenizer"] = {"source": str(tok)}
    with pytest.raises(ValueError, match=re.escape("config: pairs.tiny (tiny-teacher -> tiny-student): vocabulary mismatch")):
        configuration.load(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_stops_before_any_job(tmp_path):
    """`device: cuda` on a CPU machine: a real run stops before its first job with one line naming the key (it
    failed inside the first training job); a dry run still plans (test_dry_run_every_profile_offline: the profiles'
    default device is cuda)."""
    cfg = profile("smoke")
    cfg["device"] = "cuda"
    res = snakemake(tmp_path, cfg, "--cores", "1")
    assert res.returncode != 0 and "config: device = cuda but no CUDA GPU is visible" in res.stderr + res.stdout
    assert not (tmp_path / "results").exists()  # no job ran
    # the memory plan loads no model: a GPU-less login node writes it
    plan = snakemake(tmp_path, cfg, "--cores", "1", "--", "results/smoke/plan.md")
    assert plan.returncode == 0, plan.stderr[-3000:]


def test_single_target_of_a_method_left_out_of_methods_is_a_dag_error(tmp_path):
    """Regression (issue 14): asking for a transfer of a method not in `methods` built a cache without its teacher
    layers and failed in training with `KeyError: 'teacher layer 2 not cached'`."""
    cfg = profile("smoke")
    cfg["methods"] = ["teacher", "none", "kd", "semalign"]
    res = snakemake(tmp_path, cfg, "-n", "results/smoke/transfer/tiny/gsm8k/layerwise_kd/seed0/transfer.json")
    assert res.returncode != 0 and "target layerwise_kd on gsm8k: not in `methods`" in res.stderr + res.stdout


def test_switching_the_data_dir_reruns_the_splits(tmp_path):
    """Issue 14: every file the splits rule reads is a declared input and the data dir a param, so after a complete
    run, pointing SEMALIGN_DATA_DIR at another copy of the data plans the splits (and what depends on them) again
    instead of "Nothing to be done"."""
    from semalign.suite.sources import data_dir

    src = data_dir()
    if src is None:
        pytest.skip("no local data dir (../shared/data)")
    copies = {}
    for name in ("a", "b"):
        for sub in ("gsm8k", "pkt_splits"):
            shutil.copytree(src / sub, tmp_path / name / sub)
        copies[name] = {"SEMALIGN_DATA_DIR": str(tmp_path / name)}
    work = tmp_path / "work"
    work.mkdir()
    cfg = {**profile("smoke"), "tasks": ["gsm8k"]}
    target = "results/smoke/splits/gsm8k/manifest.json"
    assert snakemake(work, cfg, "--cores", "1", target, env=copies["a"]).returncode == 0
    assert "Nothing to be done" in snakemake(work, cfg, "-n", target, env=copies["a"]).stdout
    moved = snakemake(work, cfg, "-n", target, env=copies["b"])
    assert moved.returncode == 0 and "Rules with provenance triggered jobs: splits" in moved.stdout


# The rules whose jobs load no model (common.smk's HOST_RULES but cka_figure, whose CKA reader lives with the
# torch-computed CKA; the `cka` pairing strategy imports it too, inside its branch)
LIGHT_SCRIPTS = ["splits", "contamination", "pairing", "aggregate", "figures", "loss_curves", "run_manifest"]
START_AND_IMPORT = """
import ast, os, sys, types
from pathlib import Path
for name in sys.argv[2:]:
    script = ast.parse(Path(sys.argv[1], name + ".py").read_text())
    exec(compile(ast.Module([n for n in script.body if isinstance(n, (ast.Import, ast.ImportFrom))], []), name, "exec"))
    assert not {"torch", "transformers"} & set(sys.modules), f"{name} imports torch"
from semalign.suite.jobs import start_job
start_job(types.SimpleNamespace(log=[sys.argv[1] + "/../../job.log"], threads=1))
import torch
sys.__stdout__.write(f"{torch.get_num_threads()}")
"""


def test_a_job_that_loads_no_model_imports_no_torch(tmp_path):
    """A table, a figure or a split starts in ~1 s, not the ~6 s of importing torch and transformers (regression:
    every script took start_job from the torch-importing pipeline module: 19 of mini's 167 jobs paid it); and a torch
    imported after start_job still runs on the threads the scheduler granted (OMP_NUM_THREADS)."""
    scripts = tmp_path / "workflow" / "scripts"
    shutil.copytree(REPO / "workflow" / "scripts", scripts)
    res = subprocess.run([sys.executable, "-c", START_AND_IMPORT, str(scripts), *LIGHT_SCRIPTS], capture_output=True,
                         text=True, cwd=REPO, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == "1"  # torch's default: one thread per core (it caps a larger count at the cores)


@pytest.mark.parametrize("device, cuda, kept", [("cpu", False, True), ("auto", False, True), ("cpu", True, True),
                                                ("auto", True, False), ("cuda", True, False)])
def test_start_job_logs_to_the_rule_log_on_the_granted_threads(tmp_path, monkeypatch, device, cuda, kept):
    """In a job that imported torch first (every model job): torch's pool takes the granted threads at once, and a
    job computing on the CPU, and only such a job, keeps its freed memory (recorded here instead of done, so this
    test's process keeps its allocator)."""
    from semalign.suite import jobs

    for stream in ("stdout", "stderr"):
        monkeypatch.setattr(sys, stream, getattr(sys, stream))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    calls = []
    monkeypatch.setattr(jobs, "keep_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    threads = torch.get_num_threads()
    log = tmp_path / "logs" / "rule" / "job.log"
    try:
        jobs.start_job(SimpleNamespace(log=[str(log)], threads=1, config={"device": device}))
        print("progress")
        print("a warning", file=sys.stderr)
        assert (torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]) == (1, "1")
    finally:
        torch.set_num_threads(threads)
    assert log.read_text() == "progress\na warning\n"
    assert calls == ([True] if kept else [])


FAULTS_AFTER_A_FREE = """
import resource, sys, torch
from semalign.suite.jobs import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(2**24)  # 64 MB, over glibc's largest mmap threshold (32 MB)
del x
before = faults()
x = torch.ones(3 * 2**22)  # 48 MB, where the freed block was
print(faults() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_a_cpu_job_reuses_freed_memory_instead_of_faulting_it_in_again():
    """Regression: a block over 32 MB freed and allocated again (a batch's logits, step after step) was unmapped
    and faulted in afresh, one page fault per 4 kB: a fifth of mini's CPU time was the kernel's."""
    def faults(mode: str) -> int:
        res = subprocess.run([sys.executable, "-c", FAULTS_AFTER_A_FREE, mode], capture_output=True, text=True,
                             cwd=REPO, check=True)
        return int(res.stdout.strip())

    assert faults("default") > 10_000  # 48 MB of fresh 4 kB pages: the cost is there to remove
    assert faults("keep") < 100


def test_default_profile_loads_under_config_overrides(tmp_path):
    """Regression: any --config key=value stopped the default profile (mini) from loading."""
    res = snakemake(tmp_path, None, "-n", "--quiet", "rules", "--config", "threads=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bootstrap_student" in res.stdout  # mini's own rule: the mini profile was loaded


# The shared smoke run's task: GSM8K, generation with a numeric answer, the cost benchmark's, the ablations' and the
# CKA task. The rules are the same for every task; each task's prompts, scoring and code execution run through lm-eval
# in tests/test_evaluation.py (test_tiny_hf_model_end_to_end, test_code_execution_sandbox). One task, not two, keeps
# the test command within its 10 minutes: the run's ~40 jobs are mostly interpreter start-up and the ~5 s import of
# torch and transformers, and each task adds ~22 of them (~200 s of CPU on 2 cores, measured at 65ad64b).
SMOKE_TASKS = ["gsm8k"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> SimpleNamespace:
    """One fp32 run of the whole smoke DAG on SMOKE_TASKS, shared by the tests that read it: on a copy of the
    repository with the README's worked example (a baseline with its own artifact) added from the README's text."""
    tmp = tmp_path_factory.mktemp("smoke")
    repo = copy_repo(tmp / "repo")
    touched = readme_example(repo)
    cfg = {**profile("smoke", repo), "tasks": SMOKE_TASKS, "analysis": {"cka_tasks": ["gsm8k"]},
           # one ablation axis, the one with an artifact of its own (a pairing file); the loss axis only changes
           # params (both expand alike: test_ablations_expand_into_variant_jobs)
           "ablations": {"tasks": ["gsm8k"], "methods": {"semalign": {"pairing": ["depth_ratio"]}}}}
    work = tmp / "work"
    work.mkdir()
    env = {"PYTHONPATH": str(repo)}  # the copy's packages, not the installed ones
    if (data := data_dir()) is not None:  # the checkout's ../shared/data: the copy has none beside it
        env["SEMALIGN_DATA_DIR"] = str(data)
    res = snakemake(work, cfg, "--cores", "2", env=env, repo=repo)
    return SimpleNamespace(repo=repo, touched=touched, cfg=cfg, work=work, env=env, res=res)


@pytest.mark.xdist_group("smoke")
def test_smoke_dag_end_to_end(smoke):
    """Every rule of the smoke profile, plus the README's worked example, and the tables' content."""
    repo, cfg, work, env, res = smoke.repo, smoke.cfg, smoke.work, smoke.env, smoke.res
    assert [p.relative_to(repo).as_posix() for p in smoke.touched] == [
        "baselines/prior_sft.py", "workflow/rules/methods/prior_sft.smk", "config/smoke.yaml"]
    assert cfg["methods"][-1] == "prior_sft"
    assert res.returncode == 0, res.stderr[-5000:]
    prior = work / "results" / "smoke" / "prior" / "tiny" / "gsm8k.pt"
    assert abs(float(torch.load(prior).sum()) - 1.0) < 1e-5  # the artifact was made and read

    tables = work / "results" / "smoke" / "tables"
    main = pd.read_csv(tables / "main.csv")
    assert list(main["method"]) == ["teacher", "student (no transfer)", "lora_sft", "kd", "layerwise_kd", "seeking",
                                    "laten", "semalign", "prior_sft"]
    assert main["GSM8K acc"].notna().all() and main["GSM8K acc"].astype(float).between(0, 100).all()
    nll = main.set_index("method")["GSM8K NLL"].astype(float)
    assert (nll > 0).all() and (nll < 1e4).all()
    # every trained method must move the student's answer NLL: the table reflects real training, not a copy
    # (LaTen's delta is ~0 by design at init and under its 1000 x MSE pull: checked on the weights below)
    for method in ["lora_sft", "kd", "layerwise_kd", "seeking", "semalign"]:
        assert nll[method] != nll["student (no transfer)"], method
    assert "small-scale profile 'smoke'" in (tables / "main.md").read_text()
    models = pd.read_csv(tables / "models.csv")
    assert set(models["layers"]) == {4, 2} and (models["vocab"] == 49152).all()
    for role in ("teacher", "student"):  # smoke's specs name no dtype: fp32 (the bf16 key: test_dtype_overrides...)
        prepared = work / "results" / "smoke" / "models" / f"tiny-{role}" / "prepared" / "manifest.json"
        assert json.loads(prepared.read_text())["dtype"] == "float32", role
    assert (work / "results" / "smoke" / "figures" / "main.png").stat().st_size > 10_000
    # SemAlign's analysis stages: Fig. 2 per model, attribution per task, a pairing that covers every student layer
    fig2 = pd.read_csv(work / "results" / "smoke" / "bases" / "tiny-student" / "decomposition.csv")
    assert set(fig2["basis"]) == {"output", "output_unfolded", "input", "random"} and fig2["cosine"].between(-1, 1).all()
    attribution = pd.read_csv(work / "results" / "smoke" / "attribution" / "tiny" / "gsm8k" / "grad_x_act.csv")
    assert sorted(attribution["layer"]) == [1, 2, 3, 4]
    pairing = json.loads((work / "results" / "smoke" / "pairing" / "tiny" / "gsm8k" / "attributed-grad_x_act.json").read_text())
    assert [p["student"] for p in pairing["pairs"]] == [1, 2]
    stages = pd.read_csv(work / "results" / "smoke" / "transfer" / "tiny" / "gsm8k" / "semalign" / "seed0" / "loss_curve.csv")
    assert set(stages["stage"]) == {1, 2} and stages["total"].notna().all()
    assert any((work / "logs" / "smoke" / "transfer").rglob("*.log"))
    assert any((work / "results" / "smoke" / "benchmarks" / "transfer").rglob("*.tsv"))
    transfer = work / "results" / "smoke" / "transfer" / "tiny" / "gsm8k"
    assert json.loads((transfer / "laten" / "seed0" / "train_stats.json").read_text())["delta_nonzero"] > 0
    assert len(pd.read_csv(transfer / "seeking" / "seed0" / "layer_sensitivity.csv")) == 4
    # the cost benchmark reuses the DAG's inputs and re-runs every trained method in its own process; one of its
    # work dirs holds the DAG's checkpoints of the same run (regression: a re-run of the benchmark resumed every
    # method from the previous run's checkpoints, so it timed loading, not training)
    shutil.copytree(transfer / "kd" / "seed0" / "ckpt", work / "results" / "smoke" / "bench" / "transfer_cost" / "kd" / "ckpt")
    bench = snakemake(work, cfg, "--cores", "2", "--", "results/smoke/bench/transfer_cost.md", env=env, repo=repo)
    assert bench.returncode == 0, bench.stderr[-3000:]
    cost = json.loads((work / "results" / "smoke" / "bench" / "transfer_cost.json").read_text())
    rows = {r["method"]: r for r in cost["rows"]}
    assert set(rows) == {"lora_sft", "kd", "layerwise_kd", "seeking", "laten", "semalign", "prior_sft"}
    assert len(cost["records"]) == 7 and not any(r["resumed"] for r in cost["records"])
    # determinism: each method trained again from scratch, in a fresh process, on the DAG's inputs (seed 0) saves
    # the DAG's weights byte for byte
    for method in rows:
        again = work / "results" / "smoke" / "bench" / "transfer_cost" / method / "model" / "model.safetensors"
        assert again.read_bytes() == (transfer / method / "seed0" / "model" / "model.safetensors").read_bytes(), method
    assert rows["kd"]["wall / kd"] == 1.0 and rows["kd"]["teacher fwd / example"] == 1.0
    assert rows["lora_sft"]["teacher fwd / example"] == 0.0 and rows["seeking"]["teacher fwd / example"] > 0
    assert rows["kd"]["student layer bwd / example"] == 2.0  # 2 layers x 1 epoch
    # where the time went, per component (semalign.suite.timing): each method's own parts, adding up to its wall
    parts = {r["component"]: r for r in cost["breakdown"]}
    assert parts["teacher logits"]["kd"] > 0 and parts["student forward"]["kd"] > 0 and parts["backward"]["kd"] > 0
    assert parts["prefix refresh"]["semalign"] > 0 and parts["aligned targets"]["semalign"] > 0
    assert parts["layer forward"]["semalign"] > 0 and parts["prefix refresh"]["kd"] == 0
    for method in ("kd", "semalign", "lora_sft"):  # nested sections charged once: together within the wall time
        assert 0 <= parts["other (load, save, setup)"][method] < parts["wall"][method], method
    assert (work / "results" / "smoke" / "bench" / "transfer_cost_breakdown.md").exists()
    cost = pd.read_csv(tables / "cost.csv")
    assert len(cost) == len(SMOKE_TASKS) * 7 and set(cost.loc[cost.method == "kd", "wall / kd"]) == {1.0}
    assert (cost.loc[cost.method == "kd", "teacher fwd / example"] == 1.0).all()
    hparams = pd.read_csv(tables / "hparams.csv").set_index("parameter")
    assert hparams.loc["epochs", "kd"] == "1" and hparams.loc["steps", "kd"] == "–"
    ablation = pd.read_csv(tables / "ablation_semalign__pairing.csv")
    assert list(ablation["pairing"]) == ["attributed (as configured)", "depth_ratio"]
    assert ablation["GSM8K acc"].notna().all() and ablation["GSM8K NLL"].nunique() == 2  # two different students
    figures = work / "results" / "smoke" / "figures"
    for fig in ["cost_gain.png", "ablation_semalign__pairing.png", "cka_tiny_gsm8k.png"]:
        assert (figures / fig).stat().st_size > 10_000, fig
    # the README's report command (regression: it once failed for want of --cores)
    report = snakemake(work, cfg, "--report", "results/smoke/report.html", env=env, repo=repo)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (work / "results" / "smoke" / "report.html").stat().st_size > 10_000
    # a truncated teacher cache (issue 14): the next run names it and moves it aside, the run after rebuilds it
    cache = work / "results" / "smoke" / "cache" / "tiny" / "gsm8k" / "teacher.pt"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    target = ("--", "results/smoke/transfer/tiny/gsm8k/kd/seed0/transfer.json")
    broken = snakemake(work, cfg, "--cores", "2", *target, env=env, repo=repo)
    log = (work / "logs" / "smoke" / "transfer" / "tiny" / "gsm8k" / "kd" / "seed0.log").read_text() + broken.stderr
    assert broken.returncode != 0 and f"corrupt teacher cache {cache.relative_to(work)}" in log, log[-3000:]
    assert not cache.exists() and any(cache.parent.glob("teacher.pt.corrupt-*"))
    healed = snakemake(work, cfg, "--cores", "2", *target, env=env, repo=repo)
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert torch.load(cache, weights_only=True)["meta"]["n_examples"] == 8



COMMITTED = REPO / "results" / "mini"  # the default profile's reference results, once a full mini run commits them


@pytest.mark.xdist_group("smoke")
def test_committed_mini_results_match_what_the_workflow_writes(smoke):
    """The reference results committed under results/mini have the columns the aggregate rule writes today, the
    README shows the committed main table and figure, and the manifest names the commit and versions that made
    them: changing a table's columns (or the main table) without regenerating and committing the mini run fails."""
    if not (COMMITTED / "tables" / "main.csv").exists():
        pytest.skip("no reference results committed under results/mini yet (issue 17: a full mini run commits them)")
    assert smoke.res.returncode == 0, "the smoke run failed (see test_smoke_dag_end_to_end)"
    written, committed = smoke.work / "results" / "smoke" / "tables", COMMITTED / "tables"
    shared = sorted(p.name for p in committed.glob("*.csv") if (written / p.name).exists())
    assert {"main.csv", "cost.csv", "hparams.csv", "summary.csv", "models.csv", "contamination.csv",
            "ablation_semalign__pairing.csv", "ablation_summary.csv"} <= set(shared)
    others = tuple(f"{TASK_LABELS[t]} " for t in TASK_LABELS if t not in SMOKE_TASKS)  # columns of unrun tasks
    for name in shared:
        want = [c for c in pd.read_csv(written / name).columns if c != "prior_sft"]  # the smoke run's worked example
        assert [c for c in pd.read_csv(committed / name).columns if not c.startswith(others)] == want, name
    readme = (REPO / "README.md").read_text()
    assert (committed / "main.md").read_text().strip() in readme
    assert "(results/mini/figures/main.png)" in readme and (COMMITTED / "figures" / "main.png").stat().st_size > 10_000
    manifest = json.loads((COMMITTED / "manifest.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["git"]["commit"]) and manifest["pip_freeze"]
    assert {"torch", "transformers", "lm_eval", "peft"} <= {k.replace("-", "_") for k in manifest["versions"]}


@pytest.mark.xdist_group("smoke")
def test_a_value_added_to_the_ablation_grid_after_a_run_is_run(smoke):
    """Regression: the final target named the main table but not the ablation tables, and Snakemake reruns a job for
    a missing output only when a target requests it: a value added to the grid after a run planned nothing at all."""
    assert smoke.res.returncode == 0, "the smoke run failed (see test_smoke_dag_end_to_end)"
    axes = smoke.cfg["ablations"]["methods"]["semalign"]
    cfg = {**smoke.cfg, "ablations": {**smoke.cfg["ablations"], "methods": {"semalign": {**axes, "loss": ["v1"]}}}}
    res = snakemake(smoke.work, cfg, "-n", env=smoke.env, repo=smoke.repo)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "Transfer semalign@loss=v1: tiny / gsm8k / seed 0" in out, out[-3000:]
    assert "results/smoke/tables/ablation_semalign__loss.md" in out and "Transfer kd" not in out


def test_replacing_a_local_model_dir_prepares_it_again(tmp_path):
    """Regression: a model whose source is a local dir (a user's checkpoint, benchmarks/carved_student.py's student)
    was prepared once and then reused after the dir's weights were replaced: its files are now the job's inputs."""
    from semalign.suite.models import prepare_model

    cfg = profile("smoke")
    source = tmp_path / "my-student"
    prepare_model(cfg["models"]["tiny-student"], source, seed=5)  # a plain HF dir, as a user's checkpoint is
    cfg["models"]["tiny-student"] = {"source": str(source)}
    target = ("--", "results/smoke/models/tiny-student/prepared/manifest.json")
    work = tmp_path / "work"
    work.mkdir()
    assert snakemake(work, cfg, "--cores", "1", *target).returncode == 0
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # replaced (same bytes: only the file's time tells)
    again = snakemake(work, cfg, "-n", *target)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Preparing model tiny-student" in again.stdout and str(weights) in again.stdout, again.stdout[-3000:]


def test_dtype_overrides_every_model_spec(tmp_path):
    """The top-level `dtype` reaches prepare_model's spec (every later rule loads the prepared weights as stored),
    and changing it re-prepares the model (a params change) instead of keeping the stale dtype. (Without the key
    the smoke specs store fp32: the shared smoke run checks that.)"""
    target = "results/smoke/models/tiny-student/prepared/manifest.json"
    res = snakemake(tmp_path, {**profile("smoke"), "dtype": "bfloat16"}, "--cores", "1", "--", target)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / target).read_text())["dtype"] == "bfloat16"
    again = snakemake(tmp_path, profile("smoke"), "-n", "--", target)
    assert again.returncode == 0, again.stderr[-3000:]
    reason = again.stdout[again.stdout.index("Preparing model tiny-student"):]
    assert reason.split("\n")[1].startswith("Reason: Params have changed since last execution") and "'dtype': 'bfloat16'" in reason
