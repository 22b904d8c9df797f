#!/usr/bin/env bash
# GPU check (issue 17): the CUDA tests, then `ikr register --device cuda` timed on the thorax demo case.
#
#   bash bench/gpu_check.sh [CASE_DIR]
#
# CASE_DIR (or $IKR_GPU_CASE) holds fixed.nii.gz and moving.nii.gz (and landmark CSVs) of the demo
# case, as `ikr synth ../shared/data/ct/thorax_popi_T00_1p5mm.nii.gz -o DIR --family breathing --seed 0`
# writes them (the case `ikr demo` registers). Default: .device/thorax-demo, made from ../shared/data
# when absent. ../shared does not travel to a device machine: make the case here first (the same
# command with -o .device/thorax-demo; .device/ is git-ignored) and carry .device.
# Python: $IKR_PYTHON, else .venv/bin/python when it runs, else python3; the library is imported from
# this checkout. Wheels in .device/wheels (SimpleITK and what else is missing there) are installed
# into a temporary folder first when an import fails. Without CUDA it says so and exits 0.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 2
py="${IKR_PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$root/ImplicitKernelRegistration${PYTHONPATH:+:$PYTHONPATH}"
probe='import numpy, scipy, SimpleITK, torch; print("cuda" if torch.cuda.is_available() else "cpu", torch.__version__)'
found="$("$py" -c "$probe" 2>/dev/null)"
if [[ -z "$found" ]] && compgen -G ".device/wheels/*.whl" >/dev/null; then
    site="$(mktemp -d)"
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/wheels/*.whl || exit 2
    export PYTHONPATH="$site:$PYTHONPATH"
    found="$("$py" -c "$probe" 2>/dev/null)"
fi
if [[ -z "$found" ]]; then
    echo "gpu_check: $py cannot import numpy, scipy, SimpleITK and torch (put wheels in .device/wheels)"
    exit 2
fi
if [[ "$found" != cuda* ]]; then
    echo "gpu_check: skipped: torch ${found#cpu } sees no CUDA device here ($py); nothing was run"
    exit 0
fi
"$py" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

echo "== CUDA tests (pytest -k cuda)"
"$py" -m pytest -q -rs -k cuda Testing/test_kernel.py Testing/test_matching.py Testing/test_pipeline_register.py
tests=$?

case_dir="${1:-${IKR_GPU_CASE:-.device/thorax-demo}}"
ct="$root/../shared/data/ct/thorax_popi_T00_1p5mm.nii.gz"
if [[ ! -f "$case_dir/fixed.nii.gz" && -f "$ct" ]]; then
    echo "== making the thorax demo case in $case_dir"
    "$py" -m ImplicitKernelRegistrationLib.cli synth "$ct" -o "$case_dir" --family breathing --seed 0 || exit 2
fi
if [[ ! -f "$case_dir/fixed.nii.gz" ]]; then
    echo "gpu_check: no demo case in $case_dir (make it where ../shared/data is, and carry .device)"
    exit 2
fi

echo "== ikr register --device cuda on $case_dir (run 1 includes CUDA start-up; run 2 is warm)"
out="$(mktemp -d)"
for run in 1 2; do
    start=$(date +%s.%N)
    "$py" -m ImplicitKernelRegistrationLib.cli register "$case_dir/fixed.nii.gz" "$case_dir/moving.nii.gz" \
        -o "$out/run$run" --device cuda --quiet \
        --fixed-landmarks "$case_dir/landmarks_fixed.csv" --moving-landmarks "$case_dir/landmarks_moving.csv" \
        || exit 1
    end=$(date +%s.%N)
    "$py" - "$out/run$run/report.json" "$start" "$end" "$run" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
whole = float(sys.argv[3]) - float(sys.argv[2])
tre = report.get("tre_mm") or {}
tre_text = f", TRE mean {tre['mean']:.2f} mm" if "mean" in tre else ""
print(f"run {sys.argv[4]}: registration {report.get('runtime_s')} s on {report.get('device')}, "
      f"whole command {whole:.1f} s{tre_text} (target: registration under 1 s)")
EOF
done
rm -rf "$out"
exit $tests
