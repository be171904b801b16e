"""Model upscalers read from the mount by their state dict, as A1111 (through spandrel) and ComfyUI read them.

Written here against the published state-dict layouts, because spandrel imports torchvision, whose PyPI wheel is a
CUDA build that does not load beside the CPU torch: the same code runs on CPU and GPU.

- `arch`: the networks (ESRGAN's RRDBNet in its old and new key formats, Real-ESRGAN's pixel-unshuffle variants,
  the compact SRVGG).
- `swinir`: SwinIR (classical, lightweight and real-world SR, and its scale-1 restoration models), the hyper-parameters
  read from the state dict.
- `load`: a file (`.safetensors`, or `.pth` unpickled weights-only) to a ready network, the architecture and scale
  read from its keys and shapes.
- `tiling`: an image upscaled tile by tile with context around each tile (A1111's `ESRGAN_tile` and
  `ESRGAN_tile_overlap`).
"""
