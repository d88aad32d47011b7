"""The identifiers that name things across rules, paths and tables, each with one ``parse`` and one ``format``.

A wildcard or a file name is a string; inside Python it is one of these small frozen types, so the structure of a
name (which method a variant belongs to, which attribution an attributed pairing reads) is never re-derived by
string surgery in several places.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

_NAME = r"[A-Za-z0-9_]+"


@dataclass(frozen=True)
class Variant:
    """A method, or one ablation variant of it: ``method`` or ``method@key=value`` (the method run with one
    hyperparameter replaced). The value is kept as YAML reads it, so ``@kl_every_stage=true`` is a bool."""

    method: str
    key: str | None = None
    value: Any = None

    PATTERN = rf"{_NAME}(@{_NAME}=[^/@]+)?"  # a Snakemake wildcard constraint

    @classmethod
    def parse(cls, text: str) -> Variant:
        if not re.fullmatch(cls.PATTERN, text):
            raise ValueError(f"{text!r} is not a method name or a variant `method@key=value`")
        method, _, rest = text.partition("@")
        if not rest:
            return cls(method)
        key, _, value = rest.partition("=")
        return cls(method, key, yaml.safe_load(value))

    def format(self) -> str:
        if self.key is None:
            return self.method
        value = yaml.safe_dump(self.value, default_flow_style=True).strip().removesuffix("\n...").strip()
        return f"{self.method}@{self.key}={value}"

    @property
    def is_variant(self) -> bool:
        return self.key is not None

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class PairingName:
    """A layer pairing file's name: the strategy, and for the attribution-driven strategies the attribution method
    whose scores they read (``attributed-grad_x_act``), so ablations over either never share a file."""

    strategy: str
    attribution: str | None = None

    @classmethod
    def parse(cls, text: str) -> PairingName:
        strategy, _, attribution = text.partition("-")
        return cls(strategy, attribution or None)

    def format(self) -> str:
        return self.strategy if self.attribution is None else f"{self.strategy}-{self.attribution}"

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class SplitId:
    """One split file of one task: ``gsm8k/train`` is ``splits/gsm8k/train.jsonl``."""

    task: str
    split: str

    @classmethod
    def parse(cls, text: str) -> SplitId:
        task, sep, split = text.partition("/")
        if not sep or not task or not split:
            raise ValueError(f"{text!r} is not a split id `task/split`")
        return cls(task, split)

    def format(self) -> str:
        return f"{self.task}/{self.split}"

    def __str__(self) -> str:
        return self.format()
