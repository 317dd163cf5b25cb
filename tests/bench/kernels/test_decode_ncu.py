"""bench/kernels/decode_ncu.py: ncu's raw CSV page read into per-kernel metrics and stall reasons."""
import importlib

import pytest

ncu = importlib.import_module("bench.kernels.decode_ncu")

RAW = '''==PROF== Connected to process 4242 (/usr/bin/python3)
child done: 4 8x32768, out (8, 32, 1, 128) finite True
"ID","Process ID","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread",\
"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","smsp__warps_launched.sum"
"","","","usecond","register/thread","ratio","ratio","ratio","warp"
"0","4242","decode_attention_split_kernel","1,234.5","128","3.5","0.25","1.75","1056"
"1","4242","merge_splits_kernel","12.0","40","0.5","n/a","2.0","256"
'''


def test_raw_page_gives_each_kernels_metrics_and_stalls_largest_first():
    kernels = ncu.parse_raw_csv(RAW)
    assert [k["kernel"] for k in kernels] == ["decode_attention_split_kernel", "merge_splits_kernel"]
    first, merge = kernels
    assert first["duration"] == pytest.approx(1234.5) and first["units"]["duration"] == "usecond"
    assert first["registers_per_thread"] == 128
    assert first["stalls"] == [("long_scoreboard", 3.5), ("wait", 1.75), ("math_pipe_throttle", 0.25)]
    assert merge["stalls"] == [("wait", 2.0), ("long_scoreboard", 0.5)]  # a value ncu did not give is left out


def test_output_without_a_table_gives_no_kernels():
    assert ncu.parse_raw_csv("==ERROR== the profiler could not read the counters\n") == []


SOURCE = '''==PROF== Disconnected from process 4242
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",\
"Instructions Executed"
"00007f0000000100","LDG.E.128 R4, desc[UR6][R2.64]","10","9","64"
"00007f0000000110","@!P0 BAR.SYNC.DEFER_BLOCKING 0x0","40","38","64"
"00007f0000000120","HMMA.16816.F32.BF16 R8, R12, R16, R8","25","20","128"
"00007f0000000130","@P1 LDG.E.128 R20, desc[UR6][R22.64]","5","5","64"
"00007f0000000140","EXIT","","","1"
'''


def test_source_page_gives_the_most_sampled_instructions_and_samples_per_opcode():
    page = ncu.parse_source_csv(SOURCE, top=2)
    assert page["total"] == 80.0
    assert [(e[1].split()[1 if e[1].startswith("@") else 0], e[2], e[3]) for e in page["top"]] == [
        ("BAR.SYNC.DEFER_BLOCKING", 40.0, 38.0), ("HMMA.16816.F32.BF16", 25.0, 20.0)]
    # predicates are not part of the opcode; the two loads add up; a row without samples is left out
    assert page["opcodes"] == {"BAR.SYNC.DEFER_BLOCKING": 40.0, "HMMA.16816.F32.BF16": 25.0, "LDG.E.128": 15.0}


def test_source_page_without_sampling_columns_is_empty():
    assert ncu.parse_source_csv('"Address","Source"\n"0","EXIT"\n')["top"] == []
    assert ncu.parse_source_csv("==ERROR== no report\n") == {"top": [], "opcodes": {}, "total": 0.0}
