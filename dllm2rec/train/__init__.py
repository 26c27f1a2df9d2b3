"""Stage 3: student training (``python -m dllm2rec train``).

``loop`` (the epoch / step loop and the ``train`` command), ``inputs`` (dataset + teacher +
student for a config), ``objective`` (named loss terms of one step), ``batches`` (split arrays ->
tensors, data order), ``checkpoint`` (save / resume), ``distributed`` (all rank / world /
barrier / sharding logic of the student side).
"""
