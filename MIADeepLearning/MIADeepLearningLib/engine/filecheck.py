"""Is an image file complete? A cut-short or damaged file must stop a run with one sentence, not be segmented.

ITK's readers do not always notice: a ``.nii``/``.nii.gz`` cut to a third is read as a partly blank image, and a
MetaImage or detached NRRD whose compressed data has a flipped byte is read as wrong voxels without a word. This
module checks, from the header alone and by streaming the data once with bounded memory, that the compressed stream
is complete and intact (gzip: end-of-stream marker, CRC and length; zlib: end marker and Adler-32) and that there
are as many bytes of voxel data as the header describes. Formats: NIfTI-1/2 (``.nii``, ``.nii.gz``), NRRD
(``.nrrd``, ``.nhdr`` with a detached data file; encodings raw and gzip) and MetaImage (``.mha``, ``.mhd``; raw or
zlib-compressed). Whatever it cannot check (other suffixes, DICOM, ascii/hex/bzip2/zstd encodings, lists of data
files, headers it does not understand) passes unchecked: a valid file must never be refused because of this check,
and a file that is not an image at all is left to the reader, which says so itself.

Standard library only (no numpy, SimpleITK or torch), so the Slicer side can check the file a volume came from.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from MIADeepLearningLib.engine.errors import InputError

READ_CHUNK = 1 << 20  # compressed bytes read at a time
INFLATE_CHUNK = 2 << 20  # at most this many decompressed bytes at a time (deflate expands up to 1032x)
MAX_HEADER_BYTES = 16 << 20  # a text header longer than this is not one this module understands
GZIP_MAGIC = b"\x1f\x8b"

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
META_SUFFIXES = (".mha", ".mhd")

_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}
# NIfTI datatype code -> bytes per voxel: the readers size the data by the datatype, not by bitpix.
_NIFTI_DATATYPE_BYTES = {
    2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 1536: 16, 1792: 16,
    2048: 32, 2304: 4,
}
# MetaIO's own sizes (metaTypes.h): MET_LONG is 32-bit on every platform.
_META_TYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4,
    "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}


class _Damaged(Exception):
    """The file is damaged or cut short; the message is the clause after "is damaged or cut short: "."""


class _MissingDataFile(Exception):
    """A detached header names a data file that does not exist; the message is that file's name."""


class _Unchecked(Exception):
    """The file is of a kind (or uses a feature) this module cannot check; it is passed as it is."""


@dataclass(frozen=True)
class _Layout:
    """Where a header says the voxels are and how many bytes they take."""

    data_path: Path  # the file that holds the voxel data (the image file itself when attached)
    detached: bool  # data_path is a file of its own, named in the header
    offset: int  # where the voxel data, or its compressed stream, starts in data_path
    skip: int  # bytes before the voxels inside the (decompressed) data; -1: the voxels are the file's last bytes
    size: int  # bytes of voxel data the header describes
    compressed: bool  # a gzip or zlib stream
    shape: str  # "28×24×20 voxels of 2 bytes", for the message


@dataclass(frozen=True)
class FileVerdict:
    """What the check found: `problem` ends a sentence about the file ("is damaged or cut short: ..."), or is None."""

    checked: bool  # False: a kind of file this module cannot check, passed as it is
    problem: str | None = None


