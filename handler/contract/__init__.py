"""The A1111 / PAI-EAS contract as data: request and response schemas (which generate the OpenAPI
document), options, images in and out, the `info` object and infotext keys.

Both the API layer (parsing) and the runtime (planning, shaping a task's result without HTTP) use it, so it
sits below both; it does no I/O beyond decoding what it is given.
"""
