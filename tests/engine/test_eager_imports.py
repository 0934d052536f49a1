"""megatron-core imported without its import-time ``torch.compile`` calls on a machine without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine import eager_imports
from tests.helpers import REPO, _env

PROBE = """
import json, sys
import engine, torch
real_compile = torch.compile
import megatron.core
from megatron.core.fusions import fused_bias_swiglu
from megatron.core.jit import jit_fuser
from megatron.core.models.gpt import GPTModel
print(json.dumps({
    "inductor_imported": "torch._inductor" in sys.modules,
    "compile_restored": torch.compile is real_compile,
    "swiglu_is_plain_function": type(fused_bias_swiglu.bias_swiglu).__name__ == "function",
    "jit_fuser_returns_its_argument": jit_fuser(len) is len,
}))
"""


def test_megatron_imports_without_compiling_when_there_is_no_cuda() -> None:
    """In a fresh process: no dynamo/inductor import, megatron's fused functions stay plain functions,
    and ``torch.compile`` is the real one again once the imports are done."""
    if torch.cuda.is_available():
        pytest.skip("the finder steps aside when CUDA is there")
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=_env(), text=True, capture_output=True,
                          timeout=300, check=True)
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe == {"inductor_imported": False, "compile_restored": True, "swiglu_is_plain_function": True,
                     "jit_fuser_returns_its_argument": True}


def test_eager_compile_is_reentrant_and_restores_torch_compile() -> None:
    real = torch.compile
    with eager_imports.eager_compile():
        with eager_imports.eager_compile():
            assert torch.compile(len) is len
            assert torch.compile(mode="max-autotune")(len) is len
        assert torch.compile is not real  # still inside the outer import
    assert torch.compile is real
    with pytest.raises(RuntimeError), eager_imports.eager_compile():
        raise RuntimeError("an import that fails")
    assert torch.compile is real


def test_the_finder_leaves_other_packages_and_cuda_machines_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    finder = eager_imports._MegatronFinder()
    assert finder.find_spec("json", None) is None
    monkeypatch.setattr(eager_imports, "_without_cuda", lambda: False)
    assert finder.find_spec("megatron.core", None) is None  # the normal finders load it, compile calls and all
    monkeypatch.setattr(eager_imports, "_without_cuda", lambda: True)
    spec = finder.find_spec("megatron.core.jit", [str(p) for p in __import__("megatron.core").core.__path__])
    assert spec is not None and isinstance(spec.loader, eager_imports._EagerLoader)
    assert spec.loader.get_filename("megatron.core.jit").endswith("jit.py")  # other loader methods pass through
