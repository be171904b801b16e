"""Face restoration as A1111 1.10 does it with GFPGAN and CodeFormer (`modules/gfpgan_model.py`, `codeformer_model.py`,
`face_restoration_utils.py`).

Written here because A1111's stack does not load beside the CPU torch: spandrel (which builds GFPGAN's network)
and facexlib (which finds, aligns and pastes back the faces) both import torchvision, whose PyPI wheel is a CUDA
build. The same code runs on CPU and GPU.

- `gfpgan`: GFPGANv1Clean with the parameter names of the released GFPGANv1.3 / v1.4 files, its sizes read from the
  state dict; `load_face_restorer` reads a `.safetensors` or weights-only `.pth` file.
- `codeformer`: CodeFormer, written here against the layout of the released `codeformer-v0.1.0.pth` (whose weights,
  under the S-Lab License 1.0, non-commercial, only the user may put on the mount); its sizes read from the state
  dict; `load_face_restorer` tells the two apart by their keys.
- `detect`: faces and their five landmarks with OpenCV only: the Haar cascades shipped in the opencv wheel, or
  YuNet when its ONNX file is on the mount (A1111 uses RetinaFace, a download).
- `restore`: facexlib's FaceRestoreHelper steps: align each face to the FFHQ template, restore it, paste it back
  through the inverse transform with a soft mask.
"""
