"""The worker: the composition root (`Service`), admission and state, request planning, the generation flow
(request -> plan -> result), the device engine and executor, batching, progress, response shaping, warm-up
coordination, the ControlNet models, tasks and metrics.
"""
