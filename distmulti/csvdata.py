"""``csv:PATH``: an image folder with a label CSV, each image read when it is drawn.

The CSV has one row per image: the image file name (relative to the CSV's own folder, or
absolute), then K integer labels (-1 = no label); a first row whose labels are not integers
is taken as a header::

    file,digit,colour
    img/0001.png,3,1
    img/0002.png,7,-1

Opening the dataset parses the CSV (names and labels, checked at once; stored in flat arrays,
so forked loader workers share them without copying) and reads the first image, which fixes
the mode (grayscale if it is grayscale ('L'), else RGB) and the size. Every other image is
read with Pillow when it is drawn, converted to that mode and scaled to float32 in [0, 1],
shape (C, H, W); a missing, unreadable or differently sized image is an error naming the CSV
row and the file then. With ``image_size`` every image is resized to it instead.
"""
import array
import csv
import importlib.util
import os
import re
from typing import Iterator, List, Optional, Tuple

import numpy as np
import chainer

from distmulti.errors import check_file as _check_file
from distmulti.errors import data_error as _fail

_INT_RE = re.compile(r'[+-]?[0-9]+\Z')
_INT32_MAX = np.iinfo(np.int32).max


def parse_image_size(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``'WxH'`` as (width, height); None stays None. Raises ValueError for another form."""
    if text is None:
        return None
    match = re.fullmatch(r'\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*', str(text))
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f'image size {text!r} is not WIDTHxHEIGHT with both at least 1, '
                         f'e.g. 64x64')
    return int(match.group(1)), int(match.group(2))


def open_image(path: str, mode: str, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """One image file as float32 (C, H, W) in [0, 1], converted to ``mode`` ('L' or 'RGB')
    and, with ``size`` (width, height), resized to it."""
    _check_file(path, 'image file')
    try:
        pixels = read_pixels(path, mode, size)
    except Exception as e:  # Pillow raises many types for unreadable files
        raise _fail(f'image file {path} cannot be read as an image ({type(e).__name__}: '
                    f'{e})') from None
    return to_chw(pixels)


def read_pixels(path: str, mode: Optional[str] = None,
                size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """An image's pixels as uint8 (H, W) in mode 'L' or (H, W, 3) in 'RGB'; without ``mode``,
    'L' if the image is grayscale, else 'RGB'."""
    from PIL import Image
    with Image.open(path) as image:
        target = mode or ('L' if image.mode == 'L' else 'RGB')
        image = image if image.mode == target else image.convert(target)
        if size is not None and image.size != tuple(size):
            image = image.resize(tuple(size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def to_chw(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) as float32 (C, H, W) in [0, 1]."""
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.divide(pixels, np.float32(255.0), dtype=np.float32)


class CsvImageDataset(chainer.dataset.DatasetMixin):
    """The images named in a label CSV, read when drawn; see the module doc.

    Args:
        path: the CSV file.
        image_size: (width, height) to resize every image to; default: every image must
            have the size of the first.

    Raises:
        DataError: the CSV is missing, empty or malformed (naming the row), or its first
            image cannot be read (collective: every rank opens the same files).
    """

    def __init__(self, path: str, image_size: Optional[Tuple[int, int]] = None):
        _check_file(path, 'CSV file')
        if importlib.util.find_spec('PIL') is None:
            raise RuntimeError('Pillow is not installed; csv: datasets need it to read images '
                               '(pip install Pillow)')
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.image_size = tuple(image_size) if image_size is not None else None
        names, offsets, labels, rows, k = _parse(path)
        self._names = np.frombuffer(bytes(names), dtype=np.uint8)
        self._offsets = np.frombuffer(offsets, dtype=np.int64)
        self._labels = np.frombuffer(labels, dtype=np.int32).reshape(-1, k)
        self._rows = np.frombuffer(rows, dtype=np.int64)
        try:
            first = read_pixels(self.file_path(0), None, self.image_size)
        except FileNotFoundError:
            raise _fail(self._where(0) + ' ' + self._missing()) from None
        except Exception as e:  # Pillow raises many types for a damaged or unknown file
            raise _fail(f'{self._where(0)} cannot be read as an image ({type(e).__name__}: '
                        f'{e})') from None
        self.mode = 'L' if first.ndim == 2 else 'RGB'
        self._pixel_shape = first.shape

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        return to_chw(np.zeros(self._pixel_shape, np.uint8)).shape

    def labels(self) -> np.ndarray:
        """The (N, K) int32 labels, in memory."""
        return self._labels

    def file_name(self, i: int) -> str:
        """Image ``i``'s name as written in the CSV."""
        return bytes(self._names[self._offsets[i]:self._offsets[i + 1]]).decode('utf-8')

    def file_path(self, i: int) -> str:
        name = self.file_name(i)
        return name if os.path.isabs(name) else os.path.join(self.folder, name)

    def _where(self, i: int) -> str:
        return f'CSV file {self.path}, row {int(self._rows[i])}: image {self.file_name(i)}'

    def _missing(self) -> str:
        return (f'does not exist (names are relative to the CSV file\'s folder {self.folder} '
                f'unless absolute)')

    def get_example(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f'sample {i} of {n}')
        i %= n
        try:
            pixels = read_pixels(self.file_path(i), self.mode, self.image_size)
        except FileNotFoundError:
            raise _fail(f'{self._where(i)} {self._missing()}') from None
        except Exception as e:  # see __init__
            raise _fail(f'{self._where(i)} cannot be read as an image ({type(e).__name__}: '
                        f'{e})') from None
        if pixels.shape != self._pixel_shape:
            first = self._pixel_shape
            raise _fail(f'{self._where(i)} is {pixels.shape[1]}x{pixels.shape[0]} pixels but '
                        f'the first image {self.file_name(0)} (row {int(self._rows[0])}) is '
                        f'{first[1]}x{first[0]}; all images must have the same size (width x '
                        f'height), or give --image-size WxH to resize them')
        return to_chw(pixels), self._labels[i]


def load_csv(path: str, image_size: Optional[Tuple[int, int]] = None) -> CsvImageDataset:
    """The lazy dataset of a label CSV (see :class:`CsvImageDataset`)."""
    return CsvImageDataset(path, image_size)


# ---------------------------------------------------------------------------- parsing

def _rows(path: str) -> Iterator[Tuple[int, List[str]]]:
    """The non-blank rows of a CSV file, stripped, with their 1-based row numbers."""
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            for number, row in enumerate(csv.reader(f), start=1):
                fields = [field.strip() for field in row]
                if any(fields):
                    yield number, fields
    except UnicodeDecodeError as e:
        raise _fail(f'CSV file {path} is not UTF-8 text (byte {e.start}); give a text CSV of '
                    f'image file names and integer labels') from None
    except csv.Error as e:
        raise _fail(f'CSV file {path} is not a readable CSV ({e})') from None
    except OSError as e:
        raise _fail(f'CSV file {path} cannot be read ({e.strerror or e})') from None


def _parse(path: str):
    """Streams the CSV into flat arrays: name bytes, name offsets, labels, row numbers, K."""
    names = bytearray()
    offsets = array.array('q', [0])
    labels = array.array('i')
    numbers = array.array('q')
    header: Optional[int] = None
    k = None
    first_number = None
    for number, row in _rows(path):
        if k is None:
            if header is None and not numbers and not all(_INT_RE.match(f) for f in row[1:]):
                header = number
                continue
            k, first_number = len(row) - 1, number
            if k == 0:
                raise _fail(f'CSV file {path}, row {number}: {row[0]!r} has no labels; each '
                            f'row needs an image file name, then one integer label per head')
        if len(row) - 1 != k:
            raise _fail(f'CSV file {path}, row {number}: {len(row) - 1} label'
                        f'{"s" if len(row) != 2 else ""} but row {first_number} (the first '
                        f'image row) has {k}; every row needs a file name and {k} label'
                        f'{"s" if k != 1 else ""}')
        if not row[0]:
            raise _fail(f'CSV file {path}, row {number}: the image file name (column 1) is '
                        f'empty')
        for column, field in enumerate(row[1:], start=2):
            value = int(field) if _INT_RE.match(field) else None
            if value is None or not -1 <= value <= _INT32_MAX:
                raise _fail(f'CSV file {path}, row {number}: label {field!r} for head'
                            f'{column - 2} (column {column}) is not allowed; labels are '
                            f'integers >= 0, or -1 for no label')
            labels.append(value)
        names += row[0].encode('utf-8')
        offsets.append(len(names))
        numbers.append(number)
    if k is None:
        if header is not None:
            raise _fail(f'CSV file {path} has only a header row (row {header}) and no images; '
                        f'it needs one row per image: file name, then one integer label per '
                        f'head')
        raise _fail(f'CSV file {path} is empty; it needs one row per image: file name, then '
                    f'one integer label per head')
    return names, offsets, labels, numbers, k
