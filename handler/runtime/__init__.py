"""The worker: the composition root (`Service`), admission and queue, the device executor, batching,
progress, the generation flow (request -> plan -> result), warm-up coordination, tasks and metrics.
"""
