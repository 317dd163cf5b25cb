#!/usr/bin/env bash
# One device call: steps named on the command line, each under its own time limit, logs under $OUT.
#   bash bench/gpu_call.sh tests quant hostprof          (see STEPS below)
# Keeps going after a failed step, so one call returns every step's output.
set -u
OUT=${OUT:-/tmp/kvpass_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed (tests may miss the plugin)"
run() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${secs}s)"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "=== $name rc=$? ($(date -u +%H:%M:%S))"
  [ -f "$OUT/e2e_decode.json" ] && mv "$OUT/e2e_decode.json" "$OUT/$name.json"  # one JSON per step
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}
P1B=8x4096,8x16384,8x32768,1x4096,1x16384,1x32768  # batch 8 first: dynamic=True graphs then serve every batch > 1
for step in "$@"; do
  case $step in
    env) run env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"' ;;
    tests) KVPASS_TEST_DEVICE=cuda run tests 330 python3 -m pytest -q -p no:cacheprovider tests/lowering/test_quantize_rows.py tests/lowering/test_storage_int4.py tests/lowering/test_storage_schemes.py tests/backend/test_packed.py -k "cuda or in_place or general_path or int4 or kernel" ;;
    convert) run convert 200 python3 bench/attention_quant.py --sweep --grid code_convert=0,1,2 --schemes 8 4 fp8 --budget-s 170 ;;
    quant) run quant 170 python3 bench/attention_quant.py --budget-s 100 ;;
    hostprof) TAIL=120 run hostprof 150 python3 bench/host_profile.py --methods kvpass-int8,kvpass-int4 --layers 4 --steps 16 --top 30 ;;
    e2e8b) run e2e8b 560 python3 bench/e2e/e2e_decode.py --shapes llama3-8b --points 8x32768 --methods inductor,kvpass-int4 --new-tokens 8 --profile-steps 1 --generate ;;
    quant84) run quant84 120 python3 bench/attention_quant.py --schemes 8 4 --budget-s 90 ;;
    e2e8b4) run e2e8b4 330 python3 bench/e2e/e2e_decode.py --shapes llama3-8b --points 4x32768 --methods inductor,kvpass-int4 --new-tokens 8 --profile-steps 1 ;;
    int4tiles) run int4tiles 110 python3 bench/attention_quant.py --sweep --grid block_n=32,64,128 num_warps=2,4 --schemes 4 --budget-s 75 ;;
    # 2026-12-01 session 6: the issue-8 matrix (baselines prefill eagerly: bench/e2e/e2e_decode.py EAGER_PREFILL)
    e2e8b32) run e2e8b32 520 python3 bench/e2e/e2e_decode.py --shapes llama3-8b --points 8x32768 --eager-prefill --methods inductor,kvpass-int4,kvpass-snapkv2048,kvpass-adore2048 --new-tokens 8 --profile-steps 1 ;;
    e2e1ba) run e2e1ba 540 python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --points 1x4096,1x16384,1x32768,8x4096,8x16384,8x32768 --eager-prefill --methods eager,inductor,inductor-static-ro,kvpass-exact,kvpass-exact-static-ro --new-tokens 16 --profile-steps 0 ;;
    e2e1bb) run e2e1bb 540 python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --points 1x4096,1x16384,1x32768,8x4096,8x16384,8x32768 --eager-prefill --methods kvpass-int8,kvpass-int4,kvpass-snapkv2048,kvpass-adore2048 --new-tokens 16 --profile-steps 0 ;;
    e2e1b32) run e2e1b32 520 python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --points 8x32768 --eager-prefill --methods inductor,kvpass-int4,kvpass-exact,kvpass-snapkv2048,kvpass-adore2048,inductor-static-ro,kvpass-int8,kvpass-exact-static-ro --new-tokens 16 --profile-steps 0 ;;
    # 2026-12-01 session 7: the 1B matrix with 17 warm-ups, dynamic compiles, fixed-shape static masks; fit probes
    e2e1c) run e2e1c 575 python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --points $P1B --dynamic --eager-prefill --methods inductor,inductor-static-ro,kvpass-exact,kvpass-exact-static-ro --new-tokens 16 --profile-steps 0 --fit-context 32768 --fit-chunk 4096 --fit-methods inductor --fit-batches 16,32 ;;
    e2e1d) run e2e1d 580 python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --points 8x4096,8x16384,8x32768,1x32768 --methods kvpass-exact-static-ro,kvpass-int8,kvpass-int4 --new-tokens 16 --profile-steps 0 --fit-context 32768 --fit-chunk 4096 --fit-methods kvpass-int4 --fit-batches 16,32 --fit-tries 1 ;;
    # next: the rows session 7 did not reach (see bench/RESULTS.md, "Session 7")
    e2e1f) run e2e1f 575 python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --points $P1B --eager-prefill --methods kvpass-exact,kvpass-int4-exit,kvpass-snapkv2048 --new-tokens 16 --profile-steps 0 ;;
    e2e8bx) run e2e8bx 575 python3 bench/e2e/e2e_decode.py --shapes llama3-8b --points 8x4096,8x16384,1x32768 --eager-prefill --methods inductor-static-ro,kvpass-int4 --new-tokens 8 --profile-steps 0 --generate --generate-points 8x16384 ;;
    fitint4) run fitint4 575 python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --points 8x4096 --methods kvpass-int4 --new-tokens 4 --profile-steps 0 --fit-context 32768 --fit-chunk 8192 --fit-batches 16,32 --fit-tries 1 ;;
    # 2026-12-02 session 8: int8's rotation moved into the kernels; its end-to-end effect
    e2e1int8) run e2e1int8 330 python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --points 8x32768,1x32768 --methods kvpass-int8,kvpass-int4 --new-tokens 16 --profile-steps 0 ;;
    # next: the query's rotation by butterfly (0) or by one MMA (1), at the rule's tiles (--grid starts from them)
    rotsweep) run rotsweep 200 python3 bench/attention_quant.py --sweep --grid rotate_query_by_mma=0,1 --schemes 8 --budget-s 170 ;;
    # 2026-12-02 session 9: int8 keys scored by the query's int8 split, values in token blocks; against the old paths
    quant8) run quant8 240 python3 bench/attention_quant.py --schemes 8 8-convert 8-split 8-blocked fp8 4 --budget-s 200 --json $OUT/quant8.json ;;
    sweep8) run sweep8 200 python3 bench/attention_quant.py --sweep --grid block_n=128,256 num_warps=4,8 rotate_query_by_mma=0,1 --schemes 8 --budget-s 170 --json $OUT/sweep8.json ;;
    # 2026-12-02 session 10: why kvpass exact crashes under StaticCache + reduce-overhead (2 layers of the 1B
    # shape): both RO methods with eager prefill, with compiled prefill, and kvpass without graph partitions
    roprobe) TAIL=60 run roprobe 300 bash -c 'E="python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --layers 2 --points 1x4096,8x4096 --new-tokens 8 --profile-steps 0 --verbose"; echo "## a: eager prefill"; $E --eager-prefill --methods inductor-static-ro,kvpass-exact-static-ro 2>&1 | grep -v Warning | tail -40; echo "## b: compiled prefill"; $E --methods inductor-static-ro,kvpass-exact-static-ro 2>&1 | tail -40; echo "## c: compiled prefill, no graph partition"; TORCHINDUCTOR_GRAPH_PARTITION=0 $E --methods kvpass-exact-static-ro 2>&1 | tail -30' ;;
    # the 8B shape's missing points (baselines; --dynamic: one compile per method serves every point)
    e2e8ba) run e2e8ba 330 python3 bench/e2e/e2e_decode.py --shapes llama3-8b --points 8x4096,8x16384,1x4096,1x16384,1x32768 --eager-prefill --dynamic --methods inductor,inductor-static-ro --new-tokens 8 --profile-steps 0 ;;
    e2e8bb) run e2e8bb 470 python3 bench/e2e/e2e_decode.py --shapes llama3-8b --points 8x4096,8x16384,8x32768,1x4096,1x32768 --eager-prefill --dynamic --methods kvpass-exact-static-ro,kvpass-int8 --new-tokens 8 --profile-steps 0 ;;
    e2e8bc) run e2e8bc 300 python3 bench/e2e/e2e_decode.py --shapes llama3-8b --points 8x32768,8x4096,1x32768 --dynamic --methods kvpass-int4 --new-tokens 8 --profile-steps 0 ;;
    # the budgeted policies' decode step: general vs in place (lowering/slot_replacement.py), and the full cache
    policystep) run policystep 100 python3 bench/policy_decode_step.py ;;
    quant84s) run quant84s 130 python3 bench/attention_quant.py --schemes 8 4 --budget-s 70 --json $OUT/quant84s.json ;;
    tests10) KVPASS_TEST_DEVICE=cuda run tests10 150 python3 -m pytest -q -p no:cacheprovider tests/lowering/test_storage_int4.py tests/lowering/test_storage_schemes.py tests/backend/test_packed.py -k "4 or int4 or in_place" ;;
    # whose recording fails when the same compiled function also ran the prefill: each method in its own process
    robprobe) TAIL=30 run robprobe 170 bash -c 'E="python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --layers 2 --points 1x4096 --new-tokens 4 --profile-steps 0 --verbose"; for m in inductor-static-ro kvpass-exact-static-ro; do echo "## $m, compiled prefill"; timeout 80 $E --methods $m 2>&1 | grep -E "static-ro|Error|error" | grep -v "^W1" | tail -6; done' ;;
    # next session: the 8B rows still missing (bench/RESULTS.md, session 10), int4 with this session's kernel
    e2e8bd) run e2e8bd 575 python3 bench/e2e/e2e_decode.py --shapes llama3-8b --points 8x32768,8x4096,1x4096,1x32768 --dynamic --methods kvpass-int4,kvpass-int8 --new-tokens 8 --profile-steps 0 ;;
    e2e8be) run e2e8be 575 python3 bench/e2e/e2e_decode.py --shapes llama3-8b --points 1x4096,1x16384,1x32768,8x32768 --eager-prefill --dynamic --methods inductor-static-ro,kvpass-snapkv2048 --new-tokens 8 --profile-steps 0 ;;
    fit8b) run fit8b 575 python3 bench/e2e/e2e_decode.py --shapes llama3-8b --points 8x4096 --eager-prefill --methods inductor,kvpass-int4 --new-tokens 4 --profile-steps 0 --fit-context 32768 --fit-chunk 8192 --fit-batches 8,16 --fit-tries 1 ;;
    # session 11: ADORE's step without the full-precision cold splice, next to snapkv and the full cache (and the
    # 1B end-to-end point it was 152 ms per token at)
    adorestep) run adorestep 200 python3 bench/policy_decode_step.py --policies snapkv,adore --steps 16 ;;
    e2eadore) run e2eadore 420 python3 bench/e2e/e2e_decode.py --shapes llama3.2-1b --points 8x32768 --eager-prefill --methods kvpass-adore2048,kvpass-snapkv2048,kvpass-exact --new-tokens 16 --profile-steps 0 ;;
    # 2026-12-05 session 11 (CPU only, not yet timed): int4 keys by the folded query's int8 split. Its timing at the
    # issue's three shapes against the dequantized keys (4-dequant) and SDPA bf16, then the int4 CUDA tests.
    int4split) run int4split 480 bash -c "python3 bench/attention_quant.py --schemes 4 4-dequant --budget-s 150 --json $OUT/int4split.json; KVPASS_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/lowering/test_storage_int4.py tests/lowering/test_storage_schemes.py -k 'int4 or folded or 4'" ;;
    *) echo "unknown step $step" ;;
  esac
done
