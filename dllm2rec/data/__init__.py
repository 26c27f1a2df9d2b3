"""Stage 1: raw logs / reference files -> dataset folders (schema ``dllm2rec.dataset/1``).

Modules: ``sources`` (raw readers), ``protocol`` (windows + time split, pure), ``dataset``
(save / load / validate), ``reference`` (reference-code format and ``tocf/`` teacher files),
``fetch`` (example datasets into the cache), ``cli`` (``python -m dllm2rec data ...``).
Other stages use ``dllm2rec.data.dataset.load_dataset`` and ``id_map_hash``.
"""
