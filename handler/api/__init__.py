"""The HTTP surfaces: one blueprint per surface (sdapi, controlnet, account, downloads, lifecycle, web).

Routes validate with the contract's schemas, call the runtime and render JSON; no generation logic here.
"""
