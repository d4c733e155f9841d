"""The byte layout of task packages, written out from the documented format to decode and doctor packages.

The layout is the one of the module docstring of ``spa_kernels.pruning.package``,
implemented here independently so that the tests do not read packages through
the code under test.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

PREFIX = struct.Struct("<8sIIQQQ")  # magic, version, codec, header, payload and body lengths
DIGEST = 32
ALIGN = 16
VERSION = 4
STORED, DEFLATE = 0, 1


def read_parts(data: bytes) -> tuple[bytes, bytes]:
    """(header, payload) of a package, decoded by the documented layout."""
    _, _, codec, header_bytes, payload_bytes, body_bytes = PREFIX.unpack_from(data)
    body = data[PREFIX.size:PREFIX.size + body_bytes]
    if codec == STORED:
        return body[:header_bytes], body[header_bytes:]
    assert codec == DEFLATE
    decoded = zlib.decompress(body)
    header, planes = decoded[:header_bytes], decoded[header_bytes:]
    whole = payload_bytes // 4 * 4
    plane = whole // 4
    words = bytearray(whole)
    for byte in range(4):  # plane b holds byte b of every word, in word order
        words[byte::4] = planes[byte * plane:(byte + 1) * plane]
    return header, bytes(words) + planes[whole:]


def seal(header_text: bytes, payload: bytes, version: int = VERSION, codec: int = DEFLATE,
         header_bytes: int | None = None, payload_bytes: int | None = None) -> bytes:
    """A package of ``header_text`` (padded to 16) and ``payload`` with a valid checksum.

    ``header_bytes`` and ``payload_bytes`` override the lengths the prefix announces.
    """
    header_text += b" " * ((-len(header_text)) % ALIGN)
    if codec == DEFLATE:
        whole = len(payload) // 4 * 4
        planes = b"".join(payload[byte:whole:4] for byte in range(4)) + payload[whole:]
        body = zlib.compress(header_text + planes)
    else:
        body = header_text + payload
    prefix = PREFIX.pack(b"SPATASK\x00", version, codec,
                         len(header_text) if header_bytes is None else header_bytes,
                         len(payload) if payload_bytes is None else payload_bytes, len(body))
    return prefix + body + hashlib.sha256(prefix + body).digest()


def reseal(header: dict, payload: bytes, **options) -> bytes:
    return seal(json.dumps(header).encode(), payload, **options)


def reseal_body(data: bytes, body: bytes) -> bytes:
    """``data`` with another body (same announced lengths) and a valid checksum."""
    prefix = bytearray(data[:PREFIX.size])
    struct.pack_into("<Q", prefix, PREFIX.size - 8, len(body))
    return bytes(prefix) + body + hashlib.sha256(bytes(prefix) + body).digest()


def doctored_header(data: bytes, change) -> bytes:
    header, payload = read_parts(data)
    header = json.loads(header)
    change(header)
    return reseal(header, payload)
