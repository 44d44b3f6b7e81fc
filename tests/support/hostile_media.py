"""Small files that cost a decoder far more than their size, written byte by byte: the inputs an
attacker would send at the decode deadline."""

from __future__ import annotations

import io
import struct

from PIL import Image


def many_frame_gif(canvas: int = 4000, frames: int = 3000) -> bytes:
    """A GIF89a of `frames` one-pixel frames on a `canvas`-square screen, each keeping the ones
    before it (69 kB at the defaults). A decoder that loads every frame (`seek` then `load`)
    composites the whole canvas 3000 times: about 36 ms a frame on this machine."""
    screen = struct.pack("<HHBBB", canvas, canvas, 0xF0, 0, 0)  # a global table of two colours
    out = bytearray(b"GIF89a" + screen + b"\x00\x00\x00\xff\xff\xff")
    for i in range(frames):
        x, y = (i * 7919) % canvas, (i * 104729) % canvas
        out += b"\x21\xf9\x04\x04\x01\x00\x00\x00"  # graphic control: keep what is drawn, 10 ms
        out += b"\x2c" + struct.pack("<HHHHB", x, y, 1, 1, 0)  # a 1x1 image at (x, y)
        out += b"\x02\x02\x4c\x01\x00"  # LZW, minimum code size 2: clear, colour 1, end
    return bytes(out + b"\x3b")


def many_scan_jpeg(size: int = 4000, repeats: int = 5000) -> bytes:
    """A progressive JPEG of a flat `size`-square image whose last refinement scan is repeated
    `repeats` times: each repeat is ~50 bytes, and every one makes libjpeg walk all of the
    image's blocks again (5000 repeats: 360 kB, about 40 s to decode on this machine)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (120, 130, 140)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    marks = _segments(data)
    last = max(i for i, (marker, _, _) in enumerate(marks) if marker == 0xDA)
    first = last - 1 if marks[last - 1][0] == 0xC4 else last  # its Huffman table travels with it
    scan = data[marks[first][1] : marks[last][2]]
    return data[: marks[last][2]] + scan * repeats + b"\xff\xd9"


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment after SOI; a scan's end includes its entropy data."""
    marks, i = [], 2
    while data[i + 1] != 0xD9:
        marker = data[i + 1]
        end = i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is no stuffing or RST
            end = data.index(b"\xff", end)
            while data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end = data.index(b"\xff", end + 2)
        marks.append((marker, i, end))
        i = end
    return marks
