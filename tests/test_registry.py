import pytest

from semalign.suite.registry import Method, Preparation, available_methods, get_method, method_class, register_method


def test_builtin_methods_registered():
    names = available_methods()
    assert {"none", "teacher", "kd"} <= set(names)
    kd = get_method("kd")
    assert kd.uses_teacher_cache(kd.config({}))
    assert not get_method("lora_sft").uses_teacher_cache(get_method("lora_sft").config({}))
    assert get_method("none").reference == "student" and get_method("teacher").reference == "teacher"
    assert get_method("kd").reference is None


def test_unknown_method_lists_known():
    with pytest.raises(KeyError, match="available: .*kd"):
        get_method("no-such-method")


def test_duplicate_and_bad_registration():
    with pytest.raises(ValueError, match="already registered"):

        @register_method("kd")
        class Other(Method):
            pass

    with pytest.raises(TypeError):
        register_method("x")(object)


@pytest.mark.parametrize("method, shared, own", [
    ("seeking", {"lr": 0.5, "epochs": 3, "sensitivity_device": None}, [{"lora_r": 4}, {"seed_split": "align"}, {"lora_targets": ["v_proj"]}]),
    ("laten", {"lr": 0.5, "mse_weight": 1.0}, [{"steps": 1}, {"transfer_rate": 0.2}, {"modules": ["up_proj"]}]),
])
def test_a_variant_shares_the_preparation_unless_it_changes_what_prepare_reads(method, shared, own):
    """The preparation file is keyed by its settings: a variant that changes only training reuses it, one that
    changes what prepare reads (an omitted setting would hand it the other variant's factors or neurons) gets its own."""
    cls = method_class(method)
    (base,) = cls.needs(cls.config({}))
    assert isinstance(base, Preparation) and base.method == method
    assert cls.needs(cls.config(shared)) == [base]
    digests = {base.digest} | {cls.needs(cls.config(p))[0].digest for p in own}
    assert len(digests) == 1 + len(own)


def test_an_artifact_saved_twice_is_the_same_bytes(tmp_path, monkeypatch):
    """Regression: torch.save named the archive after the temporary file, which carries the process id, so two
    jobs saving the same preparation or cache wrote different bytes, and a transfer's fingerprint (the hashes of its
    artifacts) changed with nothing changed."""
    import os

    import torch

    from semalign.suite.io import atomic_torch_save, sha256

    obj = {"factors": {"lm_head": (torch.arange(6.0).reshape(2, 3), torch.ones(3, 2))}, "selected": [0, 2]}
    for pid in (4242, 4343):  # two jobs, as their temporaries name them
        monkeypatch.setattr(os, "getpid", lambda: pid)
        atomic_torch_save(obj, tmp_path / str(pid) / "prepare.pt")
    assert sha256(tmp_path / "4242" / "prepare.pt") == sha256(tmp_path / "4343" / "prepare.pt")
    loaded = torch.load(tmp_path / "4343" / "prepare.pt")
    assert torch.equal(loaded["factors"]["lm_head"][0], obj["factors"]["lm_head"][0])
