"""End-to-end workflows above analysis and pruning (`python -m pipeline.demo` is `make demo`); nothing in
analysis, pruning or vlm imports this package."""
