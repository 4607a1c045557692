"""benchmarks/integrations_e2e.py in CI: PEFT LoRA GPT-2, bf16 autocast Llama and lucidrains end to end.

Each run trains a tiny random model for two optimizer steps through an integration and raises when a
loss is not finite or nothing trained. Runs whose third-party package is absent are skipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "integrations_e2e.py"


def _script():
    spec = importlib.util.spec_from_file_location("integrations_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "run, needs",
    [
        pytest.param("peft_lora_gpt2", ("transformers", "peft"), id="peft_lora_gpt2"),
        pytest.param("bf16_autocast_llama", ("transformers",), id="bf16_autocast_llama"),
        pytest.param("lucidrains", ("recurrent_memory_transformer_pytorch",), id="lucidrains"),
    ],
)
def test_end_to_end(run, needs):
    for package in needs:
        pytest.importorskip(package)
    result = _script().RUNS[run](torch.device("cpu"), steps=2)
    assert result and all(len(losses) == 2 for losses in result.values())


def test_main_reports_failures(capsys):
    script = _script()
    script.RUNS = {"broken": lambda device, steps: 1 / 0}
    assert script.main(["--device", "cpu", "--runs", "broken"]) == 1
    assert "broken: FAILED ZeroDivisionError" in capsys.readouterr().out
