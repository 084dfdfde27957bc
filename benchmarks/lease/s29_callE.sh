#!/usr/bin/env bash
# Session 29, call E (cold box): the CUDA test call D failed on a test fault (four rows shared one page, so their
# K/V stores raced and two runs' logits differed), fixed: the batch graph's in-graph draws against sample_rows,
# then sampled rows ahead against serial on captured graphs.
source "$(dirname "$0")/lib.sh"
cuda_tests 150 tests/test_scheduler_ahead.py -k "cuda"
