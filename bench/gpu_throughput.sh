#!/usr/bin/env bash
# One device call: batched-vs-sequential agreement on the device, then bench/throughput.py for the issue's
# configs, each also timing the engine before the change (.bench_baseline/batched_before.py, when carried).
# Needs .whl carried (opacus 1.6.0, peft 0.21.2, transformers 5.24.0). Logs to $OUT/log.txt, JSON lines to
# $OUT/results.jsonl.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
{
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
PY=${PY:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/opacus-*.whl .whl/peft-*.whl || exit 1
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_tf .whl/transformers-*.whl || true
export PYTHONPATH=/tmp/site_tf:/tmp/site:$PWD
if ! $PY -c "import transformers, peft, peft_deer.federated" >/dev/null 2>&1; then
  echo "carried transformers 5.24 failed to import; falling back to the image's"; export PYTHONPATH=/tmp/site:$PWD
fi
$PY -c "import torch, transformers, peft, opacus; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'opacus', opacus.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
echo "=== [${SECONDS}s] batched vs sequential on ${DEVICE:-cuda} (tests/test_batched.py's tiny ViT, clients of 7/12/20 samples)"
DEVICE=${DEVICE:-cuda} timeout -k 5 90 $PY - <<'PY' 2>&1 | grep -v -i warn | tee -a "$OUT/results.jsonl"
import json, os, sys
import torch
sys.path.insert(0, "tests")
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
from test_batched import SGD, assert_close_updates, make
from peft_deer.federated import BatchedEngine, FederatedServer, LocalTraining, SequentialEngine, get_adapter_state, iter_phases
device = os.environ["DEVICE"]
from functools import partial
def run(method, engine_cls, training):
    model, layout, tasks = make(method)
    model.to(device)
    server = FederatedServer(method, layout, get_adapter_state(model, layout), len(tasks), len(tasks), None, seed=3)
    per_phase = []
    for phase in iter_phases(method, 1):
        per_phase.append(engine_cls(training).train_clients(model, layout, server.global_state, phase, tasks))
        server.finish_phase(phase, per_phase[-1])
    return per_phase
adamw = LocalTraining(local_epochs=2, batch_size=4, lr=1e-3, weight_decay=1e-2, optimizer="adamw")
bf16 = LocalTraining(local_epochs=2, batch_size=4, lr=0.1, momentum=0.9, weight_decay=1e-2, mixed_precision="bf16")
staged = partial(BatchedEngine, stage_on_device=True)
cases = [("deer-sgd", "deer", SGD, BatchedEngine), ("lora-sgd", "lora", SGD, BatchedEngine), ("deer-adamw", "deer", adamw, BatchedEngine),
         ("deer-bf16", "deer", bf16, BatchedEngine), ("deer-sgd-staged", "deer", SGD, staged), ("lora-bf16-staged", "lora", bf16, staged)]
for name, method, training, engine in cases:
    seq, bat = run(method, SequentialEngine, training), run(method, engine, training)
    diff = max(float((v.delta[k] - u.delta[k]).abs().max()) for ps, pb in zip(seq, bat) for u, v in zip(ps, pb) for k in u.delta)
    try:
        if training.mixed_precision == "bf16":
            for u, v in zip(seq[-1], bat[-1]):
                for k in u.delta:
                    torch.testing.assert_close(v.delta[k], u.delta[k], rtol=0.05, atol=1e-2)
        else:
            assert_close_updates(seq, bat)
        ok, why = True, ""
    except AssertionError as e:
        ok, why = False, str(e).splitlines()[0][:200]
    print(json.dumps({"check": name, "device": device, "ok": ok, "max_abs_delta_diff": diff, "why": why}))
PY
run() {  # run <timeout_s> <args...>
  local t=$1; shift
  echo "=== [${SECONDS}s] throughput.py $*"
  timeout -k 5 "$t" $PY bench/throughput.py "$@" 2>&1 | grep -v -i "warn" | tee /tmp/last.txt
  echo "--- rc=${PIPESTATUS[0]}"
  tail -1 /tmp/last.txt | grep '^{' >> "$OUT/results.jsonl"
}
BASE=(); [ -f .bench_baseline/batched_before.py ] && BASE=(--baseline .bench_baseline/batched_before.py)
if [ -n "${SMOKE:-}" ]; then run 300 --model tiny-vit --steps 1 --clients 2 --batch-per-client 2 "${BASE[@]}"; exit; fi
run 80  --model vit-b16 --image-size 224 --clients 12 --batch-per-client 16 --steps 3 "${BASE[@]}"
run 120 --model vit-b16 --image-size 224 --clients 32 --batch-per-client 32 --steps 3 "${BASE[@]}"
run 60  --model dinov2-s --image-size 224 --clients 12 --batch-per-client 16 --steps 3 "${BASE[@]}"
echo "=== done in ${SECONDS}s"; cat "$OUT/results.jsonl"
} 2>&1 | tee "$OUT/log.txt"
