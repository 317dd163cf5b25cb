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
