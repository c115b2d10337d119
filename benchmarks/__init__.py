"""lorabox's benchmarks: `python -m benchmarks` lists them, `python -m benchmarks NAME [options]` runs
one (NAME is the module's name, with dashes or underscores). Each writes JSON, a markdown table and,
where a figure says more, a PNG to benchmarks/results/NAME/ (benchmarks/suite/results.py); the
load comes from one generator (benchmarks/suite/loadgen.py). docs/benchmarks.md says how to run them
on a GPU box and holds the latest figures."""
