"""The reviewed-images dataset a device exports (issue 16): its format, shared by writer and reader.

The device (``leukoedge.edge_app.reviewed_export``) writes, and this package
reads, one folder (or zip of it)::

    reviewed.json            the manifest: FORMAT, VERSION, exported_at, images[]
    <Label>/<result_id><ext> the ORIGINAL capture, in the folder of the reviewer's label

The manifest is the provenance of every image (capture time, sample, model name,
version and bundle checksum (``bundle_sha256``, null where the device did not
record it), its prediction, reviewer label and note, um/px); the folders make it an ordinary
class-folder dataset, so ``leukoedge data check --layout class-folders`` reads
it without knowing the format. With the ``reviewed`` layout (auto-detected by
``reviewed.json``) the reader also takes from the manifest what a split needs:

- ``group = "sample:<sample_id>"``: the fields of one slide never straddle
  train and test (a result in no sample is its own group, ``result:<id>``);
- ``order`` = rank of the capture time, so ``--by block`` follows capture order.

Folder names: a label comes from a bundle and, on the device, from a client's
review, so it is never trusted as a path. :func:`label_folder` percent-encodes
every character outside a small safe set (``/``, ``\\``, ``%``, control and
non-ASCII characters, a leading or trailing dot or space), which makes ``..``
or ``a/b`` one harmless folder name and is reversed exactly by
:func:`folder_label`. Ordinary class names (``Early Pre-B``) stay readable.

Pure stdlib, no TensorFlow: the device imports the constants and the encoding.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from urllib.parse import quote, unquote

from ..errors import DatasetError

#: File name of the manifest at the root of an export.
MANIFEST_NAME = "reviewed.json"
#: ``reviewed.json["format"]``.
FORMAT = "leukoedge-reviewed-images"
#: ``reviewed.json["version"]``; readers refuse other versions.
VERSION = 1
#: Characters kept as they are in a folder name (besides ASCII letters and digits, and ``_.-~``).
_SAFE = " ()+,=@&'[]"
#: Longest label folder name: well under every file system's 255-byte name limit, even fully encoded.
MAX_LABEL_CHARS = 80


def label_folder(label: str) -> str:
    """A safe, reversible folder name for a class label (see the module docstring).

    Raises:
        DatasetError: empty, or longer than :data:`MAX_LABEL_CHARS` characters.
    """
    if not isinstance(label, str) or not label:
        raise DatasetError(f"class label {label!r} cannot name a folder", hint="labels come from the bundle")
    if len(label) > MAX_LABEL_CHARS:
        raise DatasetError(f"class label {label[:40]!r}... has {len(label)} characters; at most {MAX_LABEL_CHARS} "
                           "name a folder")
    name = quote(label, safe=_SAFE)
    # leading / trailing dots and spaces: hidden folders (skipped by every reader), "." / "..", and names
    # Windows silently trims; encode them so the name keeps the label's exact characters
    start, end = 0, len(name)
    while start < end and name[start] in ". ":
        start += 1
    while end > start and name[end - 1] in ". ":
        end -= 1
    return "".join(map(_pct, name[:start])) + name[start:end] + "".join(map(_pct, name[end:]))


def _pct(char: str) -> str:
    return f"%{ord(char):02X}"


def folder_label(name: str) -> str:
    """The label a :func:`label_folder` name stands for (its exact inverse).

    Raises:
        DatasetError: a ``%`` escape that is not UTF-8 (a folder no export wrote).
    """
    try:
        return unquote(name, errors="strict")
    except UnicodeDecodeError:
        raise DatasetError(f"class folder {name!r}: its %-escapes are not UTF-8, so it names no label",
                           hint="rename the folder to the class name") from None


def load_manifest(root: str | Path) -> dict:
    """``reviewed.json`` of an export, checked: format, version and a list of images with paths.

    Raises:
        DatasetError: missing, not JSON, another format or version, or malformed entries.
    """
    path = Path(root) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file", hint="export it from the device (/export/reviewed.zip or "
                           "`leukoedge data reviewed`)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DatasetError(f"{path}: not a reviewed-images manifest (format {FORMAT!r} expected)")
    if data.get("version") != VERSION:
        raise DatasetError(f"{path}: reviewed-images manifest version {data.get('version')!r} is not {VERSION}",
                           hint="it was written by another leukoedge version; export again or upgrade")
    images = data.get("images")
    if not isinstance(images, list) or not all(isinstance(i, dict) and isinstance(i.get("path"), str)
                                               for i in images):
        raise DatasetError(f"{path}: 'images' must be a list of objects with a 'path'")
    return data


def provenance(root: str | Path) -> dict[str, tuple[str, int | None]]:
    """relative path -> (group, capture-order rank) for every image ``reviewed.json`` lists.

    The group is ``sample:<sample_id>``, or ``result:<result_id>`` for a capture
    in no sample (it is then related to no other image the export knows of).
    The rank orders images by capture time (ties by path).
    """
    images = load_manifest(root)["images"]

    def when(item: dict) -> float:
        t = item.get("captured_at")
        return float(t) if isinstance(t, (int, float)) and math.isfinite(t) else math.inf

    ranked = sorted(images, key=lambda i: (when(i), i["path"]))
    out: dict[str, tuple[str, int | None]] = {}
    for rank, item in enumerate(ranked):
        sample, result = item.get("sample_id"), item.get("result_id")
        group = f"sample:{sample}" if sample else f"result:{result or item['path']}"
        out[item["path"]] = (group, rank)
    return out
