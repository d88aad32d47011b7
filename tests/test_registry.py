import pytest

from semalign.suite.registry import Method, available_methods, get_method, register_method


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
