"""Benchmarks behind BENCHMARKS.md (``python -m dllm2rec bench``; dispatcher in ``cli``) and the
synthetic inputs they (and the tests) use (``synthetic``)."""
