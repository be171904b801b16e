"""The queue service's protobuf messages against the `eas_prediction` SDK's own generated classes: what sdfunc
encodes, the SDK decodes (and the other way round), field for field."""

from __future__ import annotations

import pytest

from handler.contract.eas_queue import Frame, decode_frame, encode_attributes, encode_frame, encode_frame_list

pb = pytest.importorskip("eas_prediction.queue_types.queueservice_pb2",
                         reason="pip install eas-prediction==0.36 (test extras)")

FRAMES = [
    Frame(index=1, data=b'{"images": []}', tags={"task_id": "txt2img_0", "requestId": "abc"}),
    Frame(index=2**40 + 5, data=bytes(range(256)) * 40, tags={}, message="\u00e9t\u00e9"),  # a long varint and body
    Frame(index=0),  # every field at its default: an empty message
]


@pytest.mark.parametrize("frame", FRAMES, ids=["tags", "binary", "empty"])
def test_a_frame_reads_the_same_in_the_sdk(frame):
    message = pb.DataFrameProto()
    message.ParseFromString(encode_frame(frame))
    assert (message.index, dict(message.tags), message.data, message.message) == (
        frame.index, frame.tags, frame.data, frame.message)
    assert decode_frame(message.SerializeToString()) == frame


def test_a_list_and_attributes_read_the_same_in_the_sdk():
    listed = pb.DataFrameListProto()
    listed.ParseFromString(encode_frame_list(FRAMES))
    assert [f.index for f in listed.index] == [f.index for f in FRAMES]
    assert len(pb.DataFrameListProto.FromString(encode_frame_list([])).index) == 0
    attributes = pb.AttributesProto()
    attributes.ParseFromString(encode_attributes({"stream.length": "3", "meta.name": "sd/sink"}))
    assert dict(attributes.attributes) == {"stream.length": "3", "meta.name": "sd/sink"}


def test_bytes_that_are_no_frame_are_refused():
    with pytest.raises(ValueError):
        decode_frame(b"\x0a\xff")  # a length past the end
    with pytest.raises(ValueError):
        decode_frame(b"\x0d\x00\x00\x00\x00")  # wire type 5 (fixed32) is not in these messages
