"""Display names shared by tables and figures."""

TASK_LABELS = {"mmlu": "MMLU", "gsm8k": "GSM8K", "humaneval": "HumanEval", "mbpp": "MBPP"}
ROW_LABELS = {"teacher": "teacher", "none": "student (no transfer)"}
