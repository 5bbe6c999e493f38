"""The benchmarks (speed and memory; docs/PERFORMANCE.md). `scripts/bench.py` and `python -m frod_cli.bench` are
the command (cli.py); every figure in docs/PERFORMANCE.md comes from one of these modules.

Layout, one module per question over shared helpers:
- train_step.py   the default: one training step of full, LoRA, PEFT's FRoD and our FRoD on one model and batch
                  (--preset, --methods, --grad-accum, the sweeps);
- basis_build.py  --build: the FRoD basis build, cold, from the cache, split over processes (torchrun);
- basis_stream.py --build --build-mode memory,streamed: the basis build in memory against streamed (peak beyond the
                  weights, time; each point in its own process), and --build-precision: the streamed factors
                  against the in-memory ones on real weights (MiniLM, SmolLM2);
- quantized.py    --quantized memory|generation: FRoD on a 4-bit base next to QLoRA;
- fsdp.py         --fsdp: memory per process under train.fsdp, two CPU processes (torchrun) against one: rank-0
                  loading's host memory, the per-rank bytes of an NF4 base and of method=full's AdamW state;
- common.py       what they share: the resident-set peak (`PeakRSS`: VmHWM after clear_refs, a sampling thread
                  elsewhere), a device's peak (`DevicePeak`: the CUDA allocator's on a GPU, PeakRSS on the CPU),
                  `params_buffers_bytes` / `optimizer_state_bytes` / `storage_bytes` (each storage once),
                  `summarize` (median, min, max, spread of repeated timings), `ratio`, `environment(device, dtypes)`
                  (the record every result carries: date, host, versions, CPU, threads, load, the CPU's capability
                  and native dtypes, the dtypes its figures compute in), `write_result` (the JSON written
                  atomically, the table printed under `machine_line`: which CPU kind and dtypes it needs),
                  `make_log`, `refuse` (bad input: one line, exit 2);
- presets.py      the models (`PRESETS`: seeded random BERT / LLaMA / CLIP shapes, MiniLM's weights);
- adapters.py     the method names, built through the registry `frod train` uses (frod_cli.methods): `build`,
                  `adapt`, and `adapt_shape_only` (FRoD on a synthetic basis read from a temporary basis cache,
                  for shapes whose decomposition takes minutes on a CPU).

How to add a benchmark:
1. A module here with `add_args(parser)` (its flags in an argument group; a flag that selects it, e.g. --fsdp),
   `selected(args) -> bool` (that flag is set) and `run(args, log) -> int`, which ends with
   `write_result(result, table, args.out or "bench_out/<name>.json")`, `result` holding
   `environment(args.device, <the dtypes its figures compute in>)` and `wall_s`.
2. Add the module to `cli.benchmarks()` (before train_step, the default).
3. Build models with `presets` (or its own shapes), methods with `adapters.build` / `adapters.adapt`, measure with
   `common` (extend `environment` there when every result should record something new).
4. Its test calls `cli.main([...])` in-process on tiny shapes (tests/test_bench.py), asserting the JSON's keys and
   what must hold whatever the timing; no timing assertion. Its commands go into docs/PERFORMANCE.md.
No function here longer than 60 lines (tests/test_code_shape.py).
"""