def examine_image_file(path: str | os.PathLike) -> FileVerdict:
    """Check one image file (header, data length, compressed stream); never raises for a damaged file."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(NIFTI_SUFFIXES):
            _check_nifti(path)
        elif name.endswith(NRRD_SUFFIXES):
            _check_layout(_nrrd_layout(path))
        elif name.endswith(META_SUFFIXES):
            _check_layout(_metaimage_layout(path))
        else:
            return FileVerdict(False)
    except _Damaged as damage:
        return FileVerdict(True, f"is damaged or cut short: {damage}")
    except _MissingDataFile as missing:
        return FileVerdict(True, f"is incomplete: its data file {missing} (named in its header) does not exist")
    except (_Unchecked, OSError, ValueError, OverflowError, struct.error):
        return FileVerdict(False)  # a file that cannot even be opened, or parsed, is the reader's to report
    return FileVerdict(True)


def verify_image_file(path: str | os.PathLike, subject: str | None = None) -> bool:
    """Raise InputError (one sentence naming the file) when the image file is damaged or cut short.

    Returns True when the file was checked and is complete, False when it is of a kind this module cannot check
    (then it is left to the reader). `subject` replaces "Input image <file name>" at the start of the sentence.
    """
    verdict = examine_image_file(path)
    if verdict.problem:
        subject = subject or f"Input image {Path(path).name}"
        raise InputError(f"{subject} {verdict.problem}.")
    return verdict.checked


# ------------------------------------------------------------------------------------------------ messages


def _amount(count: int) -> str:
    """Bytes as a person reads them (decimal units, as file browsers show sizes)."""
    if count < 1000:
        return f"{count} byte" if count == 1 else f"{count} bytes"
    for unit, scale in (("kB", 1e3), ("MB", 1e6)):
        if round(count / scale, 1) < 1000:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e9:.1f} GB"


def _amounts(have: int, need: int) -> tuple[str, str]:
    """Both amounts, exact in bytes when rounding would make them look equal."""
    have_text, need_text = _amount(have), _amount(need)
    if have_text == need_text:
        return f"{have:,} bytes", f"{need:,} bytes"
    return have_text, need_text


def _shape(dims: list[int], item_bytes: int, components: int = 1) -> str:
    item = f"{item_bytes} byte" if item_bytes == 1 else f"{item_bytes} bytes"
    if components > 1:
        item = f"{components} × {item}"
    return f"{'×'.join(str(dim) for dim in dims)} voxels of {item}"


def _short(where: str, have: int, layout: _Layout) -> _Damaged:
    have_text, need_text = _amounts(max(have, 0), layout.size)
    return _Damaged(f"{where} ends after {have_text} of the {need_text} its header describes "
                    f"({layout.shape})")


def _zlib_problem(error: zlib.error) -> str:
    """What a zlib error means for the user (it detected corrupt data, not a short file)."""
    reason = str(error).split(": ", 1)[-1]
    if "incorrect data check" in reason:
        return "the checksum of its compressed data does not match, so the data is corrupt"
    if "incorrect length check" in reason:
        return "the length recorded at the end of its compressed data does not match, so the data is corrupt"
    return f"its compressed data is corrupt (zlib: {reason})"


# ------------------------------------------------------------------------------------------------ streams


@dataclass(frozen=True)
class _Inflated:
    total: int  # decompressed bytes produced before the stream ended or failed
    head: bytes  # the first decompressed bytes (as many as asked for)
    complete: bool  # every member reached its end-of-stream marker with a matching checksum and length
    problem: str | None = None  # why the data is corrupt, when zlib found it so


def _inflate(stream: BinaryIO, keep_head: int = 0) -> _Inflated:
    """Decompress one or more concatenated gzip members, or one zlib stream, from the stream's position to its end.

    Bounded memory whatever the file size: at most READ_CHUNK compressed and INFLATE_CHUNK decompressed bytes at a
    time, and the output is only counted. zlib itself checks the CRC-32 and length of each gzip member and the
    Adler-32 of a zlib stream. Bytes after a member that do not start another one are ignored, as zlib's gzread
    (ITK's NIfTI reader) ignores them.
    """
    head = bytearray()
    total = 0
    pending = b""
    decompressor = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib header, detected
    member_ended = False
    while True:
        if member_ended:
            if len(pending) < len(GZIP_MAGIC):
                more = stream.read(READ_CHUNK)
                if more:
                    pending += more
                    continue
            if not pending.startswith(GZIP_MAGIC):
                return _Inflated(total, bytes(head), True)
            decompressor = zlib.decompressobj(32 + zlib.MAX_WBITS)
            member_ended = False
        data = pending or stream.read(READ_CHUNK)
        try:
            # At the end of the file data is b"", which flushes what the decompressor still holds back.
            out = decompressor.decompress(data, INFLATE_CHUNK)
        except zlib.error as error:
            return _Inflated(total, bytes(head), False, _zlib_problem(error))
        if len(head) < keep_head:
            head += out[: keep_head - len(head)]
        total += len(out)
        if decompressor.eof:
            pending, member_ended = decompressor.unused_data, True
        elif not data and not out:
            return _Inflated(total, bytes(head), False)  # the file ended before the end-of-stream marker
        else:
            pending = decompressor.unconsumed_tail


def _check_layout(layout: _Layout) -> None:
    """The voxel data a NRRD or MetaImage header describes is all there, and its compressed stream is intact."""
    if not layout.data_path.is_file():
        raise _MissingDataFile(layout.data_path.name)
    compressed = "compressed " if layout.compressed else ""
    where = (f"the {compressed}voxel data in its data file {layout.data_path.name}" if layout.detached
             else f"its {compressed}voxel data")
    if not layout.compressed:
        available = layout.data_path.stat().st_size - layout.offset
        have = available if layout.skip < 0 else available - layout.skip
        if have < layout.size:
            raise _short(where, have, layout)
        return
    with layout.data_path.open("rb") as stream:
        stream.seek(layout.offset)
        inflated = _inflate(stream)
    _judge(inflated, inflated.total - layout.skip, layout, where)


def _judge(inflated: _Inflated, have: int, layout: _Layout, where: str) -> None:
    """Corrupt, short or unterminated compressed data, in that order of what the user can best act on."""
    if inflated.problem:
        raise _Damaged(inflated.problem if not layout.detached else f"{inflated.problem} (in "
                                                                     f"{layout.data_path.name})")
    if have < layout.size:
        raise _short(where, have, layout)
    if not inflated.complete:
        raise _Damaged(f"{where} stops before its end-of-stream marker, so the end of the file is missing")


# ------------------------------------------------------------------------------------------------ NIfTI


def _nifti_header(head: bytes) -> tuple[int, list[int], int, int] | None:
    """(header size, dims, bytes per voxel, voxel offset) of a NIfTI-1 or -2 header; dims [] when the bytes end
    inside the header; None when the bytes are no NIfTI header."""
    if len(head) < 4:
        return None
    for order in ("<", ">"):
        (size,) = struct.unpack(order + "i", head[:4])
        if size not in (348, 540):
            continue
        if len(head) < size:
            return size, [], 0, 0
        if size == 348:
            dims = list(struct.unpack(order + "8h", head[40:56]))
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            (vox_offset,) = struct.unpack(order + "f", head[108:112])
            return _nifti_fields(size, dims, datatype, bitpix, vox_offset, head[344:348] == b"n+1\0")
        datatype, bitpix = struct.unpack(order + "2h", head[12:16])
        dims = list(struct.unpack(order + "8q", head[16:80]))
        (vox_offset,) = struct.unpack(order + "q", head[168:176])
        return _nifti_fields(size, dims, datatype, bitpix, vox_offset, head[4:8] == b"n+2\0")
    return None


def _nifti_fields(header_size: int, dims: list[int], datatype: int, bitpix: int, vox_offset: float,
                  single_file: bool) -> tuple[int, list[int], int, int]:
    count = dims[0]
    item_bytes = _NIFTI_DATATYPE_BYTES.get(datatype, bitpix // 8 if bitpix % 8 == 0 else 0)
    if not single_file or not 1 <= count <= 7 or any(dim < 1 for dim in dims[1: count + 1]) or item_bytes < 1:
        raise _Unchecked("a NIfTI header this module does not understand (or a 1-bit image)")
    # nifti_io reads the voxels from the end of the header (plus the extension flag) when vox_offset is smaller.
    offset = max(int(vox_offset) if math.isfinite(vox_offset) else 0, header_size + 4)
    return header_size, dims[1: count + 1], item_bytes, offset


def _check_nifti(path: Path) -> None:
    with path.open("rb") as stream:
        compressed = stream.read(len(GZIP_MAGIC)) == GZIP_MAGIC
        stream.seek(0)
        inflated = (_inflate(stream, keep_head=544) if compressed
                    else _Inflated(path.stat().st_size, stream.read(544), True))
    if inflated.problem:  # corrupt gzip data is damage whatever it holds (and the header may be lost with it)
        raise _Damaged(inflated.problem)
    header = _nifti_header(inflated.head)
    if header is None:
        raise _Unchecked("not a NIfTI file")  # the reader says what it is not
    header_size, dims, item_bytes, offset = header
    if not dims:
        where = "its compressed data" if compressed else "the file"
        raise _Damaged(f"{where} ends after {_amount(inflated.total)}, inside its {header_size}-byte header")
    layout = _Layout(path, False, 0, offset, _product(dims) * item_bytes, compressed, _shape(dims, item_bytes))
    _judge(inflated, inflated.total - offset, layout, "its compressed voxel data" if compressed else "its voxel data")


def _product(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


# ------------------------------------------------------------------------------------------------ text headers


def _header_lines(stream: BinaryIO) -> list[str]:
    """Lines of a text header up to its blank line (or the end of the file); the stream is then at the data."""
    lines: list[str] = []
    read = 0
    while True:
        raw = stream.readline(MAX_HEADER_BYTES)
        read += len(raw)
        if read > MAX_HEADER_BYTES:
            raise _Unchecked("a header too long to be one")
        line = raw.decode("latin-1").rstrip("\r\n")
        if not line:
            return lines
        lines.append(line)


def _data_file(header_path: Path, name: str) -> Path:
    """A detached data file, relative to its header's folder unless absolute; one file, not a list or pattern."""
    if name.upper() == "LIST" or len(name.split()) != 1 or "%" in name:
        raise _Unchecked("a list or pattern of data files")
    return Path(name) if Path(name).is_absolute() else header_path.parent / name


def _skip_lines(path: Path, offset: int, count: int) -> int:
    """Where the data starts after NRRD's "line skip" lines (skipped before any decompression)."""
    if count == 0 or not path.is_file():
        return offset
    with path.open("rb") as stream:
        stream.seek(offset)
        for _ in range(count):
            stream.readline(MAX_HEADER_BYTES)
        return stream.tell()


def _nrrd_layout(path: Path) -> _Layout:
    """NRRD: "sizes" x the type's bytes, attached after the header's blank line or in its "data file"."""
    with path.open("rb") as stream:
        if not stream.readline(64).startswith(b"NRRD000"):
            raise _Unchecked("not a NRRD file")  # the reader says what it is not
        lines = _header_lines(stream)
        header_end = stream.tell()
    fields: dict[str, str] = {}
    for line in lines:
        key, colon, value = line.partition(":")
        if line.startswith("#") or not colon or value.startswith("="):
            continue  # comments and key/value pairs ("key:=value") say nothing about the data
        fields[key.lower().replace(" ", "")] = value.strip()
    encoding = fields.get("encoding", "").lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise _Unchecked(f"encoding {encoding!r}")  # ascii, text, hex, bzip2, zstd: not checked here
    type_name = " ".join(fields.get("type", "").lower().split())
    try:
        sizes = [int(size) for size in fields["sizes"].split()]
        item_bytes = int(fields["blocksize"]) if type_name == "block" else _NRRD_TYPE_BYTES.get(type_name, 0)
        line_skip = int(fields.get("lineskip", "0"))
        byte_skip = int(fields.get("byteskip", "0"))
    except (KeyError, ValueError):
        raise _Unchecked("sizes, type or skips it cannot read") from None
    compressed = encoding != "raw"
    if item_bytes < 1 or not sizes or min(sizes) < 1 or line_skip < 0 or byte_skip < -1 \
            or (compressed and byte_skip < 0):
        raise _Unchecked("sizes, type or skips it does not understand")
    detached = "datafile" in fields
    data_path = _data_file(path, fields["datafile"]) if detached else path
    offset = _skip_lines(data_path, 0 if detached else header_end, line_skip)
    return _Layout(data_path, detached, offset, byte_skip, _product(sizes) * item_bytes, compressed,
                   _shape(sizes, item_bytes))


def _metaimage_layout(path: Path) -> _Layout:
    """MetaImage: DimSize x channels x the element's bytes, after the "ElementDataFile = LOCAL" line (the last of
    the header) or in the file that line names."""
    fields: dict[str, str] = {}
    with path.open("rb") as stream:
        read = 0
        while "elementdatafile" not in fields:
            raw = stream.readline(MAX_HEADER_BYTES)
            read += len(raw)
            if not raw or read > MAX_HEADER_BYTES:
                raise _Unchecked("no ElementDataFile line")  # the reader says what is wrong with the header
            key, equals, value = raw.decode("latin-1").partition("=")
            if equals:
                fields[key.strip().lower()] = value.strip()
        header_end = stream.tell()
    if fields.get("objecttype", "image").lower() != "image" or fields.get("binarydata", "true").lower() != "true":
        raise _Unchecked("not a binary MetaImage")
    try:
        dims = [int(dim) for dim in fields["dimsize"].split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
    except (KeyError, ValueError):
        raise _Unchecked("sizes it cannot read") from None
    item_bytes = _META_TYPE_BYTES.get(fields.get("elementtype", "").upper(), 0)
    compressed = fields.get("compresseddata", "false").lower() == "true"
    detached = fields["elementdatafile"].upper() != "LOCAL"
    if item_bytes < 1 or not dims or min(dims) < 1 or channels < 1 or header_size < -1 \
            or (header_size and (compressed or not detached)):
        raise _Unchecked("type, sizes or header size it does not understand")
    data_path = _data_file(path, fields["elementdatafile"]) if detached else path
    # HeaderSize: bytes before the voxels in the data file; -1: the voxels are the file's last bytes.
    offset, skip = (header_end, 0) if not detached else (max(header_size, 0), min(header_size, 0))
    return _Layout(data_path, detached, offset, skip, _product(dims) * channels * item_bytes, compressed,
                   _shape(dims, item_bytes, channels))
