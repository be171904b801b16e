"""ControlNet as sd-webui-controlnet serves it over the A1111 API, on diffusers. No HTTP.

One module per part; import from the module that holds a name (this package re-exports nothing):

* `units`: `parse_units` validates `alwayson_scripts.controlnet.args` into `ControlUnit`s (the extension's
  enums, limits and infotext entries too).
* `preprocessors`: the weight-free preprocessors, computed with OpenCV as the extension computes them, under
  the extension's `/controlnet/module_list` names; the others are refused by name with the reason.
* `detectmap`: a unit's input image -> its detected map at the generation size (`detect`, `fit_map`,
  `preprocess`).
* `store`: the models folder `<data>/models/ControlNet` with the extension's titles and name resolution.
* `loading`: what a ControlNet file is (`inspect_controlnet`, `check_compatible`) and loading it offline with
  the shipped configs (`load_controlnet`).
* `stack`: the diffusers ControlNet pipeline class and call arguments (`pipeline_class`, `call_kwargs`), with
  each unit's control mode applied as the extension applies it (`controlnet_stack`).

Exporting a ControlNet to the A1111 single-file layout is a builder's job:
`pipelines.builders.ldm_layout.controlnet_to_ldm`.
"""
