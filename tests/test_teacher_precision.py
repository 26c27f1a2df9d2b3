"""`mixed_precision: auto` picks bf16 only on hardware with bf16 arithmetic (teacher/precision.py)."""
import pytest

from teacher.precision import cpu_flags, cpu_has_bf16, resolve_mixed_precision

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SPR = "processor\t: 0\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n"


@pytest.mark.parametrize("text,expected", [(ZEN3, "no"), (ZEN4, "bf16"), (SPR, "bf16")])
def test_auto_follows_the_cpu_flags(tmp_path, text, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    assert resolve_mixed_precision("auto", cuda=False, cpuinfo=info) == expected


def test_explicit_values_pass_through(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(ZEN3)
    assert resolve_mixed_precision("bf16", cuda=False, cpuinfo=info) == "bf16"
    assert resolve_mixed_precision("no", cuda=False, cpuinfo=tmp_path / "missing") == "no"


def test_cuda_decides_by_its_own_support(tmp_path):
    assert resolve_mixed_precision("auto", cuda=True, cuda_bf16=True) == "bf16"
    assert resolve_mixed_precision("auto", cuda=True, cuda_bf16=False) == "no"


def test_unreadable_cpuinfo_means_no_bf16(tmp_path):
    assert cpu_flags(tmp_path / "missing") == set()
    assert not cpu_has_bf16(tmp_path / "missing")
    assert resolve_mixed_precision("auto", cuda=False, cpuinfo=tmp_path / "missing") == "no"


def test_config_accepts_auto_and_rejects_others():
    from dllm2rec.errors import ConfigError
    from teacher.finetune import FinetuneConfig, validate

    validate(FinetuneConfig(mixed_precision="auto"))
    with pytest.raises(ConfigError, match="mixed_precision"):
        validate(FinetuneConfig(mixed_precision="fp16"))
