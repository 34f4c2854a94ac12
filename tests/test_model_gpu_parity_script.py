"""bench/gpu_parity.py (run by hand on a GPU) keeps working: its CPU fp32 smoke mode, tiny shape."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_parity_script_cpu_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "MASTER_PORT": "29587"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_parity.py"), "--device", "cpu", "--hidden", "64",
         "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "501", "--seq", "32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_parity.json").read_text())
    print(f"[gpu_parity --device cpu] logits rel err ours {report['logits']['ours_vs_gold']:.2e}, "
          f"HF sdpa {report['logits']['hf_vs_gold']:.2e}")
    assert report["passed"] and report["dtype"] == "fp32"
    assert report["logits"]["ours_vs_gold"] <= 1e-5 and report["loss"]["ours_vs_gold"] <= 1e-5
    prof = report["attention_profile"]
    assert not prof["math_fallback_ran"]
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in prof["attention_kernels"]
    assert report["forced_backends"]["FLASH_ATTENTION"]["ok"]
    assert report["forced_backends"]["MATH"]["rel_err_vs_default"] <= 1e-5
