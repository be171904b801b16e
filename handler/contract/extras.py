"""The schemas of A1111's extras routes (`/sdapi/v1/extra-single-image`, `/extra-batch-images`) and of the upscaler
and face-restorer listings: A1111 v1.10.1's fields and defaults (`modules/api/models.py`), with the flag and number
rules of handler.contract.schemas."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from handler.contract.schemas import A1111Model, Bool, Float, Int


class ExtrasRequest(A1111Model):
    """A1111 v1.10.1 `ExtrasBaseRequest`: the extras tab's upscale and face restoration, with its defaults."""

    resize_mode: Int = Field(0, ge=0, le=1, description="0 upscale by upscaling_resize, 1 upscale to "
                                       "upscaling_resize_w x upscaling_resize_h.")
    show_extras_results: Bool = Field(True, description="Accepted (A1111's API always returns the images).")
    gfpgan_visibility: Float = Field(0, ge=0, le=1, description="GFPGAN face restoration blended in at this visibility.")
    codeformer_visibility: Float = Field(0, ge=0, le=1, description="CodeFormer face restoration blended in at this "
                                         "visibility; needs your own weights in models/Codeformer (non-commercial "
                                         "licence).")
    codeformer_weight: Float = Field(0, ge=0, le=1, description="CodeFormer's weight: 0 = maximum effect, 1 = minimum.")
    upscaling_resize: Float = Field(2, gt=0, description="Upscale factor (resize_mode 0).")
    upscaling_resize_w: Int = Field(512, ge=1, description="Target width (resize_mode 1).")
    upscaling_resize_h: Int = Field(512, ge=1, description="Target height (resize_mode 1).")
    upscaling_crop: Bool = Field(True, description="resize_mode 1: crop to exactly the target size.")
    upscaler_1: str = Field("None", max_length=200, description="Main upscaler (GET /upscalers).")
    upscaler_2: str = Field("None", max_length=200, description="Secondary upscaler (GET /upscalers).")
    extras_upscaler_2_visibility: Float = Field(0, ge=0, le=1, description="Visibility of the secondary upscaler.")
    upscale_first: Bool = Field(False, description="Accepted; as in A1111 1.10, the upscale always runs first.")
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict, description="PAI-EAS keys: save_dir (save the results there; `image_url` in "
        "`parameters`), id_task, uid (the consumer charged, where allowed).")

    @field_validator("alwayson_scripts", mode="before")
    @classmethod
    def _null_scripts(cls, value: Any) -> Any:
        return {} if value is None else value


class ExtrasSingleImageRequest(ExtrasRequest):
    """POST /sdapi/v1/extra-single-image."""

    image: str = Field("", description="Base64 image or data: URL.")


class FileData(BaseModel):
    data: str = Field(..., description="Base64 image or data: URL.")
    name: str = Field(..., max_length=1000, description="File name.")


class ExtrasBatchImagesRequest(ExtrasRequest):
    """POST /sdapi/v1/extra-batch-images."""

    imageList: list[FileData] = Field(..., description="The images to work on.")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None
    parameters: dict[str, Any] | None = Field(None, description="PAI-EAS requests only: status, image_url...")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]
    parameters: dict[str, Any] | None = Field(None, description="PAI-EAS requests only: status, image_url...")


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None


class RealesrganItem(BaseModel):
    name: str
    path: str | None
    scale: int | None
