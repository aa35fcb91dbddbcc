#!/usr/bin/env bash
# One device run (about 8 minutes on an H200): the GPU tests, a bf16 check, a long-context mixer benchmark
# (Triton vs fused vs reference vs SDPA) and the kernel comparison of benchmarks/gpu_compare.py (VKT's
# kernels vs fla-core's chunked scan and flex_attention), everything written to $OUT.
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
# Uses the machine's own python3 with torch + triton + transformers. fla-core (and einops) install from
# wheels in $WHEELS when there are any (the device has no network): fetch them here first with
#   pip download fla-core einops --no-deps -d .cache/vkt-hf/wheels
# and carry .cache/vkt-hf/wheels.
set -u
export OUT=${OUT:-/tmp/vkt_gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1
$PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT/versions.txt"

echo "== pytest -m gpu"
timeout 150 $PY -m pytest -m gpu tests/test_ops_fast.py -q -p no:cacheprovider -x 2>&1 | tail -25 | tee "$OUT/pytest_gpu.txt"

echo "== bf16"
timeout 60 $PY - <<'PYEOF' 2>&1 | tee "$OUT/bf16.txt"
import json, os, torch
from vkt_hf.ops import functional as ref, triton as tri
torch.manual_seed(0)
B, H, N, D = 1, 9, 65536, 128
s32 = torch.randn(B, H, N, D, device="cuda"); s16 = s32.bfloat16()
w = torch.nn.functional.softplus(torch.randn(B, H, N, device="cuda")); m = torch.ones(B, N, device="cuda")
null = torch.randn(H, D, device="cuda"); ld = torch.log(ref.gamma_init(H)).cuda()
out = {}
with torch.no_grad():
    k_ref16, _ = ref.global_context(s16, w, m, null, ld); k_tri16, _ = tri.global_context(s16, w, m, null, ld)
    k_ref32, _ = ref.global_context(s32, w, m, null, ld)
    t_ref16, _ = ref.local_context(s16, m, null, 16); t_tri16, _ = tri.local_context(s16, m, null, 16)
    t_ref32, _ = ref.local_context(s32, m, null, 16)
def rel(a, b): return ((a - b).abs().max() / b.abs().max()).item()
out["K: triton(bf16 in) vs reference(bf16 in), max abs"] = (k_tri16 - k_ref16).abs().max().item()
out["T: triton(bf16 in) vs reference(bf16 in), max abs"] = (t_tri16 - t_ref16).abs().max().item()
out["K: bf16 inputs vs fp32 inputs (reference), max err / max |K|"] = rel(k_ref16, k_ref32)
out["T: bf16 inputs vs fp32 inputs (reference), max err / max |T|"] = rel(t_ref16, t_ref32)
out["output dtype"] = str(k_tri16.dtype)
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "bf16.json"), "w"), indent=1)
PYEOF

echo "== mixer benchmark"
timeout 200 $PY benchmarks/mixer.py --device cuda --in-process --modes fwd \
  --methods vkt_core vkt_core_fused vkt_core_ref sdpa vkt_layer copy none \
  --lengths 4096 16384 65536 262144 1048576 --repeats 5 --max-seconds 15 \
  --out "$OUT/mixer_h200.json" 2>&1 | grep -v "^wrote" | tail -40
echo "== kernel comparison (fla-core, flex_attention)"
WHEELS=${WHEELS:-.cache/vkt-hf/wheels}
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  $PY -m pip install --quiet --no-deps --no-index "$WHEELS"/*.whl 2>&1 | tail -2
fi
timeout 240 $PY benchmarks/gpu_compare.py --device cuda --out "$OUT/gpu_compare_h200.json" 2>&1 | tail -40
echo "== done"
